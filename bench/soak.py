"""Soak: the proxy under a fixed rate of mixed streamed/non-streamed traffic for N minutes.

Starts the simulator and ``tokentrail serve`` (strict durability, a local ledger) as
subprocesses, sends exchanges at ``--rate`` per second (alternating streamed and non-streamed,
chat and completions) from an asyncio load generator, samples the proxy's RSS every
``--sample`` seconds, and at the end prints throughput, latency percentiles, the RSS series and
whether every completed exchange has its record. Memory growth is measured from the first
sample taken after a warm-up (``--warmup`` seconds) to the last.

    python bench/soak.py --minutes 10 --rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def spawn(args: list[str], marker: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``tokentrail ARGS``; return it and the first URL on its line holding ``marker``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokentrail", *args],
        stderr=subprocess.STDOUT, stdout=subprocess.PIPE, env=env(),
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        seen.append(line)
        found = re.search(r"http://\S+", line)
        if marker in line and found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
            return proc, found.group(0)
    raise RuntimeError("did not start: " + "".join(seen))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def one(session: aiohttp.ClientSession, url: str, i: int) -> tuple[bool, float]:
    stream = i % 2 == 0
    if i % 4 < 2:
        path = "/v1/completions"
        body: dict[str, Any] = {"model": "llama3.2:1b", "prompt": f"soak {i}", "stream": stream}
    else:
        path = "/v1/chat/completions"
        body = {"model": "llama3.2:1b", "stream": stream,
                "messages": [{"role": "user", "content": f"soak {i}"}]}  # fmt: skip
    t0 = time.perf_counter()
    try:
        async with session.post(url + path, json=body) as resp:
            await resp.read()
            return resp.status == 200, time.perf_counter() - t0
    except aiohttp.ClientError:
        return False, time.perf_counter() - t0


async def drive_all(
    url: str, pid: int, seconds: float, rate: float, sample: float
) -> dict[str, Any]:
    """Send at ``rate``/s for ``seconds``, sampling the proxy's RSS; count every outcome."""
    results: list[tuple[bool, float]] = []
    rss: list[tuple[float, int]] = []
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def run(i: int) -> None:
            results.append(await one(session, url, i))

        async def sampler() -> None:
            while True:
                rss.append((time.perf_counter() - start, rss_kb(pid)))
                await asyncio.sleep(sample)

        sampling = asyncio.ensure_future(sampler())
        pending: set[asyncio.Task[None]] = set()
        i = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.ensure_future(run(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        await asyncio.gather(*pending)
        sampling.cancel()
    rss.append((time.perf_counter() - start, rss_kb(pid)))
    return {
        "sent": i,
        "ok": sum(1 for good, _ in results if good),
        "failed": sum(1 for good, _ in results if not good),
        "latencies": [lat for _, lat in results],
        "rss": rss,
        "seconds": time.perf_counter() - start,
    }


def count_records(ledger: Path) -> tuple[int, int]:
    lines = dupes = 0
    seen: set[str] = set()
    for path in sorted(ledger.rglob("segments/*/*.jsonl")):
        for line in path.read_bytes().splitlines():
            rec = json.loads(line)
            lines += 1
            dupes += rec["event_id"] in seen
            seen.add(rec["event_id"])
    return lines, dupes


def soak(seconds: float, rate: float, sample: float, warmup: float, work: Path) -> dict[str, Any]:
    """Run one soak in ``work``; return the figures."""
    sim, sim_url = spawn(["sim", "--mode", "openai", "--listen", "127.0.0.1:0"], "serving")
    proxy = None
    try:
        proxy, proxy_url = spawn(
            ["serve", "--upstream", sim_url, "--listen", "127.0.0.1:0", "--ledger",
             str(work / "ledger"), "--key", str(work / "signing.key"), "--log-id", "soak"],
            "listening on ",
        )  # fmt: skip
        out = asyncio.run(drive_all(proxy_url, proxy.pid, seconds, rate, sample))
    finally:
        for proc in (proxy, sim):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    records, dupes = count_records(work / "ledger")
    steady = [kb for t, kb in out["rss"] if t >= warmup] or [out["rss"][-1][1]]
    out.update(
        records=records,
        duplicates=dupes,
        rss_start_kb=steady[0],
        rss_end_kb=steady[-1],
        rss_max_kb=max(kb for _, kb in out["rss"]),
        growth=(steady[-1] - steady[0]) / steady[0] if steady[0] else float("nan"),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=50.0, help="exchanges per second")
    parser.add_argument("--sample", type=float, default=5.0, help="RSS sample interval, s")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the baseline")
    parser.add_argument(
        "--json", type=Path, help="also write the figures to this file (for tests/test_soak.py)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tt-soak-") as tmp:
        r = soak(args.minutes * 60, args.rate, args.sample, args.warmup, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps(r))
    lat = r["latencies"]
    print(
        f"soak: {args.minutes:g} min at {args.rate:g}/s (mixed streamed/non-streamed, chat and"
        " completions, OpenAI dialect), strict durability"
    )
    print(
        "| sent | ok | failed | records | duplicates | throughput/s | p50 ms | p99 ms |"
        " RSS start MB | RSS end MB | growth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['sent']} | {r['ok']} | {r['failed']} | {r['records']} | {r['duplicates']} |"
        f" {r['ok'] / r['seconds']:.1f} | {pct(lat, 50) * 1e3:.2f} | {pct(lat, 99) * 1e3:.2f} |"
        f" {r['rss_start_kb'] / 1024:.1f} | {r['rss_end_kb'] / 1024:.1f} |"
        f" {r['growth'] * 100:+.1f}% |"
    )
    print("RSS over time (s, MB):", ", ".join(f"{t:.0f}:{kb / 1024:.1f}" for t, kb in r["rss"]))
    if r["failed"] or r["records"] != r["ok"] or r["duplicates"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
