"""The 60-second soak of bench/soak.py: no loss, no duplicate, flat memory (growth under 10%).

When the whole suite runs, ``conftest.py`` starts this soak as ``bench/soak.py`` in a
subprocess as soon as tests are collected (with pytest-xdist, the controller does, once), so its
minute of wall-clock time passes while the other tests run (they load the machine too, which the
soak must survive); this test then waits for its figures, in whichever worker it runs. Run
alone, the test runs the soak itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from conftest import SOAK_ARGS, soak_dir, soak_early
from soak import soak


def _figures(request: pytest.FixtureRequest, work: Path) -> dict[str, Any]:
    if not soak_early([item.nodeid for item in request.session.items]):
        return soak(**SOAK_ARGS, work=work)
    started = soak_dir(request.config)
    deadline = time.monotonic() + 600
    while not (started / "rc").exists():
        assert time.monotonic() < deadline, "the soak started early did not end within 600 s"
        time.sleep(0.5)
    rc = int((started / "rc").read_text())
    out, log = started / "soak.json", started / "soak.log"
    assert rc == 0 or out.exists(), f"bench/soak.py exited {rc}: {log.read_text()[-2000:]}"
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def test_sixty_seconds_flat_and_lossless(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A minute at 40 exchanges/s: every one answered and recorded once; RSS grows < 10%."""
    result = _figures(request, tmp_path)
    assert result["seconds"] >= SOAK_ARGS["seconds"]
    assert (0, result["sent"]) == (result["failed"], result["ok"])
    assert (result["ok"], 0) == (result["records"], result["duplicates"])
    assert result["growth"] < 0.10, result["rss"]
