"""Shared fixtures for the ledger tests: a signing key, a temporary ledger and witness-state
folder, and a helper that writes N varied records (token ids, UTF-8 and byte pieces, ``null``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest

from tokentrail._checkpoint import Signer
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._record import Exchange, Record

LOG_ID = "test-log"
#: Environment variables the tests read (never the product), kept for every test.
TEST_KNOBS = frozenset(
    {
        "TOKENTRAIL_LLAMA_SERVER",
        "TOKENTRAIL_LLAMA_MODEL",
        "TOKENTRAIL_OUTAGE_S",
        "TOKENTRAIL_SDK_THREAD_CALLS",
    }
)

#: Token lists of every kind SPEC section 2 allows, cycled through by :func:`exchange_for`.
TOKEN_SAMPLES: tuple[list[Any] | None, ...] = (
    [1, 22, 333, 4444, 0],
    ["Hel", "lo", " wor", "ld", "é", "😀"],
    ["a", [0xE2, 0x82], [0xAC], "b"],
    None,
    [],
)


def source_of(tokens: list[Any] | None) -> str:
    """The source a token list can have (SPEC sections 2 and 5): none for ``null``, ids from
    ``upstream-ids``, pieces from ``upstream-pieces``."""
    if tokens is None:
        return "none"
    return "upstream-pieces" if tokens and not isinstance(tokens[0], int) else "upstream-ids"


def exchange_for(i: int, **overrides: Any) -> Exchange:
    """The ``i``-th test exchange: token lists, text and ids vary with ``i``."""
    input_tokens = TOKEN_SAMPLES[i % len(TOKEN_SAMPLES)]
    output_tokens = TOKEN_SAMPLES[(i + 1) % len(TOKEN_SAMPLES)]
    fields: dict[str, Any] = {
        "model": "llama3.2:1b",
        "api": "ollama.generate",
        "stop_reason": "stop",
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_source": source_of(input_tokens),
        "output_token_source": source_of(output_tokens),
        "input_text": f"prompt number {i}: why is the sky blue?",
        "output_text": None if i % 7 == 3 else f"answer {i}: Rayleigh scattering ☀",
        "user_id": f"user-{i % 5}",
        "session_id": f"session-{i % 3}",
        "model_version": "sha256:a80c4f17acd5",
        "request_duration_ms": 12.5 + i,
    }
    fields.update(overrides)
    return Exchange(**fields)


@pytest.fixture(autouse=True)
def _no_user_settings(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test (and the subprocesses it starts) sees an empty config and state home and no
    ``TOKENTRAIL_*`` settings, so a key or witness state the machine's user keeps (after
    running the README's demo, say) never changes what a test sees."""
    for name in list(os.environ):
        if name.startswith("TOKENTRAIL_") and name not in TEST_KNOBS:
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("user-home")
    monkeypatch.setenv("TOKENTRAIL_HOME", str(home / "tokentrail"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))


@pytest.fixture
def make_exchange() -> Callable[..., Exchange]:
    """``make_exchange(i, **overrides)``: the ``i``-th varied test exchange."""
    return exchange_for


@pytest.fixture
def signer() -> Signer:
    """The deployment's signing key."""
    return Signer.generate("test-key")


@pytest.fixture
def ledger_root(tmp_path: Path) -> Path:
    """A ledger directory that does not exist yet."""
    return tmp_path / "ledger"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A witness-state directory for the verifier."""
    return tmp_path / "witness"


WriteRecords = Callable[..., list[Record]]


@pytest.fixture
def write_records(ledger_root: Path, signer: Signer) -> WriteRecords:
    """``write_records(n, start=0, seal_every=None, log_id=..., root=..., **config)``.

    Opens a sync :class:`Ledger`, appends ``n`` exchanges (numbered from ``start``), seals
    after every ``seal_every`` appends when given, closes it (which seals) and returns the
    records.
    """

    def write(
        n: int,
        *,
        start: int = 0,
        seal_every: int | None = None,
        log_id: str = LOG_ID,
        root: Path | None = None,
        key: Signer | None = None,
        **config: Any,
    ) -> list[Record]:
        cfg = LedgerConfig(root or ledger_root, log_id, key or signer, **config)
        records = []
        with Ledger.open(cfg) as ledger:
            for i in range(start, start + n):
                records.append(ledger.append(exchange_for(i)))
                if seal_every and (i - start + 1) % seal_every == 0:
                    ledger.seal()
        return records

    return write


# ---------------------------------------------------------------------- the order of files

#: The files that run longest (176, 89, 78 and 73 s of test time in a two-worker run on 2 cores),
#: handed out first: pytest-xdist gives out whole files in the order collected
#: (``--no-loadscope-reorder``), so none of them starts last and leaves one worker running alone.
LONGEST_FIRST = ("test_s3_proxy.py", "test_proxy.py", "test_sdk.py", "test_s3.py")
#: Its test waits for the soak started at collection (a minute): given out last, it finds it done.
LAST = "test_soak.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, the soak last, the rest as collected (each file kept whole)."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if name == LAST:
            return len(LONGEST_FIRST) + 1
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


# ---------------------------------------------------------------------- the soak, early

SOAK_TEST = "tests/test_soak.py::test_sixty_seconds_flat_and_lossless"
#: The CI-sized soak of issue 7: a minute at 40 exchanges/s.
SOAK_ARGS: dict[str, float] = {"seconds": 60.0, "rate": 40.0, "sample": 5.0, "warmup": 10.0}
#: Where the soak started early writes ``soak.json``, ``soak.log`` and, once it exits, ``rc``.
SOAK_DIR = pytest.StashKey[Path]()
_SOAK_PROC = pytest.StashKey[tuple[subprocess.Popen[bytes], TextIO]]()


def soak_early(nodeids: list[str]) -> bool:
    """Whether a run of these tests starts the soak as soon as they are collected (not alone)."""
    return SOAK_TEST in nodeids and len(nodeids) > 1


def soak_dir(config: pytest.Config) -> Path:
    """The soak's folder for this run: made by the process that runs the soak, given to the
    pytest-xdist workers (the test waits for it wherever it runs)."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        return Path(workerinput["tokentrail_soak_dir"])
    if SOAK_DIR not in config.stash:
        config.stash[SOAK_DIR] = Path(tempfile.mkdtemp(prefix="tt-soak-test-"))
    return config.stash[SOAK_DIR]


def _start_soak(config: pytest.Config) -> None:
    work = soak_dir(config)
    log = (work / "soak.log").open("w")
    bench = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    proc = subprocess.Popen(
        [sys.executable, str(bench), "--minutes", str(SOAK_ARGS["seconds"] / 60),
         "--rate", str(SOAK_ARGS["rate"]), "--sample", str(SOAK_ARGS["sample"]),
         "--warmup", str(SOAK_ARGS["warmup"]), "--json", str(work / "soak.json")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    config.stash[_SOAK_PROC] = (proc, log)

    def note_exit() -> None:  # written last, so a test that sees it finds the figures complete
        (work / "rc.tmp").write_text(str(proc.wait()))
        os.replace(work / "rc.tmp", work / "rc")

    threading.Thread(target=note_exit, daemon=True).start()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the soak now if it is among the tests to run (see ``tests/test_soak.py``); with
    pytest-xdist the controller starts it instead (the workers collect, each of them)."""
    config = session.config
    if config.option.collectonly or hasattr(config, "workerinput"):
        return
    if soak_early([item.nodeid for item in session.items]):
        _start_soak(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist's controller: tell each worker where the soak's figures will be."""
    node.workerinput["tokentrail_soak_dir"] = str(soak_dir(node.config))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """pytest-xdist's controller: start the soak once, when the first worker has collected."""
    config = node.config
    if _SOAK_PROC not in config.stash and soak_early(ids):
        _start_soak(config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A soak the run did not wait for (stopped early, deselected) is stopped with its children;
    the folder of one that passed is removed."""
    config = session.config
    passed = True
    if _SOAK_PROC in config.stash:
        proc, log = config.stash[_SOAK_PROC]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        passed = proc.wait() == 0
        log.close()
    if passed and SOAK_DIR in config.stash:
        shutil.rmtree(config.stash[SOAK_DIR], ignore_errors=True)


@dataclass
class Seen:
    """What the recording upstream received: request lines and header names, in order."""

    lines: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def recording_upstream() -> Iterator[tuple[str, Seen]]:
    """An Ollama-shaped upstream that notes each request line and its headers as received."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = Seen()
    answer = json.dumps(
        {"model": "llama3.2:1b", "created_at": "2026-01-01T00:00:00Z", "response": "hi",
         "done": True, "done_reason": "stop", "eval_count": 1}
    ).encode()  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            seen.lines.append(self.requestline)
            seen.headers.append({k.lower(): v for k, v in self.headers.items()})
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


LLAMA_SERVER = os.environ.get("TOKENTRAIL_LLAMA_SERVER", "")
LLAMA_MODEL = os.environ.get("TOKENTRAIL_LLAMA_MODEL", "")
_LLAMA_CHECK = Path(__file__).resolve().parents[1] / "bench" / "real_llamacpp" / "check.py"


@pytest.fixture
def llama_server(tmp_path: Path) -> Iterator[str]:
    """A real llama.cpp ``llama-server`` on a free port (its base URL), started as
    ``bench/real_llamacpp/check.py`` starts it; skips unless ``TOKENTRAIL_LLAMA_SERVER`` and
    ``TOKENTRAIL_LLAMA_MODEL`` name a binary and a model (``bench/real_llamacpp/build.sh``)."""
    if not (LLAMA_SERVER and os.access(LLAMA_SERVER, os.X_OK) and Path(LLAMA_MODEL).is_file()):
        pytest.skip(
            "set TOKENTRAIL_LLAMA_SERVER and TOKENTRAIL_LLAMA_MODEL "
            "(bash bench/real_llamacpp/build.sh makes both)"
        )
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_llamacpp_check", _LLAMA_CHECK)
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = check  # its dataclasses look their module up
    spec.loader.exec_module(check)
    with check.llama_server(Path(LLAMA_SERVER), Path(LLAMA_MODEL), tmp_path / "llama.log") as url:
        yield url
