"""Crash campaign: SIGKILL ``tokentrail serve --s3`` again and again under load, then account.

Each round starts the proxy (strict durability, shipping to a local S3 server with Object Lock,
segments closed every second), drives streamed and non-streamed exchanges through the official
``ollama`` client from several threads, and SIGKILLs the proxy at a random moment — mid-stream,
mid-fsync, mid-upload or mid-checkpoint, wherever it happens to be. The simulator notes every
prompt that reached it. At the end:

- every exchange whose client received a complete response has exactly one record;
- every exchange that reached the upstream has exactly one record (``interrupted`` or
  ``client_disconnect`` when it did not complete);
- no record is duplicated, and ``verify`` (local) and ``verify --s3`` both exit 0, and
  ``count --s3`` equals the records.

    python bench/crash_campaign.py --kills 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from aiohttp import web  # noqa: E402

from s3server import MotoS3, use_dummy_credentials  # noqa: E402
from tokentrail._sim import SimConfig, make_app  # noqa: E402


class Sim:
    """The simulator in a thread, noting every prompt it receives."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.url = ""
        self._ready = threading.Event()

    def start(self) -> Sim:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        import asyncio
        import logging

        # A killed proxy leaves the simulator writing to closed sockets; that is expected here.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

        @web.middleware
        async def note(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST" and request.path == "/api/generate":
                with contextlib.suppress(ValueError, KeyError):
                    self.seen.add(json.loads(await request.read())["prompt"])
            return await handler(request)

        async def main() -> None:
            app = make_app(SimConfig(mode="ollama-0.4", ttft_ms=2, token_ms=3))
            app.middlewares.append(note)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def start_proxy(
    work: Path, sim: str, s3_url: str, endpoint: str
) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [
        sys.executable, "-m", "tokentrail", "serve", "--upstream", sim,
        "--listen", "127.0.0.1:0", "--ledger", str(work / "ledger"),
        "--key", str(work / "signing.key"), "--log-id", "campaign",
        "--s3", s3_url, "--s3-endpoint-url", endpoint, "--s3-rotate-seconds", "1",
        "--s3-interval", "0.3",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env())
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].strip()
            threading.Thread(target=lambda: [*proc.stderr], daemon=True).start()  # type: ignore[misc]
            return proc, url
    raise RuntimeError("proxy did not start")


def load(url: str, tag: str, stop: threading.Event, done: dict[str, bool]) -> None:
    """Exchanges until ``stop``; ``done[prompt]`` says whether the client got it all."""
    import ollama

    client = ollama.Client(host=url, timeout=30)
    i = 0
    while not stop.is_set():
        prompt = f"{tag}-{i}"
        i += 1
        done[prompt] = False
        try:
            if i % 2:
                last = None
                for part in client.generate(model="llama3.2:1b", prompt=prompt, stream=True):
                    last = part
                done[prompt] = bool(last is not None and last.done)
            else:
                done[prompt] = bool(client.generate(model="llama3.2:1b", prompt=prompt).done)
        except Exception:
            time.sleep(0.05)


def records(ledger: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((ledger / "logs" / "campaign" / "segments").glob("*/*.jsonl*")):
        from tokentrail._layout import iter_lines

        out += [json.loads(line) for _, line, ok in iter_lines(path) if ok]
    return out


def run_campaign(kills: int, work: Path, seed: int = 1, clients: int = 4) -> dict[str, Any]:
    """Run the campaign in ``work``; return the accounting (raises AssertionError on loss)."""
    rng = random.Random(seed)
    use_dummy_credentials()
    moto = MotoS3().start()
    bucket = moto.new_bucket()
    moto.client().put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 2555}},
        },
    )
    s3_url = f"s3://{bucket}/campaign"
    sim = Sim().start()
    done: dict[str, bool] = {}
    started = time.perf_counter()
    try:
        for round_no in range(kills + 1):
            proc, url = start_proxy(work, sim.url, s3_url, moto.endpoint)
            stop = threading.Event()
            threads = [
                threading.Thread(target=load, args=(url, f"r{round_no}c{c}", stop, done))
                for c in range(clients)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 2.5))
            if round_no < kills:
                proc.send_signal(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join()
            if round_no == kills:
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        elapsed = time.perf_counter() - started
        recs = records(work / "ledger")
        by_prompt = Counter(r["input_text"] for r in recs)
        completed = {p for p, ok in done.items() if ok}
        duplicates = {p: n for p, n in by_prompt.items() if n > 1}
        lost_complete = sorted(p for p in completed if by_prompt[p] != 1)
        lost_reached = sorted(p for p in sim.seen if by_prompt[p] != 1)
        stops = Counter(r["stop_reason"] for r in recs)
        pub = (work / "verifier.pub").read_text().strip()
        local = subprocess.run(
            [sys.executable, "-m", "tokentrail", "verify", "--ledger", str(work / "ledger"),
             "--public-key", pub, "--state", str(work / "state-local"), "--all"],
            env=env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        remote = subprocess.run(
            [sys.executable, "-m", "tokentrail", "verify", "--s3", s3_url, "--endpoint-url",
             moto.endpoint, "--public-key", pub, "--state", str(work / "state-s3"), "--all"],
            env=env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        count = subprocess.run(
            [sys.executable, "-m", "tokentrail", "count", "--s3", s3_url, "--endpoint-url",
             moto.endpoint],
            env=env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        moto.stop()
    return {
        "kills": kills,
        "seconds": elapsed,
        "exchanges_sent": len(done),
        "completed": len(completed),
        "reached_upstream": len(sim.seen),
        "records": len(recs),
        "stop_reasons": dict(stops),
        "duplicates": duplicates,
        "completed_without_one_record": lost_complete,
        "reached_without_one_record": lost_reached,
        "verify_local": (local.returncode, local.stdout.splitlines()[:3]),
        "verify_s3": (
            remote.returncode,
            remote.stdout.splitlines()[:3] + remote.stderr.splitlines()[:2],
        ),
        "count_s3": count.stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tt-crash-") as tmp:
        result = run_campaign(args.kills, Path(tmp), args.seed)
    ok = (
        not result["duplicates"]
        and not result["completed_without_one_record"]
        and not result["reached_without_one_record"]
        and result["verify_local"][0] == 0
        and result["verify_s3"][0] == 0
        and result["count_s3"] == str(result["records"])
    )
    print(
        "| kills | exchanges sent | completed | reached upstream | records | lost | duplicated"
        " | verify local | verify --s3 | count --s3 | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    lost = len(result["completed_without_one_record"]) + len(result["reached_without_one_record"])
    print(
        f"| {result['kills']} | {result['exchanges_sent']} | {result['completed']} |"
        f" {result['reached_upstream']} | {result['records']} | {lost} |"
        f" {len(result['duplicates'])} | exit {result['verify_local'][0]} |"
        f" exit {result['verify_s3'][0]} | {result['count_s3']} | {result['seconds']:.0f} |"
    )
    print("stop reasons:", result["stop_reasons"])
    if not ok:
        print(json.dumps(result, indent=2, default=str))
        sys.exit(1)


if __name__ == "__main__":
    main()
