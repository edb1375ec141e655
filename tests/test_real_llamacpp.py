"""The proxy in front of a real llama.cpp ``llama-server`` (``bench/real_llamacpp/check.py``).

Optional: it runs only when ``TOKENTRAIL_LLAMA_SERVER`` names a ``llama-server`` binary and
``TOKENTRAIL_LLAMA_MODEL`` a GGUF model, as ``bench/real_llamacpp/build.sh`` prints them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "bench" / "real_llamacpp" / "check.py"
SERVER = os.environ.get("TOKENTRAIL_LLAMA_SERVER", "")
MODEL = os.environ.get("TOKENTRAIL_LLAMA_MODEL", "")


@pytest.mark.skipif(
    not (SERVER and os.access(SERVER, os.X_OK) and MODEL and Path(MODEL).is_file()),
    reason="set TOKENTRAIL_LLAMA_SERVER and TOKENTRAIL_LLAMA_MODEL "
    "(bash bench/real_llamacpp/build.sh makes both)",
)
def test_proxy_against_real_llama_server() -> None:
    """check.py finds the client's bytes, the records and the token ids all in agreement."""
    result = subprocess.run(
        [sys.executable, str(CHECK), "--server", SERVER, "--model", MODEL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
