"""Security (issue 7, item 4): identity, secrets, path injection, the signing key, metrics.

Every test drives the real proxy subprocess (``start_proxy`` from ``test_proxy``) in front of
the hostile test upstream's well-behaved answers (``tests/fuzz_upstream.py``, which speaks both
dialects), then looks at every byte the proxy wrote. S3 key injection is covered by the S3
tests' own campaign, not here.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from fuzz_upstream import Seen, upstream_in_thread
from test_proxy import ProxyProc, _env, free_port, start_proxy
from tokentrail._checkpoint import Signer
from tokentrail._errors import ConfigError
from tokentrail._layout import check_log_id
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._proxy import ProxyConfig
from tokentrail._record import Exchange

MODEL = "fuzz-model"
SECRETS = {
    "bearer": "sk-test-SECRET123",
    "x-api-key": "xk-test-SECRET456",
    "api-key": "ak-test-SECRET789",
    "configured": "sk-config-SECRET000",
}
PROMPT_MARK = "PROMPT-MARK-7f3a"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The test upstream (good answers in both dialects unless asked otherwise)."""
    with upstream_in_thread(seen=Seen()) as url:
        yield url


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[ProxyProc]]:
    """Proxies started by a test; stopped after it."""
    started: list[ProxyProc] = []
    yield started
    for p in started:
        p.stop()


def _start(
    proxies: list[ProxyProc], tmp: Path, upstream: str, *args: str, log_id: str = "test"
) -> ProxyProc:
    p = start_proxy(tmp / f"p{len(proxies)}", upstream, *args, log_id=log_id)
    proxies.append(p)
    return p


def _post(proxy: ProxyProc, path: str, headers: dict[str, str] | None = None, **body: Any) -> Any:
    payload: dict[str, Any] = {"model": MODEL, "stream": False, **body}
    if "chat" in path:
        payload.setdefault("messages", [{"role": "user", "content": PROMPT_MARK}])
    else:
        payload.setdefault("prompt", PROMPT_MARK)
    return httpx.post(proxy.url + path, json=payload, headers=headers or {}, timeout=30)


def _all_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


class TestIdentitySpoofing:
    """Identity headers are honoured only when the operator trusts the network in front."""

    SPOOF: ClassVar[dict[str, str]] = {
        "X-Tokentrail-User": "mallory",
        "X-Tokentrail-Session": "stolen-session",
    }

    def test_headers_ignored_without_trust(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """Spoofed user/session headers (any case, repeated) leave user_id and session_id null."""
        proxy = _start(proxies, tmp_path, upstream)
        variants = [
            self.SPOOF,
            {k.lower(): v for k, v in self.SPOOF.items()},
            {k.upper(): v for k, v in self.SPOOF.items()},
        ]
        for h in variants:
            for path in ("/api/generate", "/v1/chat/completions"):
                assert 200 == _post(proxy, path, h).status_code
        with httpx.Client() as client:  # the header twice
            client.post(
                proxy.url + "/api/generate",
                json={"model": MODEL, "prompt": "x", "stream": False},
                headers=[("X-Tokentrail-User", "a"), ("X-Tokentrail-User", "b")],
            )
        recs = proxy.records()
        assert 7 == len(recs)
        assert {(None, None)} == {(r["user_id"], r["session_id"]) for r in recs}

    def test_api_key_user_wins_over_headers(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """With an API key table and no trust, the key's user is recorded, never the header's."""
        keys = tmp_path / "keys.toml"
        keys.write_text(f'"{SECRETS["configured"]}" = "alice"\n')
        proxy = _start(proxies, tmp_path, upstream, "--api-keys", str(keys))
        auth = {"Authorization": f"Bearer {SECRETS['configured']}"}
        _post(proxy, "/api/generate", {**auth, **self.SPOOF})
        _post(proxy, "/v1/completions", {"X-Api-Key": SECRETS["configured"], **self.SPOOF})
        _post(proxy, "/api/chat", {"Authorization": "Bearer wrong-key", **self.SPOOF})
        recs = proxy.records()
        assert ["alice", "alice", None] == [r["user_id"] for r in recs]
        assert [None, None, None] == [r["session_id"] for r in recs]

    def test_require_identity_not_satisfied_by_headers(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """--require-identity without trust: a spoofed user header still gets 401, no record."""
        proxy = _start(proxies, tmp_path, upstream, "--require-identity")
        r = _post(proxy, "/v1/chat/completions", self.SPOOF)
        assert 401 == r.status_code
        assert isinstance(r.json()["error"]["message"], str)
        assert [] == proxy.records()

    def test_identity_headers_not_forwarded(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """Even when trusted, the identity headers are the proxy's, not the upstream's business."""
        proxy = _start(proxies, tmp_path, upstream, "--trust-identity-headers")
        _post(proxy, "/api/generate", self.SPOOF)
        (rec,) = proxy.records()
        assert ("mallory", "stolen-session") == (rec["user_id"], rec["session_id"])

    def test_identity_too_long_is_refused_not_cut(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """A trusted user or session header longer than 256 characters would be stored cut,
        naming someone else (and no search for the full name would find it): refused with 400
        on audited paths; 256 characters are stored whole; other paths pass through."""
        proxy = _start(proxies, tmp_path, upstream, "--trust-identity-headers")
        long_user, long_session = "u" * 257, "s" * 5000
        for headers in ({"X-Tokentrail-User": long_user}, {"X-Tokentrail-Session": long_session}):
            for path in ("/api/generate", "/v1/chat/completions"):
                refused = _post(proxy, path, headers)
                assert 400 == refused.status_code
                assert "longer than 256 characters" in str(refused.json()["error"])
        assert 200 == httpx.get(proxy.url + "/api/tags", headers={"X-Tokentrail-User": long_user},
                                timeout=30).status_code  # fmt: skip
        assert 200 == _post(proxy, "/api/generate", {"X-Tokentrail-User": "u" * 256}).status_code
        assert ["u" * 256] == [r["user_id"] for r in proxy.records()]

    def test_identity_not_utf8_is_refused(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """A trusted user or session header whose bytes are not UTF-8, or that holds a Unicode
        noncharacter, would be stored with U+FFFD, naming whoever else's id cleans up the same
        way (and with a key store the request failed and left no record): refused with 400,
        as one too long is."""
        keys = tmp_path / "keys"
        proxy = _start(
            proxies, tmp_path, upstream, "--trust-identity-headers", "--keystore", str(keys)
        )
        body = {"model": MODEL, "prompt": PROMPT_MARK, "stream": False}
        for name in (b"X-Tokentrail-User", b"X-Tokentrail-Session"):
            for value in (b"al\xffice", "bob\uffff".encode(), "bob\ufdd0".encode()):
                for path in ("/api/generate", "/v1/completions"):
                    refused = httpx.post(
                        proxy.url + path, json=body, headers=[(name, value)], timeout=30
                    )
                    assert 400 == refused.status_code
                    assert "not valid UTF-8" in str(refused.json()["error"])
        utf8 = [(b"X-Tokentrail-User", "alicé".encode())]
        ok = httpx.post(proxy.url + "/api/generate", json=body, headers=utf8, timeout=30)
        assert 200 == ok.status_code
        segments = sorted((proxy.ledger / "logs" / proxy.log_id / "segments").glob("*/*.jsonl"))
        lines = [ln for f in segments for ln in f.read_bytes().splitlines()]
        assert [("alicé", True)] == [
            (r["user_id"], r["content_sealed"]) for r in map(json.loads, lines)
        ]


class TestSecretsNeverStored:
    """API keys and Authorization headers appear nowhere the proxy writes or shows."""

    def test_grep_everything(self, upstream: str, proxies: list[ProxyProc], tmp_path: Path) -> None:
        """Records, journal, writer.json, checkpoints, stderr and /metrics hold no secret."""
        keys = tmp_path / "keys.toml"
        keys.write_text(f'"{SECRETS["configured"]}" = "alice"\n')
        proxy = _start(
            proxies, tmp_path, upstream, "--api-keys", str(keys), "--metrics-listen", "127.0.0.1:0"
        )
        header_sets = [
            {"Authorization": f"Bearer {SECRETS['bearer']}"},
            {"X-Api-Key": SECRETS["x-api-key"]},
            {"api-key": SECRETS["api-key"]},
            {"Authorization": f"Bearer {SECRETS['configured']}"},
            {"Authorization": f"Basic {SECRETS['bearer']}", "X-Api-Key": SECRETS["configured"]},
        ]
        paths = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions")
        for headers in header_sets:
            for path in paths:
                for stream in (False, True):
                    assert 200 == _post(proxy, path, headers, stream=stream).status_code
            bad = httpx.post(proxy.url + "/api/generate", content=b"{", headers=headers)
            assert 400 == bad.status_code
            errs = {**headers, "X-Fuzz-Upstream": "error-status:1"}
            _post(proxy, "/v1/chat/completions", errs)
            httpx.get(proxy.url + "/api/tags", headers=headers)
        metrics_url = next(
            ln.split("metrics on ", 1)[1].strip() for ln in proxy.stderr if "metrics on " in ln
        )
        shown = (
            httpx.get(metrics_url).content
            + httpx.get(metrics_url[: -len("metrics")] + "healthz").content
        )
        n_records = len(proxy.records())
        proxy.stop()
        assert n_records >= len(header_sets) * len(paths) * 2
        log_dir = proxy.ledger / "logs" / proxy.log_id
        names = {p.name for p in log_dir.iterdir()}
        assert {"segments", "checkpoints", "writer.json"} <= names
        written = _all_bytes(proxy.ledger)
        written[Path("<stderr>")] = "\n".join(proxy.stderr).encode()
        written[Path("<metrics>")] = shown
        leaks = [
            (str(path), name)
            for path, data in written.items()
            for name, secret in SECRETS.items()
            if secret.encode() in data or secret.encode().hex().encode() in data
        ]
        assert [] == leaks

    def test_journal_holds_no_secret_mid_exchange(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """While an exchange is in flight, the intent journal does not hold its key either."""
        proxy = _start(proxies, tmp_path, upstream, "--upstream-timeout", "5")
        journal = proxy.ledger / "logs" / proxy.log_id / "inflight.jsonl"
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "POST",
                proxy.url + "/api/generate",
                json={"model": MODEL, "prompt": PROMPT_MARK},
                headers={
                    "Authorization": f"Bearer {SECRETS['bearer']}",
                    "X-Fuzz-Upstream": "huge-line:3",
                },
            ) as r,
        ):
            next(r.iter_raw())
            data = journal.read_bytes()
        assert PROMPT_MARK.encode() in data  # the journal does note the exchange
        assert SECRETS["bearer"].encode() not in data


class TestPathInjection:
    """Log ids and client-supplied strings cannot leave their directory."""

    @pytest.mark.parametrize(
        "log_id", ["../x", "a/b", "/abs", "..", ".", "UPPER", "a" * 65, "", "-lead", "a b", "é"]
    )
    def test_bad_log_id_refused(self, tmp_path: Path, log_id: str) -> None:
        """``serve --log-id`` with a bad id exits 2 or 1 with one clear line; nothing created."""
        cmd = [
            sys.executable, "-m", "tokentrail", "serve", "--upstream", "http://127.0.0.1:9",
            "--listen", "127.0.0.1:0", "--ledger", str(tmp_path / "ledger"),
            "--key", str(tmp_path / "k"), "--log-id", log_id,
        ]  # fmt: skip
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=30)
        assert 0 != out.returncode
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert 1 == len(lines), out.stderr
        assert "log id" in lines[0] and "Traceback" not in out.stderr
        assert not (tmp_path / "x").exists() and not (tmp_path / "ledger").exists()

    @pytest.mark.parametrize("log_id", ["a\x00b", "../x", "a/b", "A", "a" * 65])
    def test_bad_log_id_refused_by_library(self, tmp_path: Path, log_id: str) -> None:
        """ProxyConfig, LedgerConfig/Ledger.open and check_log_id refuse it (NUL included)."""
        with pytest.raises(ConfigError):
            ProxyConfig(log_id=log_id)
        with pytest.raises(ConfigError):
            check_log_id(log_id)
        with pytest.raises(ConfigError):
            Ledger.open(LedgerConfig(tmp_path / "ledger", log_id, Signer.generate("k")))
        assert [] == [p for p in tmp_path.rglob("*") if p.is_file()]

    def test_log_id_trailing_newline_refused(self, tmp_path: Path) -> None:
        """A log id with a trailing newline is refused (use re.fullmatch or \\Z)."""
        with pytest.raises(ConfigError):
            check_log_id("abc\n")

    def test_client_strings_stay_inside(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """Idempotency-Key, model and user header full of ../ and / create no file elsewhere."""
        proxy = _start(proxies, tmp_path, upstream, "--trust-identity-headers")
        before = {p for p in tmp_path.rglob("*")}
        evil = [
            "../../../../tmp/evil", "/etc/passwd", "..\\..\\x", "a/../../b", "%2e%2e%2f",
            "../" * 40, "x/" * 100,
        ]  # fmt: skip
        for s in evil:
            h = {"Idempotency-Key": s, "X-Tokentrail-User": s, "X-Tokentrail-Session": s}
            assert 200 == _post(proxy, "/api/generate", h, model=s).status_code
            _post(proxy, "/v1/chat/completions", h, model=s)
        proxy.stop()
        created = {p for p in tmp_path.rglob("*")} - before
        log_dir = proxy.ledger / "logs" / proxy.log_id
        outside = [p for p in created if p.is_file() and log_dir not in p.parents]
        assert [] == outside
        recs = proxy.records()
        assert len(evil) * 2 == len(recs)
        assert evil[0] == recs[0]["idempotency_key"]

    def test_event_id_never_names_a_file(self, tmp_path: Path) -> None:
        """A hostile event_id handed to the SDK ledger is refused and writes no file."""
        root = tmp_path / "ledger"
        with Ledger.open(LedgerConfig(root, "sdk-log", Signer.generate("k"))) as ledger:
            for eid in ("../../../evil", "/tmp/evil", "a/b/c"):
                with pytest.raises(ConfigError, match="event_id must be a lowercase UUID"):
                    ledger.append(Exchange(model="m", api="sdk", stop_reason="stop", event_id=eid))
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert all((root / "logs" / "sdk-log") in p.parents for p in files)
        assert not any("evil" in str(p) for p in files)

    @pytest.mark.parametrize(
        "path", ["/api/./generate", "/api/x/../generate", "/api/%2e%2e/api/generate"]
    )
    def test_dot_segments_do_not_bypass_the_audit(
        self, proxies: list[ProxyProc], tmp_path: Path, path: str
    ) -> None:
        """The exchange is recorded, whether the upstream acts on that spelling or not (it is
        forwarded as sent, so the upstream's answer to it is the client's)."""
        seen = Seen()
        with upstream_in_thread(seen=seen) as url:
            proxy = _start(proxies, tmp_path, url)
            raw = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                "Idempotency-Key: dot-1\r\nContent-Type: application/json\r\n"
            ).encode()
            body = json.dumps({"model": MODEL, "prompt": "x", "stream": False}).encode()
            import socket

            host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(raw + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                while s.recv(65536):
                    pass
            reached = "dot-1" in seen.keys
            recorded = any(r.get("idempotency_key") == "dot-1" for r in proxy.records())
        assert recorded, f"reached the upstream as an audited path: {reached}"


class TestSigningKey:
    """The signing key must be private and stays out of the ledger."""

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
    def test_readable_key_refused(self, tmp_path: Path, mode: int) -> None:
        """serve --key with a group- or world-readable key exits with one clear error line."""
        key = tmp_path / "signing.key"
        Signer.generate("k").save(key)
        key.chmod(mode)
        cmd = [
            sys.executable, "-m", "tokentrail", "serve", "--upstream", "http://127.0.0.1:9",
            "--listen", f"127.0.0.1:{free_port()}", "--ledger", str(tmp_path / "ledger"),
            "--key", str(key), "--log-id", "t",
        ]  # fmt: skip
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=30)
        assert 0 != out.returncode
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert 1 == len(lines) and "readable by group or others" in lines[0], out.stderr
        assert "chmod 600" in lines[0] and "Traceback" not in out.stderr
        assert not (tmp_path / "ledger" / "logs").exists()

    def test_key_never_in_ledger(
        self, upstream: str, proxies: list[ProxyProc], tmp_path: Path
    ) -> None:
        """After serving and a clean stop, no ledger file holds the seed (raw, base64 or hex)."""
        proxy = _start(proxies, tmp_path, upstream)
        for path in ("/api/generate", "/v1/chat/completions"):
            _post(proxy, path, stream=True)
        proxy.stop()
        key_file = tmp_path / "p0" / "signing.key"
        assert 0o600 == key_file.stat().st_mode & 0o777
        signer = Signer.from_text(key_file.read_text())
        needles = [
            signer.seed,
            signer.seed.hex().encode(),
            base64.b64encode(signer.seed),
            base64.b64encode(b"\x01" + signer.seed),
            signer.to_text().encode(),
        ]
        written = _all_bytes(proxy.ledger)
        assert written
        assert proxy.ledger.resolve() not in key_file.resolve().parents
        assert [] == [str(p) for p, data in written.items() if any(n in data for n in needles)]


class TestMetricsExposeNoContent:
    """/metrics and /healthz carry counts only: no prompt, user, session or model text."""

    def test_no_content(self, upstream: str, proxies: list[ProxyProc], tmp_path: Path) -> None:
        """After traffic from a known user, neither endpoint shows anything it sent."""
        keys = tmp_path / "keys.toml"
        keys.write_text('"sk-m" = "user-METRICS-42"\n')
        proxy = _start(
            proxies, tmp_path, upstream, "--api-keys", str(keys), "--metrics-listen", "127.0.0.1:0",
            "--trust-identity-headers",
        )  # fmt: skip
        h = {
            "Authorization": "Bearer sk-m",
            "X-Tokentrail-Session": "session-METRICS-9",
            "Idempotency-Key": "idem-METRICS-1",
        }
        for path in ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"):
            _post(proxy, path, h, model="model-METRICS-x")
            _post(proxy, path, {**h, "X-Fuzz-Upstream": "error-status:2"}, model="model-METRICS-x")
        deadline = time.time() + 5
        while not any("metrics on " in ln for ln in proxy.stderr) and time.time() < deadline:
            time.sleep(0.05)
        url = next(
            ln.split("metrics on ", 1)[1].strip() for ln in proxy.stderr if "metrics on " in ln
        )
        metrics = httpx.get(url).text
        health = httpx.get(url.removesuffix("/metrics") + "/healthz").text
        assert "tokentrail_records_appended" in metrics
        for text in (metrics, health):
            for needle in (PROMPT_MARK, "user-METRICS-42", "session-METRICS-9", "idem-METRICS-1",
                           "model-METRICS-x", "sk-m"):  # fmt: skip
                assert needle not in text, needle
        assert {"status": "ok"} == json.loads(health)
        for path in ("/", "/debug", "/api/generate"):
            assert httpx.get(url.removesuffix("/metrics") + path).status_code in (404, 405)
