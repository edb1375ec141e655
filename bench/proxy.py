"""What the auditing proxy adds: the simulator reached directly vs through ``tokentrail serve``.

One run starts the simulator (no model delays) and the proxy (strict durability, a local ledger
in a temporary directory) as subprocesses, then for each of non-streamed and streamed exchanges
at concurrency 1, 16 and 64 sends the same requests directly and through the proxy, alternating,
and prints one table: latency p50/p99 of each, the latency the proxy adds (p50/p99), time to
first token (streamed; first chunk carrying text), added TTFT, and requests per second.

    .venv/bin/python bench/proxy.py                 # Ollama dialect, 400 requests per cell
    .venv/bin/python bench/proxy.py --mode openai --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "llama3.2:1b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tokentrail", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_up(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    await r.read()
                    return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


def request_for(mode: str, stream: bool) -> tuple[str, dict[str, object]]:
    if mode == "openai":
        return "/v1/chat/completions", {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "max_tokens": 32 if stream else 16,
            "stream": stream,
        }
    return "/api/generate", {
        "model": MODEL,
        "prompt": "Why is the sky blue?",
        "options": {"num_predict": 32 if stream else 16},
        "stream": stream,
    }


@dataclass
class Result:
    latencies: list[float]
    ttfts: list[float]
    chunks: int
    seconds: float

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds


async def run_cell(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], total: int, conc: int
) -> Result:
    latencies: list[float] = []
    ttfts: list[float] = []
    chunks = 0
    todo = iter(range(total))

    async def worker() -> None:
        nonlocal chunks
        for _ in todo:
            t0 = time.perf_counter()
            first = None
            async with session.post(url, json=body) as r:
                async for _chunk in r.content.iter_any():
                    if first is None:
                        first = time.perf_counter()
                    chunks += 1
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            ttfts.append((first or t1) - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return Result(latencies, ttfts, chunks, time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ollama", "openai"], default="ollama")
    parser.add_argument("--requests", type=int, default=400, help="requests per cell")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--durability", choices=["strict", "async"], default="strict")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="tokentrail-bench-"))
    sim_port, proxy_port = free_port(), free_port()
    sim = spawn(["sim", "--mode", args.mode, "--listen", f"127.0.0.1:{sim_port}"])
    proxy = spawn([
        "serve", "--upstream", f"http://127.0.0.1:{sim_port}",
        "--listen", f"127.0.0.1:{proxy_port}", "--ledger", str(tmp / "ledger"),
        "--key", str(tmp / "signing.key"), "--log-id", "bench", "--durability", args.durability,
    ])  # fmt: skip
    direct, through = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{proxy_port}"
    probe = "/v1/models" if args.mode == "openai" else "/api/version"
    rows: list[tuple[str, ...]] = []
    try:
        await wait_up(direct + probe)
        await wait_up(through + probe)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for stream in (False, True):
                path, body = request_for(args.mode, stream)
                for conc in levels:
                    await run_cell(session, direct + path, body, min(50, args.requests), conc)
                    await run_cell(session, through + path, body, min(50, args.requests), conc)
                    d = await run_cell(session, direct + path, body, args.requests, conc)
                    p = await run_cell(session, through + path, body, args.requests, conc)
                    per_chunk = (
                        (statistics.median(p.latencies) - statistics.median(d.latencies))
                        * 1000.0
                        / max(1.0, p.chunks / len(p.latencies))
                    )
                    rows.append((
                        "streamed" if stream else "non-streamed", str(conc),
                        f"{d.pct(d.latencies, .5):.2f}", f"{p.pct(p.latencies, .5):.2f}",
                        f"{p.pct(p.latencies, .5) - d.pct(d.latencies, .5):+.2f}",
                        f"{p.pct(p.latencies, .99) - d.pct(d.latencies, .99):+.2f}",
                        f"{p.pct(p.ttfts, .5) - d.pct(d.ttfts, .5):+.2f}" if stream else "-",
                        f"{per_chunk:+.3f}" if stream else "-",
                        f"{d.rps:.0f}", f"{p.rps:.0f}",
                    ))  # fmt: skip
    finally:
        for proc in (proxy, sim):
            proc.terminate()
            proc.wait(15)
    head = (
        "exchange", "conc", "direct p50 ms", "proxy p50 ms", "added p50", "added p99",
        "added TTFT p50", "added/chunk p50", "direct req/s", "proxy req/s",
    )  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(f"tokentrail proxy overhead ({args.mode} dialect, {args.durability} durability, "
          f"{args.requests} requests per cell, ledger {tmp / 'ledger'})")  # fmt: skip
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    asyncio.run(main())
