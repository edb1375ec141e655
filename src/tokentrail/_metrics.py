"""Prometheus metrics of a running proxy (exposition format 0.0.4, via prometheus-client).

Each :class:`Metrics` has its own registry, so several proxies in one process (the demo, the
tests) never share counters. Nothing here carries content: labels are APIs, stop reasons and
error kinds, never users, prompts or keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The proxy's counters, histograms and gauges."""

    def __init__(self) -> None:
        self._refusal: Callable[[], str | None] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.exchanges = Counter(
            "tokentrail_exchanges", "Audited exchanges, by API and stop reason.",
            ["api", "stop_reason"], registry=r,
        )  # fmt: skip
        self.records = Counter(
            "tokentrail_records_appended", "Records appended to the ledger.", registry=r
        )
        self.append_seconds = Histogram(
            "tokentrail_append_seconds",
            "Time from handing a record to the ledger until it is durable (strict) or queued.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "tokentrail_upstream_errors", "Exchanges that ended in an upstream error.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.append_errors = Counter(
            "tokentrail_append_errors", "Records the ledger could not write.", registry=r
        )
        self.refused = Counter(
            "tokentrail_refused_exchanges",
            "Exchanges refused (503) because the ledger could not be written.", registry=r,
        )  # fmt: skip
        self.passthrough = Counter(
            "tokentrail_passthrough_requests", "Requests relayed without audit.", registry=r
        )
        self.refused_unaudited = Counter(
            "tokentrail_refused_unaudited_requests",
            "Requests refused (403) because they would pass unaudited (--refuse-unaudited).",
            registry=r,
        )
        self.unsealed = Gauge(
            "tokentrail_unsealed_records", "Durable records not yet under a checkpoint.",
            registry=r,
        )  # fmt: skip
        self.ledger_size = Gauge(
            "tokentrail_ledger_records", "Durable records in this writer's log.", registry=r
        )
        # The labelled counters by their labels (prometheus-client looks them up, under a
        # lock, on each call; an exchange counts once).
        self._exchanges: dict[tuple[str, str], Counter] = {}

    def count_exchange(self, api: str, stop_reason: str) -> None:
        """One more exchange of ``api`` that stopped for ``stop_reason``."""
        key = (api, stop_reason)
        counter = self._exchanges.get(key)
        if counter is None:
            counter = self._exchanges[key] = self.exchanges.labels(api, stop_reason)
        counter.inc()

    def track_verify(self, last_run: Path) -> None:
        """Expose the last ``tokentrail verify`` outcome noted in ``last_run``."""
        ok = Gauge(
            "tokentrail_last_verify_ok", "1 if the last verify run found the ledger valid.",
            registry=self.registry,
        )  # fmt: skip
        at = Gauge(
            "tokentrail_last_verify_timestamp_seconds", "When verify last ran (Unix time).",
            registry=self.registry,
        )  # fmt: skip

        def read(key: str) -> float:
            try:
                value = orjson.loads(last_run.read_bytes()).get(key)
            except (OSError, orjson.JSONDecodeError, AttributeError):
                return float("nan")
            return float(value) if isinstance(value, bool | int | float) else float("nan")

        ok.set_function(lambda: read("ok"))
        at.set_function(lambda: read("at"))

    def track_shipper(
        self, unshipped: Callable[[], int], ok: Callable[[], bool], success: Callable[[], float]
    ) -> None:
        """Expose the S3 shipper's state: an outage shows here, not only in the log."""
        Gauge(
            "tokentrail_s3_unshipped_bytes", "Local ledger bytes not yet in S3.",
            registry=self.registry,
        ).set_function(lambda: float(unshipped()))  # fmt: skip
        Gauge(
            "tokentrail_s3_last_pass_ok", "1 if the last shipping pass shipped all it found.",
            registry=self.registry,
        ).set_function(lambda: float(ok()))  # fmt: skip
        Gauge(
            "tokentrail_s3_last_success_timestamp_seconds",
            "When a shipping pass last succeeded (Unix time; NaN: not yet).",
            registry=self.registry,
        ).set_function(success)

    def track_ledger(self, size: Callable[[], int], signed: Callable[[], int]) -> None:
        """Read the ledger's sizes at scrape time."""
        self.ledger_size.set_function(lambda: float(size()))
        self.unsealed.set_function(lambda: float(size() - signed()))

    async def handle(self, _request: web.Request) -> web.Response:
        """``GET /metrics``."""
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def track_refusal(self, refusal: Callable[[], str | None]) -> None:
        """What ``/healthz`` asks: why new exchanges are refused now (``None``: they are not)."""
        self._refusal = refusal

    async def healthz(self, _request: web.Request) -> web.Response:
        """``GET /healthz``: 200 while exchanges are taken; 503 with the reason while every
        new one is refused (the ledger cannot be written, its disk is full), so that a load
        balancer sends them to another instance. An upstream that is down is not this
        instance's fault: its exchanges get the upstream's error, and ``/healthz`` stays 200."""
        reason = self._refusal() if self._refusal is not None else None
        if reason is not None:
            return web.json_response({"status": "refusing", "reason": reason}, status=503)
        return web.json_response({"status": "ok"})

    def app(self) -> web.Application:
        """A small application serving ``/metrics`` and ``/healthz``."""
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        app.router.add_get("/healthz", self.healthz)
        return app
