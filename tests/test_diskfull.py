"""A full ledger disk: strict mode refuses (503, in the client's dialect) and recovers by itself.

The ledger lives on a small tmpfs mounted for the test (root only; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from test_proxy import start_proxy
from tokentrail._sim import SimConfig, sim_in_thread


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte."""
    filler = disk / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def ask(client: httpx.Client, url: str, path: str, stream: bool) -> httpx.Response:
    if path.startswith("/v1/"):
        body = {"model": "llama3.2:1b", "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    else:
        body = {"model": "llama3.2:1b", "prompt": "hi", "stream": stream}
    return client.post(url + path, json=body)


@pytest.mark.parametrize("min_free", ["1048576", "0"], ids=["space-check", "write-failure"])
@pytest.mark.parametrize(
    ("mode", "path"), [("ollama-0.4", "/api/generate"), ("openai", "/v1/chat/completions")]
)
def test_full_disk_refuses_then_recovers(
    small_disk: Path, mode: str, path: str, min_free: str
) -> None:
    """No unaudited response while the disk is full; service resumes when space returns."""
    with sim_in_thread(SimConfig(mode=mode)) as sim_url:
        proxy = start_proxy(small_disk, sim_url, "--min-free-bytes", min_free)
        try:
            with httpx.Client(timeout=10) as client:
                assert 200 == ask(client, proxy.url, path, stream=False).status_code
                before = len(proxy.records())
                filler = fill(small_disk)
                time.sleep(0.6)  # the free-space check runs twice a second
                answers = [ask(client, proxy.url, path, stream=False) for _ in range(5)]
                statuses = [a.status_code for a in answers]
                # A write may still fit in a file's last partial page; what must never happen
                # is a response without its record (checked below), and refusal must follow.
                assert set(statuses) <= {200, 503} and 503 == statuses[-1], statuses
                served_while_full = statuses.count(200)
                error = answers[-1].json()["error"]
                text = error if isinstance(error, str) else error["message"]
                assert text.startswith("tokentrail:")
                filler.unlink()
                time.sleep(1.2)  # past the retry pause after a failed write
                assert 200 == ask(client, proxy.url, path, stream=False).status_code
                assert 200 == ask(client, proxy.url, path, stream=True).status_code
        finally:
            proxy.stop()
    records = proxy.records()
    # Every 200 has its record; refused exchanges never reached the upstream.
    assert before + served_while_full + 2 == len(records)
    assert 0 == proxy.verify(small_disk / "state").returncode


def test_failed_write_on_a_fresh_segment_recovers(small_disk: Path) -> None:
    """A record refused by a full disk as the first of a new segment leaves that segment empty;
    when space returns, the writer goes on in it (it retried creating it, "File exists", and
    refused every record until restarted)."""
    from tokentrail._checkpoint import Signer
    from tokentrail._errors import StoreError
    from tokentrail._ledger import Ledger, LedgerConfig
    from tokentrail._record import Exchange

    config = LedgerConfig(
        small_disk / "ledger", "log", Signer.generate("t"), rotate_interval_s=0.2,
        seal_interval_s=3600,
    )  # fmt: skip
    with Ledger.open(config) as ledger:
        ledger.append(Exchange(model="m", api="sdk", stop_reason="stop", input_text="small"))
        time.sleep(0.3)  # the next append opens a new segment
        filler = small_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        os.close(fd)
        os.truncate(filler, filler.stat().st_size - (64 << 10))  # 64 KiB left: less than asked
        with pytest.raises(StoreError):
            ledger.append(Exchange(model="m", api="sdk", stop_reason="stop",
                                   input_text="x" * (1 << 20)))  # fmt: skip
        filler.unlink()
        time.sleep(0.3)  # a rotation is due again: the empty segment is closed and reopened
        for i in range(3):
            ledger.append(Exchange(model="m", api="sdk", stop_reason="stop", input_text=f"{i}"))
    lines = [
        line
        for seg in sorted((small_disk / "ledger").rglob("*.jsonl"))
        for line in seg.read_bytes().splitlines()
    ]
    assert 4 == len(lines)
