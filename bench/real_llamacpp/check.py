"""The auditing proxy in front of a real llama.cpp ``llama-server``: what the client gets, what
the ledger keeps, and whether the recorded token ids are the text.

The simulator (``tokentrail sim --mode llamacpp``) was written from llama.cpp's documentation
by the proxy's authors; this check runs the proxy against the server itself (see
``build.sh`` for a build and a tiny model). It starts the server (unless ``--url`` names a
running one) and ``tokentrail serve`` twice as subprocesses, without and with
``--request-token-data logprobs``, each with its own ledger and a key made by
``tokentrail keygen`` in a temporary directory. Every exchange of ``CASES`` (``temperature:
0`` and a fixed ``seed``, so llama.cpp answers the same bytes each time) is sent with httpx
directly and through each proxy, and checked:

a. the bytes the client receives are equal once ``id``, ``created`` and ``timings`` values are
   blanked, and so are status and headers apart from connection headers and ``Date``;
b. exactly one record lands, with the path's ``api``, the ``stop_reason`` the client was
   given as ``finish_reason`` and the text it was given as ``output_text``;
c. token honesty: ids recorded as ``upstream-ids`` are sent to the server's ``/detokenize``
   and must give ``output_text`` (special tokens, such as the end-of-sequence id a
   non-streamed answer ends with, are not part of the text); a record without tokens
   (``none``) although logprobs were there must count the gap in
   ``tokentrail.output_tokens_missing``;
d. after SIGTERM, ``tokentrail verify --all --require-sealed`` accepts each ledger.

    .venv/bin/python bench/real_llamacpp/check.py --server BUILD/bin/llama-server --model tiny.gguf
    .venv/bin/python bench/real_llamacpp/check.py --url http://127.0.0.1:8080

Prints a table and a summary line; exit status 1 on any mismatch, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import stop_process, table

SRC = Path(__file__).resolve().parents[2] / "src"
IGNORED_HEADERS = {"date", "connection", "keep-alive", "transfer-encoding", "content-length"}
VOLATILE = [
    (re.compile(rb'"id":"[^"]*"'), rb'"id":"*"'),  # string ids only: token ids are numbers
    (re.compile(rb'"created":\d+'), rb'"created":0'),
    (re.compile(rb'"timings":\{[^}]*\}'), rb'"timings":{}'),
]
MODES = ("off", "logprobs")

# Non-ASCII prompts (accents, CJK, emoji: byte-split tokens), and the prompts of
# make_tiny.py's model whose answers llama.cpp gives a logprobs entry per token, or that end on
# the end-of-sequence token, so that every branch of the token check is reached.
CHAT_ASKS = [{"role": "user", "content": "Un café crème à Zürich? 東京の天気は 👋"}]
CHAT_WHOLE = [{"role": "user", "content": "The server answers in JSON"}]
CHAT_CUT = [{"role": "user", "content": "The weather is nice"}]  # length ends in a character
CHAT_EOS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "señor"}]
PROMPT = "Once upon a time, à Zürich, 你好 🙂"
PROMPT_WHOLE = "Once upon a time"
BASE = {"model": "tiny", "temperature": 0, "seed": 7}


@dataclass(frozen=True)
class Case:
    """One exchange: the path and body sent, and what llama.cpp should end it with."""

    name: str
    path: str
    body: dict[str, Any]
    finish: str  # the finish_reason the case is built to reach

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def asks_logprobs(self) -> bool:
        lp = self.body.get("logprobs")
        return lp is True or (isinstance(lp, int) and not isinstance(lp, bool) and lp > 0)

    @property
    def chat(self) -> bool:
        return "messages" in self.body


def _cases() -> list[Case]:
    chat = {**BASE, "messages": CHAT_ASKS, "max_tokens": 12}
    lp = {"logprobs": True, "top_logprobs": 2}
    cmpl = {**BASE, "prompt": PROMPT, "max_tokens": 12}
    usage = {"stream_options": {"include_usage": True}}
    stop = {"stop": [" ", "e"], "max_tokens": 40}
    whole = {**chat, "messages": CHAT_WHOLE, "max_tokens": 10, **lp}
    eos = {**chat, "messages": CHAT_EOS, "max_tokens": 20, **lp}
    return [
        Case("chat", "/v1/chat/completions", chat, "length"),
        Case("chat stream", "/v1/chat/completions", {**chat, "stream": True}, "length"),
        Case("chat logprobs", "/v1/chat/completions", {**chat, **lp}, "length"),
        Case("chat stream logprobs", "/v1/chat/completions",
             {**chat, **lp, "stream": True, **usage}, "length"),
        Case("chat ascii logprobs", "/v1/chat/completions", whole, "length"),
        Case("chat ascii stream logprobs", "/v1/chat/completions",
             {**whole, "stream": True}, "length"),
        Case("chat stream cut logprobs", "/v1/chat/completions",
             {**chat, "messages": CHAT_CUT, "max_tokens": 5, **lp, "stream": True}, "length"),
        Case("chat eos logprobs", "/v1/chat/completions", eos, "stop"),
        Case("chat eos stream logprobs", "/v1/chat/completions", {**eos, "stream": True}, "stop"),
        Case("chat stop", "/v1/chat/completions", {**chat, **stop}, "stop"),
        Case("chat stream stop logprobs", "/v1/chat/completions",
             {**chat, **stop, **lp, "stream": True}, "stop"),
        Case("cmpl", "/v1/completions", cmpl, "length"),
        Case("cmpl stream", "/v1/completions", {**cmpl, "stream": True}, "length"),
        Case("cmpl logprobs", "/v1/completions", {**cmpl, "logprobs": 2}, "length"),
        Case("cmpl stream logprobs", "/v1/completions",
             {**cmpl, "logprobs": 2, "stream": True}, "length"),
        Case("cmpl ascii logprobs", "/v1/completions",
             {**cmpl, "prompt": PROMPT_WHOLE, "max_tokens": 10, "logprobs": 1}, "length"),
        Case("cmpl stop", "/v1/completions", {**cmpl, **stop}, "stop"),
        Case("cmpl stream stop", "/v1/completions", {**cmpl, **stop, "stream": True}, "stop"),
        Case("api/chat", "/api/chat", {**chat, "max_tokens": 8}, "length"),
        Case("api/chat stream", "/api/chat", {**chat, "max_tokens": 8, "stream": True}, "length"),
    ]  # fmt: skip


CASES = _cases()


@dataclass
class Reply:
    """What a client received: status, headers (as sent, minus connection ones) and raw body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def normalized(self) -> bytes:
        data = self.body
        for pattern, repl in VOLATILE:
            data = pattern.sub(repl, data)
        return data

    def answer(self) -> tuple[str | None, str]:
        """The first choice's finish_reason and text, from a JSON body or an SSE stream."""
        if self.body.startswith(b"data:"):
            finish, text = None, ""
            for line in self.body.decode().splitlines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                for choice in json.loads(line[5:]).get("choices", []):
                    if choice.get("index", 0) != 0:
                        continue
                    part = choice.get("text")
                    if part is None:
                        part = (choice.get("delta") or {}).get("content")
                    text += part or ""
                    finish = choice.get("finish_reason") or finish
            return finish, text
        choice = json.loads(self.body)["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        return choice["finish_reason"], text or ""


@dataclass
class Row:
    """One exchange through one proxy, and the problems found with it."""

    case: Case
    mode: str
    bytes_equal: str = "-"
    records: int = 0
    source: str = "-"
    decode: str = "-"
    problems: list[str] = field(default_factory=list)
    #: What the case did not reach (another CPU's arithmetic may end the tiny model's answer
    #: elsewhere): less coverage, no fault of the proxy's, so no mismatch.
    notes: list[str] = field(default_factory=list)


def post(client: httpx.Client, url: str, case: Case) -> Reply:
    raw = json.dumps(case.body, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json"}
    with client.stream("POST", url + case.path, content=raw, headers=headers) as r:
        body = b"".join(r.iter_raw())
        kept = [(k.lower(), v) for k, v in r.headers.multi_items()]
        return Reply(r.status_code, [h for h in kept if h[0] not in IGNORED_HEADERS], body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tokentrail(*args: str, **kwargs: Any) -> Any:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen([sys.executable, "-m", "tokentrail", *args], env=env, **kwargs)


def _last_line(log: Path) -> str:
    """The log's last line: the temporary directory holding it is gone once the check ends."""
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(it printed nothing)"


@contextmanager
def serving(name: str, cmd: list[str], port: int, probe: str, log: Path) -> Iterator[str]:
    """``cmd`` started (output to ``log``), its base URL once ``probe`` answers 200; stopped
    on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}: {_last_line(log)}")
            try:
                if httpx.get(url + probe, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not answering {probe} after 60 s: {_last_line(log)}")
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc)


def llama_server(binary: Path, model: Path, log: Path) -> AbstractContextManager[str]:
    """A llama-server on a free port, up and healthy (a context manager of its URL)."""
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-c", "512", "-np", "2", "-t", "1"]  # fmt: skip
    return serving("llama-server", cmd, port, "/health", log)


@dataclass
class Proxy:
    """A ``tokentrail serve`` subprocess and its ledger."""

    mode: str
    url: str
    ledger: Path
    proc: subprocess.Popen[bytes]
    stderr: list[str]

    def records(self) -> list[dict[str, Any]]:
        files = sorted(self.ledger.glob("logs/*/segments/*/*.jsonl"))
        return [json.loads(ln) for f in files for ln in f.read_bytes().splitlines() if ln]


@contextmanager
def proxy(upstream: str, mode: str, tmp: Path, key: Path) -> Iterator[Proxy]:
    """``tokentrail serve`` on a free port in front of ``upstream``; SIGTERM on exit."""
    ledger = tmp / f"ledger-{mode}"
    args = ["serve", "--upstream", upstream, "--listen", "127.0.0.1:0", "--ledger", str(ledger),
            "--key", str(key), "--log-id", f"llamacpp-{mode}",
            "--request-token-data", mode]  # fmt: skip
    proc = tokentrail(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        url = None
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace").rstrip())
            if "listening on " in lines[-1]:
                url = lines[-1].split("listening on ", 1)[1].strip()
                break
        if url is None:
            raise RuntimeError("proxy did not start:\n" + "\n".join(lines))
        stream = proc.stderr
        threading.Thread(
            target=lambda: lines.extend(ln.decode() for ln in stream), daemon=True
        ).start()
        yield Proxy(mode, url, ledger, proc, lines)
    finally:
        stop_process(proc)


class Detokenizer:
    """The server's own ``/detokenize``, and which ids are special tokens (not text)."""

    def __init__(self, client: httpx.Client, url: str) -> None:
        self.client, self.url = client, url
        self._special: dict[int, bool] = {}

    def text(self, ids: list[int]) -> str:
        r = self.client.post(self.url + "/detokenize", json={"tokens": ids})
        r.raise_for_status()
        return str(r.json()["content"])

    def _tokenize(self, piece: str, parse_special: bool) -> list[int]:
        body = {"content": piece, "add_special": False, "parse_special": parse_special}
        r = self.client.post(self.url + "/tokenize", json=body)
        r.raise_for_status()
        return [t if isinstance(t, int) else t["id"] for t in r.json()["tokens"]]

    def is_special(self, token: int) -> bool:
        """A token whose piece is one id only when special tokens are parsed (``<|im_end|>``)."""
        if token not in self._special:
            piece = self.text([token])
            self._special[token] = (
                self._tokenize(piece, True) == [token] != self._tokenize(piece, False)
            )
        return self._special[token]


def decodes_to(case: Case, decoded: str, text: str) -> str | None:
    """How the decoded ids match the text the client got, or None when they do not: equal,
    or, on an answer ended by a stop string, the text plus the start (or all) of that string,
    which llama.cpp cuts from the text but not from the tokens."""
    if decoded == text:
        return "yes"
    stops = case.body.get("stop", [])
    rest = decoded[len(text) :]
    if (
        rest
        and decoded.startswith(text)
        and any(s.startswith(rest) or rest.startswith(s) for s in stops)
    ):
        return f"yes, + {rest!r} of a stop string"
    return None


def check_tokens(row: Row, rec: dict[str, Any], detok: Detokenizer) -> None:
    """(c): recorded ids decode to the recorded text; a missing sequence is accounted for."""
    source = rec.get("output_token_source")
    row.source = str(source)
    asked = row.mode == "logprobs" or row.case.asks_logprobs
    text = rec["output_text"]
    if source == "upstream-ids":
        ids = rec["output_tokens"]
        match = decodes_to(row.case, detok.text(ids), text)
        if match is None:  # special tokens (the end of sequence) are no part of the text
            text_ids = [t for t in ids if not detok.is_special(t)]
            if len(text_ids) < len(ids):
                match = decodes_to(row.case, detok.text(text_ids), text)
                if match is not None:
                    match += f", less {len(ids) - len(text_ids)} special"
        row.decode = match or "no"
        if match is None:
            row.problems.append(f"ids {ids} decode to {detok.text(ids)!r}, recorded text {text!r}")
    elif source == "none":
        missing = rec.get("tokentrail.output_tokens_missing")
        if asked:
            row.decode = f"{missing} missing"
            if not (isinstance(missing, int) and missing > 0):
                row.problems.append(
                    f"no tokens although logprobs were asked for, and no count of the missing"
                    f" (tokentrail.output_tokens_missing={missing!r},"
                    f" gen_ai.usage.output_tokens={rec.get('gen_ai.usage.output_tokens')!r})"
                )
        elif missing is not None:
            row.problems.append(f"missing={missing!r} without logprobs")
    else:
        row.problems.append(f"unexpected output_token_source {source!r}")


def check_exchange(
    client: httpx.Client, upstream: str, px: Proxy, case: Case, detok: Detokenizer
) -> Row:
    row = Row(case, px.mode)
    # The first answer to a new prompt (evaluated in one batch) and later ones (prompt from the
    # slot's cache, last token evaluated again) differ in the last digits of the logprobs: warm
    # the cache so that the direct and the proxied call both find it.
    post(client, upstream, case)
    before = len(px.records())
    direct = post(client, upstream, case)
    proxied = post(client, px.url, case)
    new = px.records()[before:]

    # (a) bytes and headers
    same = direct.normalized() == proxied.normalized()
    row.bytes_equal = "yes" if same else "no"
    if not same:
        again = post(client, upstream, case)
        if again.normalized() != direct.normalized():
            row.bytes_equal = "server nondeterministic"
        row.problems.append(
            f"body differs:\n  direct  {direct.body[:400]!r}\n  proxied {proxied.body[:400]!r}"
        )
    if direct.status != proxied.status:
        row.problems.append(f"status {direct.status} direct, {proxied.status} proxied")
    if direct.headers != proxied.headers:
        row.problems.append(f"headers {direct.headers} direct, {proxied.headers} proxied")
    if direct.status != 200:
        row.problems.append(f"llama-server answered {direct.status}: {direct.body[:200]!r}")
        return row
    finish, text = proxied.answer()
    if finish != case.finish:
        row.notes.append(f"case meant to end on {case.finish!r}, llama.cpp ended on {finish!r}")

    # (b) one record, matching what the client got
    row.records = len(new)
    if len(new) != 1:
        row.problems.append(f"{len(new)} records for one exchange")
        return row
    rec = new[0]
    want = "openai.chat" if case.chat else "openai.completions"
    for key, expected in (("api", want), ("stop_reason", finish), ("output_text", text)):
        if rec.get(key) != expected:
            row.problems.append(f"record {key} {rec.get(key)!r}, client got {expected!r}")

    # (c) the tokens
    check_tokens(row, rec, detok)
    return row


def verify(ledger: Path, public_key: Path, state: Path) -> tuple[int, str]:
    """(d): ``tokentrail verify`` over a ledger whose proxy has stopped."""
    proc = tokentrail(
        "verify", "--ledger", str(ledger), "--public-key", str(public_key), "--all",
        "--require-sealed", "--state", str(state),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out.decode(errors="replace").strip()


def keygen(tmp: Path, name: str) -> Path:
    """A signing key made by ``tokentrail keygen`` in ``tmp`` (its ``verifier.pub`` beside)."""
    key = tmp / "signing.key"
    proc = tokentrail("keygen", "--name", name, "--out", str(key),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"tokentrail keygen failed: {out.decode(errors='replace')}")
    return key


def run(args: argparse.Namespace, tmp: Path) -> int:
    key = keygen(tmp, "llamacpp-check")
    rows: list[Row] = []
    verdicts: list[tuple[str, int, str]] = []
    with ExitStack() as stack:
        upstream = args.url or stack.enter_context(
            llama_server(args.server, args.model, tmp / "llama-server.log")
        )
        # llama-server closes the connection after every streamed answer without saying so
        # (no "Connection: close"); a pooled connection would race that close
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        client = stack.enter_context(httpx.Client(timeout=120, limits=no_reuse))
        detok = Detokenizer(client, upstream)
        for mode in MODES:
            with proxy(upstream, mode, tmp, key) as px:
                rows += [check_exchange(client, upstream, px, case, detok) for case in CASES]
                status = stop_process(px.proc)
                if status != 0:
                    verdicts.append((mode, status, "proxy exit status after SIGTERM"))
            code, out = verify(px.ledger, tmp / "verifier.pub", tmp / f"state-{mode}")
            verdicts.append((mode, code, out.splitlines()[-1] if out else ""))

    print(
        table(
            ["exchange", "proxy mode", "bytes equal", "records", "token source",
             "ids decode to text", "result"],
            [[r.case.name, r.mode, r.bytes_equal, r.records, r.source, r.decode,
              "ok" if not r.problems else "MISMATCH"] for r in rows],
        )
    )  # fmt: skip
    for r in rows:
        for p in r.problems:
            print(f"{r.case.name} [{r.mode}]: {p}")
        for n in r.notes:
            print(f"{r.case.name} [{r.mode}]: note: {n}")
    for mode, code, line in verdicts:
        print(f"verify [{mode}]: exit {code}: {line}")
    bad = sum(bool(r.problems) for r in rows) + sum(code != 0 for _, code, _ in verdicts)
    print(
        f"{len(CASES)} exchanges x {len(MODES)} proxy modes: "
        + ("all ok" if not bad else f"{bad} MISMATCHES")
        + f"; ledgers verified: {sum(code == 0 for _, code, _ in verdicts)}/{len(verdicts)}"
    )
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", type=Path, help="llama-server binary to start")
    parser.add_argument("--model", type=Path, help="GGUF model for --server")
    parser.add_argument("--url", help="a running llama-server instead (http://host:port)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not args.url and not (args.server and args.model):
        parser.error("give --server and --model, or --url")
    return run_in_tmp("check.py", run, args, keep=args.keep)


def run_in_tmp(
    name: str,
    run: Callable[[argparse.Namespace, Path], int],
    args: argparse.Namespace,
    *,
    keep: bool = False,
) -> int:
    """``run(args, tmp)`` in a fresh temporary directory, removed after unless ``keep``; what
    stops it from running is one line on stderr and exit 2."""
    # SIGTERM unwinds like Ctrl-C, so the servers and proxies are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="tokentrail-llamacpp-"))
    try:
        return run(args, tmp)
    except (RuntimeError, OSError, httpx.HTTPError) as exc:
        print(f"{name}: could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
