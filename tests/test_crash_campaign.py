"""The crash campaign of bench/crash_campaign.py, CI-sized: SIGKILLs under load, then account."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from crash_campaign import run_campaign


def test_kills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """Five SIGKILLs of serve --s3 under load: 0 lost, 0 duplicated, both verifies pass."""
    result = run_campaign(kills=5, work=tmp_path, seed=7)
    assert result["completed"] > 0
    assert {} == result["duplicates"]
    assert [] == result["completed_without_one_record"]
    assert [] == result["reached_without_one_record"]
    assert 0 == result["verify_local"][0], result["verify_local"]
    assert 0 == result["verify_s3"][0], result["verify_s3"]
    assert str(result["records"]) == result["count_s3"]
