"""A slow disk: every fsync of the proxy takes 25 ms longer. Latency degrades; nothing is lost.

The delay is real: a small ``LD_PRELOAD`` library, built here with the C compiler, wraps libc's
``fsync`` and ``fdatasync`` in the proxy process. The product's code is not touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from test_proxy import start_proxy
from tokentrail._sim import SimConfig, sim_in_thread

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <unistd.h>
static int delay(void) { usleep(25000); return 0; }
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    delay(); return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    delay(); return real(fd);
}
"""


@pytest.fixture
def slow_fsync(tmp_path: Path) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the slow-fsync library")
    src, lib = tmp_path / "slowfsync.c", tmp_path / "slowfsync.so"
    src.write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    return str(lib)


def test_slow_fsync_degrades_latency_loses_nothing(
    tmp_path: Path, slow_fsync: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 25 ms fsyncs, 200 concurrent exchanges all complete, all recorded, all verified."""
    with sim_in_thread(SimConfig(mode="ollama-0.4")) as sim_url:
        monkeypatch.setenv("LD_PRELOAD", slow_fsync)
        proxy = start_proxy(tmp_path, sim_url)
        monkeypatch.delenv("LD_PRELOAD")
        try:

            def one(i: int) -> tuple[int, float]:
                body = {"model": "llama3.2:1b", "prompt": f"slow {i}", "stream": i % 2 == 0}
                t0 = time.perf_counter()
                with httpx.Client(timeout=30) as client:
                    status = client.post(proxy.url + "/api/generate", json=body).status_code
                return status, time.perf_counter() - t0

            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(one, range(200)))
        finally:
            proxy.stop()
    assert [200] * 200 == [status for status, _ in results]
    latencies = sorted(lat for _, lat in results)
    assert latencies[len(latencies) // 2] >= 0.025  # strict durability waits for the fsync
    records = proxy.records()
    assert 200 == len(records) == len({r["event_id"] for r in records})
    assert {f"slow {i}" for i in range(200)} == {r["input_text"] for r in records}
    assert 0 == proxy.verify(tmp_path / "state").returncode
    assert os.environ.get("LD_PRELOAD") is None
