"""Prometheus /metrics of the real proxy, scraped and parsed as Prometheus would."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from test_proxy import start_proxy
from tokentrail._sim import SimConfig, sim_in_thread


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_counters_move_as_exchanges_flow(tmp_path: Path) -> None:
    """Exchanges, records, append latency and passthrough counters follow the traffic."""
    with sim_in_thread(SimConfig(mode="ollama-0.4")) as sim_url:
        proxy = start_proxy(
            tmp_path, sim_url, "--metrics-listen", "127.0.0.1:0",
            "--verify-state", str(tmp_path / "state"),
        )  # fmt: skip
        try:
            metrics_url = next(
                ln.split("metrics on ", 1)[1] for ln in proxy.stderr if "metrics on " in ln
            )
            before = scrape(metrics_url)
            assert 0.0 == before["tokentrail_records_appended_total{}"]
            with httpx.Client(timeout=10) as client:
                for i in range(3):
                    body = {"model": "llama3.2:1b", "prompt": f"hello {i}", "stream": i % 2 == 0}
                    assert 200 == client.post(proxy.url + "/api/generate", json=body).status_code
                assert 200 == client.get(proxy.url + "/api/tags").status_code
            after = scrape(metrics_url)
            assert math.isnan(after["tokentrail_last_verify_ok{}"])  # no verify run yet
        finally:
            proxy.stop()
        assert 0 == proxy.verify(tmp_path / "state").returncode
        proxy = start_proxy(
            tmp_path, sim_url, "--metrics-listen", "127.0.0.1:0",
            "--verify-state", str(tmp_path / "state"), "--refuse-unaudited",
        )  # fmt: skip
        try:
            metrics_url = next(
                ln.split("metrics on ", 1)[1] for ln in proxy.stderr if "metrics on " in ln
            )
            embed = {"model": "llama3.2:1b", "input": "hello"}
            assert 403 == httpx.post(proxy.url + "/api/embed", json=embed).status_code
            verified = scrape(metrics_url)
            health = httpx.get(metrics_url.replace("/metrics", "/healthz"), timeout=10)
        finally:
            proxy.stop()
    assert 1.0 == verified["tokentrail_last_verify_ok{}"]
    assert 1.0 == verified["tokentrail_refused_unaudited_requests_total{}"]
    assert 0.0 == verified["tokentrail_passthrough_requests_total{}"]
    assert verified["tokentrail_last_verify_timestamp_seconds{}"] > 1.7e9
    assert 3.0 == verified["tokentrail_ledger_records{}"]
    assert 3.0 == after["tokentrail_records_appended_total{}"]
    done = {k: v for k, v in after.items() if k.startswith("tokentrail_exchanges_total{")}
    assert 3.0 == sum(done.values())
    assert all("api=ollama.generate" in k for k in done)
    assert 3.0 == after["tokentrail_append_seconds_count{}"]
    assert 1.0 == after["tokentrail_passthrough_requests_total{}"]
    assert 3.0 == after["tokentrail_ledger_records{}"]
    assert 200 == health.status_code
    # Metrics carry no content: no prompt text, no user ids.
    page = "\n".join(after)
    assert "hello" not in page


def test_healthz_says_when_every_exchange_is_refused(tmp_path: Path) -> None:
    """/healthz is 503 with the reason while the proxy refuses every new exchange (here its
    disk is "full": --min-free-bytes beyond any disk), so a load balancer moves the traffic;
    it answered {"status": "ok"} meanwhile. With --fail-open nothing is refused: 200."""
    with sim_in_thread(SimConfig(mode="ollama")) as sim_url:
        for extra, status in (([], 503), (["--fail-open"], 200)):
            proxy = start_proxy(
                tmp_path / str(status), sim_url, "--metrics-listen", "127.0.0.1:0",
                "--min-free-bytes", str(10**18), *extra,
            )  # fmt: skip
            try:
                metrics_url = next(
                    ln.split("metrics on ", 1)[1] for ln in proxy.stderr if "metrics on " in ln
                )
                body = {"model": "llama3.2:1b", "prompt": "hello", "stream": False}
                answer = httpx.post(proxy.url + "/api/generate", json=body, timeout=10)
                health = httpx.get(metrics_url.replace("/metrics", "/healthz"), timeout=10)
            finally:
                proxy.stop()
            assert (status, status) == (answer.status_code, health.status_code)
            if status == 503:
                assert {
                    "status": "refusing",
                    "reason": "the audit ledger's disk is full; refusing unaudited traffic",
                } == health.json()
            else:
                assert {"status": "ok"} == health.json()
