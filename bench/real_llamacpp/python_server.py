"""The auditing proxy in front of llama-cpp-python's own server (``python -m llama_cpp.server``,
FastAPI and sse-starlette), a second real OpenAI-compatible server beside ``llama-server``.

``--python`` names an interpreter that has ``llama-cpp-python[server]`` (built from the sdist
``build.sh`` downloads, for example); the server is started on the tiny model, ``tokentrail
serve`` in front of it. Each case is sent with httpx directly and through the proxy (temperature
0, a fixed seed) and checked: the bytes the client receives are equal once the per-response ids,
``created`` and the logprobs' values are blanked (that server does not repeat a logprob's last
digits between two runs), status and headers apart from connection headers and the per-response
``x-request-id`` and ``openai-processing-ms``; exactly one record a case, with the text the
client was given; ``tokentrail verify --all`` accepts the ledger after SIGTERM.

    python3 -m venv /tmp/lcp && CMAKE_ARGS="-DLLAMA_CURL=OFF" /tmp/lcp/bin/pip install \\
        "$HOME/.cache/tokentrail-llamacpp/llama_cpp_python-0.3.16[server]"
    .venv/bin/python bench/real_llamacpp/python_server.py --python /tmp/lcp/bin/python \\
        --model ~/.cache/tokentrail-llamacpp/tiny.gguf

Prints a table and a summary line; exit status 1 on any mismatch, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check import (
    BASE,
    Case,
    free_port,
    keygen,
    post,
    proxy,
    run_in_tmp,
    serving,
    stop_process,
    table,
    verify,
)

VOLATILE = [
    (re.compile(rb'"id": ?"[^"]*"'), rb'"id":"*"'),
    (re.compile(rb'"created": ?\d+'), rb'"created":0'),
    (re.compile(rb"(-?\d+\.\d+(e-?\d+)?)"), rb"0.0"),  # logprobs: not repeated between runs
]
PER_RESPONSE_HEADERS = {"x-request-id", "openai-processing-ms"}
CHAT = {**BASE, "max_tokens": 12, "messages": [{"role": "user", "content": "Un café? 東京 👋"}]}
CMPL = {**BASE, "max_tokens": 12, "prompt": "señor"}
CASES = [
    Case("chat", "/v1/chat/completions", CHAT, "length"),
    Case("chat stream", "/v1/chat/completions", {**CHAT, "stream": True}, "length"),
    Case("chat logprobs", "/v1/chat/completions", {**CHAT, "logprobs": True}, "length"),
    Case("chat stream logprobs", "/v1/chat/completions",
         {**CHAT, "logprobs": True, "stream": True}, "length"),
    Case("cmpl", "/v1/completions", CMPL, "length"),
    Case("cmpl stream", "/v1/completions", {**CMPL, "stream": True}, "length"),
    Case("cmpl logprobs", "/v1/completions", {**CMPL, "logprobs": 1}, "length"),
    Case("cmpl stream logprobs", "/v1/completions",
         {**CMPL, "logprobs": 1, "stream": True}, "length"),
]  # fmt: skip


def python_server(python: str, model: Path, log: Path) -> AbstractContextManager[str]:
    """llama-cpp-python's server on a free port, answering (a context manager of its URL)."""
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "512", "--model_alias", "tiny"]  # fmt: skip
    return serving("llama_cpp.server", cmd, port, "/v1/models", log)


def blank(data: bytes) -> bytes:
    for pattern, repl in VOLATILE:
        data = pattern.sub(repl, data)
    return data


def run(args: argparse.Namespace, tmp: Path) -> int:
    key = keygen(tmp, "lcp-check")
    rows: list[list[Any]] = []
    problems: list[str] = []
    with python_server(args.python, args.model, tmp / "server.log") as upstream:
        with httpx.Client(timeout=120) as client, proxy(upstream, "off", tmp, key) as px:
            for case in CASES:
                before = len(px.records())
                direct, through = post(client, upstream, case), post(client, px.url, case)
                same = blank(direct.body) == blank(through.body) and direct.status == through.status
                heads = [{h for h in r.headers if h[0] not in PER_RESPONSE_HEADERS}
                         for r in (direct, through)]  # fmt: skip
                time.sleep(0.05)  # strict durability: the record is on disk; the read is not
                recs = px.records()[before:]
                text = through.answer()[1]
                ok = same and heads[0] == heads[1] and len(recs) == 1
                ok = ok and recs[0]["output_text"] == text
                rec = recs[0] if recs else {}
                rows.append([case.name, "yes" if same else "NO", len(recs),
                             rec.get("output_token_source", "-"),
                             rec.get("tokentrail.output_tokens_missing", "-"),
                             "ok" if ok else "MISMATCH"])  # fmt: skip
                if not ok:
                    problems.append(f"{case.name}: direct {direct.body[:200]!r}")
                    problems.append(f"{case.name}: proxied {through.body[:200]!r}")
            stop_process(px.proc)
        code, line = verify(px.ledger, tmp / "verifier.pub", tmp / "state")
    print(table(["exchange", "bytes equal", "records", "token source", "tokens missing",
                 "result"], rows))  # fmt: skip
    print("\n".join(problems))
    print(f"verify: exit {code}: {line.splitlines()[-1] if line else ''}")
    bad = sum(r[-1] != "ok" for r in rows) + (code != 0)
    print(f"{len(CASES)} exchanges: " + ("all ok" if not bad else f"{bad} MISMATCHES"))
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="a Python with llama-cpp-python[server]")
    parser.add_argument("--model", type=Path, required=True, help="GGUF model")
    args = parser.parse_args()
    return run_in_tmp("python_server.py", run, args)


if __name__ == "__main__":
    sys.exit(main())
