"""The official JavaScript clients (npm ``openai`` and ``ollama``, on Node's fetch) through the
real proxy: a client stack the proxy and the simulator were not written against.

For every simulator mode, ``tests/node/clients.mjs`` makes the same calls against the simulator
directly and through the proxy; what the clients return must agree (apart from the values the
simulator makes up per response), each call must leave exactly one record holding the text the
client assembled, and the ledger must verify. Also: streams the clients abort half-way, and
openai-node through the proxy to a real llama.cpp server (when one is configured, see
``conftest.llama_server``). The packages are installed from the npm registry
into ``~/.cache/tokentrail-node`` on first use; without ``node`` and ``npm``, or without the
registry, the module skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from test_proxy import MODEL, OLLAMA_MODES, OPENAI_MODES, ProxyProc, start_proxy
from tokentrail._sim import SimConfig, sim_in_thread

PACKAGES = ("openai@6.49.0", "ollama@0.6.4")
SCRIPT = Path(__file__).resolve().parent / "node" / "clients.mjs"
# Made up by the simulator per response (ids, clocks, OpenAI's padding), as in test_proxy.
_VOLATILE = {
    "id",
    "created",
    "created_at",
    "obfuscation",
    "timings",
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
}


@pytest.fixture(scope="module")
def node_dir() -> Path:
    """A directory holding the script beside ``node_modules`` with the pinned packages."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed")
    cache = Path.home() / ".cache" / "tokentrail-node" / "-".join(PACKAGES).replace("@", "-")
    if not all(
        (cache / "node_modules" / p.split("@")[0] / "package.json").exists() for p in PACKAGES
    ):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--fetch-timeout=30000",
                 "--fetch-retries=1", "--prefix", str(cache), *PACKAGES],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm could not install {' '.join(PACKAGES)} within 300 s")
        if result.returncode != 0:
            pytest.skip(f"npm could not install {' '.join(PACKAGES)}: {result.stderr[-500:]}")
    shutil.copy(SCRIPT, cache / SCRIPT.name)
    return cache


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, ProxyProc]]]:
    """A simulator and a proxy (strict durability) per mode; every ledger verifies at the end."""
    with ExitStack() as stack:
        out: dict[str, tuple[str, ProxyProc]] = {}
        for mode in (*OLLAMA_MODES, *OPENAI_MODES):
            sim = stack.enter_context(sim_in_thread(SimConfig(mode=mode)))
            proxy = start_proxy(tmp_path_factory.mktemp(f"node-{mode}"), sim)
            stack.callback(proxy.stop)
            out[mode] = (sim, proxy)
        yield out
    for mode, (_, proxy) in out.items():
        result = proxy.verify(tmp_path_factory.mktemp(f"node-state-{mode}"))
        assert result.returncode == 0, result.stdout + result.stderr


def run_clients(node_dir: Path, base: str, kind: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["node", str(node_dir / SCRIPT.name), base, kind],
        capture_output=True, text=True, timeout=120, cwd=node_dir,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls: list[dict[str, Any]] = json.loads(result.stdout)
    return calls


def normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


@pytest.mark.parametrize("mode", (*OLLAMA_MODES, *OPENAI_MODES))
def test_node_clients_through_proxy(
    node_dir: Path, stacks: dict[str, tuple[str, ProxyProc]], mode: str
) -> None:
    """Streamed and not, chat, generate and completions: the same answers as direct, one
    record per call with the client's text, in order."""
    sim, proxy = stacks[mode]
    kind = "ollama" if mode in OLLAMA_MODES else "openai"
    run_clients(node_dir, sim, kind)  # warm: the simulator's model list, the proxy's digest
    direct = run_clients(node_dir, sim, kind)
    before = len(proxy.records())
    through = run_clients(node_dir, proxy.url, kind)
    assert normalized(direct) == normalized(through)
    records = proxy.new_records(before)
    assert [(r["api"], r["output_text"]) for r in records] == [
        (c["api"], c["text"]) for c in through
    ]
    assert all(r["model"] == MODEL and r["stop_reason"] for r in records)
    assert all("sk-node-test" not in json.dumps(r) for r in records)


def test_node_clients_abort_mid_stream(node_dir: Path, tmp_path: Path) -> None:
    """ollama-js's ``abort()`` and openai-node's ``AbortController`` after the third chunk of a
    slow stream: each leaves one ``client_disconnect`` record holding at least what the client
    got, and the ledger verifies."""
    with sim_in_thread(SimConfig(mode="ollama", token_ms=20)) as sim:
        proxy = start_proxy(tmp_path / "p", sim)
        try:
            through = run_clients(node_dir, proxy.url, "abort")
            deadline = time.monotonic() + 10
            while len(proxy.records()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            proxy.stop()
    records = proxy.records()
    assert [r["api"] for r in records] == [c["api"] for c in through]
    for rec, call in zip(records, through, strict=True):
        assert rec["stop_reason"] == "client_disconnect"
        assert len(call["got"]) == 3 and call["text"]
        assert rec["output_text"].startswith(call["text"])
        assert len(rec["output_text"]) < 200  # 200 tokens are ~1,000 characters: it stopped
    result = proxy.verify(tmp_path / "state")
    assert result.returncode == 0, result.stdout + result.stderr


def test_node_clients_real_llama_server(node_dir: Path, llama_server: str, tmp_path: Path) -> None:
    """openai-node through the proxy to a real llama.cpp server, neither written here: one
    record per call, holding the text the client assembled (the tiny random model's answers,
    bytes that are no UTF-8 shown as U+FFFD included), and the ledger verifies."""
    proxy = start_proxy(tmp_path / "p", llama_server)
    try:
        through = run_clients(node_dir, proxy.url, "openai")
    finally:
        proxy.stop()
    records = proxy.records()
    assert [(r["api"], r["output_text"]) for r in records] == [
        (c["api"], c["text"]) for c in through
    ]
    assert len(records) == 4 and all(r["stop_reason"] for r in records)
    result = proxy.verify(tmp_path / "state")
    assert result.returncode == 0, result.stdout + result.stderr
