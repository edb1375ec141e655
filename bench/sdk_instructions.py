"""What the SDK wrapper adds per call, in CPU instructions counted by valgrind, not timed.

``bench/sdk.py`` times the wrapper in microseconds, which a busy or virtual machine moves by more
than the wrapper costs. This counts instead (``valgrind --tool=callgrind``, one count per thread),
which the machine's load does not move: two runs of the same code counted the bare calls within
0.1 % of each other; the wrapper's added count moved by up to 20,000 instructions a call. What
still depends on timing (how often the ledger's thread wakes, which thread runs a garbage
collection) is spread over the calls, so few calls give unsteady figures: with ``--calls 3``
two runs counted the writer's part of a plain openai call at 88,205 and 391,902 a call.

Each case (the ``ollama`` and ``openai`` clients, streamed and not) runs in three child processes
under callgrind, identical but for their last step: the setup alone (clients, recorder, warm-up
calls), then ``--calls`` bare calls, then as many wrapped ones. The server is not a process: the
response the simulator gave that call (recorded first, over loopback) is played back by an
``httpx.MockTransport``, one SSE event or NDJSON line a read, as the simulator's socket gives
them, so every run reads the same bytes in the same pieces. Per call:

- **bare**: the bare client's instructions (bare run minus setup run, caller's thread);
- **added, caller**: the wrapped run's caller thread minus the bare run's: the wrapper's own work
  on the caller's thread;
- **writer**: the ledger's threads in the wrapped run minus the bare run: building, encoding,
  hashing and writing the record (under ``strict`` durability the caller builds it, so most of it
  moves to the caller's column).

The µs columns convert at the rate the bare client ran natively in this run (its instructions
over its CPU time, measured in a child without valgrind): what the wrapper's work would take at
the client's own speed. Work that runs slower than that (cache misses, a wake-up) is not in it:
``bench/sdk.py`` measures the real thing.

    .venv/bin/python bench/sdk_instructions.py                   # 50 calls a count, ~10 min
    .venv/bin/python bench/sdk_instructions.py --calls 20 --case "openai chat, streamed"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import positive, table
from sdk import calls, clients, start_sim

WARMUP = 20


class Recording(httpx.HTTPTransport):
    """A transport that keeps the last response it gave, read whole."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[str, Any] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        body = response.read()
        kind = response.headers.get("content-type", "")
        self.kept = {"status": response.status_code, "type": kind, "body": body.decode()}
        return httpx.Response(response.status_code, headers={"content-type": kind}, content=body)


def record_bodies(workdir: Path) -> None:
    """Each case's response as the simulator sends it, kept in ``workdir/<n>.json``."""
    sims = [start_sim("ollama"), start_sim("openai")]
    try:
        for n, (name, (kind, fn)) in enumerate(calls().items()):
            transport = Recording()
            fn(clients(sims[0][1], sims[1][1], transport=transport)[kind])
            (workdir / f"{n}.json").write_text(json.dumps({"case": name, **transport.kept}))
    finally:
        for proc, _ in sims:
            proc.terminate()
            proc.wait()


def _reads(body: bytes, content_type: str) -> list[bytes]:
    """The body in the pieces a socket gives a fast server's stream: an event or line each."""
    if content_type.startswith("text/event-stream"):
        return [event + b"\n\n" for event in body.split(b"\n\n") if event]
    if "ndjson" in content_type:
        return body.splitlines(keepends=True)
    return [body]


def child(spec_path: Path, mode: str, n: int, durability: str) -> None:
    """One measured process: the setup, then ``n`` calls of ``mode`` ("setup": none)."""
    from tokentrail import Signer
    from tokentrail._sdk import Recorder, audit

    spec = json.loads(spec_path.read_text())
    kind, fn = calls()[spec["case"]]
    reads = _reads(spec["body"].encode(), spec["type"])

    class Replay(httpx.SyncByteStream):
        def __iter__(self) -> Any:
            yield from reads

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            spec["status"], headers={"content-type": spec["type"]}, stream=Replay()
        )

    bare = clients("http://sim", "http://sim", transport=httpx.MockTransport(answer))[kind]
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder.open(
            Path(tmp),
            key=Signer.generate("bench"),
            log_id="bench",
            durability=durability,
            seal_interval_s=3600,  # one seal, at close, in every run: none at a run's own time
        )
        wrapped = audit(bare, ledger=rec)
        writer = rec.local_writer()
        for _ in range(WARMUP):
            fn(bare)
            fn(wrapped)
        settle(writer, WARMUP)
        if mode == "rate":  # natively: the bare client's CPU time per call, µs
            cpu = []
            for _ in range(5):
                c0 = time.process_time()
                for _ in range(n):
                    fn(bare)
                cpu.append((time.process_time() - c0) / n * 1e6)
            print(statistics.median(cpu))
        elif mode != "setup":
            client = wrapped if mode == "wrapped" else bare
            for _ in range(n):
                fn(client)
            settle(writer, WARMUP + (n if mode == "wrapped" else 0))
        rec.close()


def settle(writer: Any, records: int) -> None:
    """Wait until the ledger's own thread has written ``records`` (a ``flush`` would build what
    it has not yet taken on this thread, the caller's, by the timing of the run)."""
    deadline = time.monotonic() + 120
    while writer.size < records:
        if time.monotonic() > deadline:  # a record lost (its build raised): say so, not hang
            raise SystemExit(f"the ledger wrote {writer.size} records of {records} in 120 s")
        time.sleep(0.05)


def counted(spec: Path, mode: str, n: int, durability: str, out: Path) -> tuple[int, int]:
    """(caller thread, other threads) instructions of one child run under callgrind."""
    prefix = out / f"{spec.stem}-{mode}"
    run = subprocess.run(
        [
            "valgrind", "--tool=callgrind", "--separate-threads=yes",
            f"--callgrind-out-file={prefix}.%p", sys.executable, __file__,
            "--child", str(spec), mode, str(n), durability,
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts, the same count
    )  # fmt: skip
    _check(run, f"{spec.stem} {mode} under valgrind")
    per_thread: dict[int, int] = {}
    for path in out.glob(f"{prefix.name}.*-*"):  # <prefix>.<pid>-<thread>, 01 the main one
        thread = int(path.name.rsplit("-", 1)[1])
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("summary:"):
                per_thread[thread] = int(line.split()[1])
                break
    if 1 not in per_thread:
        raise SystemExit(f"{spec.stem} {mode} under valgrind: no count for its main thread")
    return per_thread.pop(1), sum(per_thread.values())


def _check(run: subprocess.CompletedProcess[str], what: str) -> None:
    """A child that failed ends the bench with one line: its own last line of error."""
    if run.returncode != 0:
        ours = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("==")]
        raise SystemExit(f"{what} exited {run.returncode}: {(ours or ['no output'])[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=positive, default=50, help="calls per count")
    parser.add_argument("--durability", choices=["async", "strict"], default="async")
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec, mode, n, durability = args.child
        child(Path(spec), mode, int(n), durability)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    names = list(calls())
    for wanted in args.case or []:
        if wanted not in names:
            parser.error(f"--case: one of {', '.join(map(repr, names))}; not {wanted!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        record_bodies(work)
        specs = [
            work / f"{n}.json" for n, name in enumerate(names) if not args.case or name in args.case
        ]
        jobs = [(spec, mode) for spec in specs for mode in ("setup", "bare", "wrapped")]
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            runs = [
                pool.submit(counted, spec, mode, args.calls, args.durability, work)
                for spec, mode in jobs
            ]
            counts = {job: run.result() for job, run in zip(jobs, runs, strict=True)}
        for spec in specs:
            rate_run = subprocess.run(
                [sys.executable, __file__, "--child", str(spec), "rate", "200", args.durability],
                capture_output=True, text=True,
            )  # fmt: skip
            _check(rate_run, f"{spec.stem} rate")
            bare_us = float(rate_run.stdout.split()[-1])
            setup, bare, wrapped = (counts[(spec, m)] for m in ("setup", "bare", "wrapped"))
            per_bare = (bare[0] - setup[0]) / args.calls
            added = (wrapped[0] - bare[0]) / args.calls
            writer = (wrapped[1] - bare[1]) / args.calls
            per_us = per_bare / bare_us
            rows.append(
                (
                    json.loads(spec.read_text())["case"],
                    f"{per_bare:,.0f}",
                    f"{added:+,.0f}",
                    f"{added / per_bare:+.2%}",
                    f"{writer:+,.0f}",
                    f"{bare_us:.0f}",
                    f"{added / per_us:+.1f}",
                    f"{writer / per_us:+.1f}",
                )
            )
    print(
        f"tokentrail SDK wrapper, instructions per call ({args.calls} calls a count,"
        f" {args.durability} durability, callgrind)"
    )
    print(
        table(
            [
                "case",
                "bare instr",
                "added instr, caller",
                "added %",
                "writer instr",
                "bare CPU µs",
                "≈ added µs, caller",
                "≈ writer µs",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
