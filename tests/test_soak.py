"""The 60-second soak of bench/soak.py: no loss, no duplicate, flat memory (growth under 10%)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from soak import soak


def test_sixty_seconds_flat_and_lossless(tmp_path: Path) -> None:
    """A minute at 40 exchanges/s: every one answered and recorded once; RSS grows < 10%."""
    result = soak(seconds=60, rate=40, sample=5, warmup=10, work=tmp_path)
    assert (0, result["sent"]) == (result["failed"], result["ok"])
    assert (result["ok"], 0) == (result["records"], result["duplicates"])
    assert result["growth"] < 0.10, result["rss"]
