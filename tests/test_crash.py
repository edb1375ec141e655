"""A proxy killed mid-exchange: on restart the exchange is recorded as ``interrupted`` (SPEC §6).

The proxy runs as a real subprocess in front of the simulator; SIGKILL leaves no chance to
clean up, so only what was on disk (and in the page cache) survives.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from test_proxy import start_proxy
from tokentrail._sim import SimConfig, sim_in_thread


@pytest.mark.parametrize(
    ("mode", "path", "body"),
    [
        ("ollama-0.4", "/api/generate", {"model": "llama3.2:1b", "prompt": "Tell me a story."}),
        (
            "openai",
            "/v1/chat/completions",
            {
                "model": "llama3.2:1b",
                "stream": True,
                "messages": [{"role": "user", "content": "Tell me a story."}],
            },
        ),
    ],
)
def test_killed_mid_stream_is_recorded_as_interrupted(
    tmp_path: Path, mode: str, path: str, body: dict[str, object]
) -> None:
    """A stream cut by SIGKILL leaves exactly one record, ``interrupted``, after the restart."""
    with sim_in_thread(SimConfig(mode=mode, ttft_ms=0, token_ms=150)) as sim_url:
        first = start_proxy(tmp_path, sim_url)
        done = start_proxy(tmp_path / "other", sim_url)  # an unrelated, completed exchange
        with httpx.Client(timeout=10) as client:
            ok = client.post(done.url + path, json={**body, "stream": False})
            assert 200 == ok.status_code
            with client.stream("POST", first.url + path, json=body) as resp:
                chunks = resp.iter_bytes()
                assert next(chunks)
                first.proc.send_signal(signal.SIGKILL)
                first.proc.wait(10)
        done.stop()
        assert [] == first.records()
        again = start_proxy(tmp_path, sim_url)
        again.stop()
    records = again.records()
    assert ["interrupted"] == [r["stop_reason"] for r in records]
    assert "Tell me a story." in (records[0]["input_text"] or "")
    assert records[0]["tokentrail.interrupted"]["request_duration_is_lower_bound"] is True
    # The client had a chunk; what the model said died with the process: unknown, not "".
    assert (None, None, None, "none") == (
        records[0]["output_text"],
        records[0]["output_text_hash"],
        records[0]["output_tokens"],
        records[0]["output_token_source"],
    )
    assert "gen_ai.output.messages" not in records[0]
    result = again.verify(tmp_path / "state")
    assert 0 == result.returncode, result.stdout + result.stderr
    assert ["stop"] == [r["stop_reason"] for r in done.records()]


def test_killed_then_forgotten(tmp_path: Path) -> None:
    """A sealed ledger: a stream cut by SIGKILL, then its user forgotten before the restart.
    The restart still records it (``interrupted``, sealed under the destroyed key, so its
    content is gone), the journal held no plaintext of it, and the ledger verifies."""
    from test_erasure import every_byte_under, forget_cli, records_of

    keystore = tmp_path / "keys"
    args = ("--keystore", str(keystore), "--trust-identity-headers")
    body = {"model": "llama3.2:1b", "prompt": "carol-secret-word story"}
    with sim_in_thread(SimConfig(mode="ollama", ttft_ms=0, token_ms=150)) as sim_url:
        first = start_proxy(tmp_path, sim_url, *args)
        with httpx.Client(timeout=10) as client, client.stream(
            "POST", first.url + "/api/generate", json=body,
            headers={"X-Tokentrail-User": "carol"},
        ) as resp:  # fmt: skip
            assert next(resp.iter_bytes())
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        assert b"carol-secret-word" not in every_byte_under(first.ledger)
        forget_cli("carol", keystore, first.ledger)
        again = start_proxy(tmp_path, sim_url, *args)
        again.stop()
    (record,) = records_of(again.ledger)  # sealed: its hashes are keyed, not the seed's
    assert ("interrupted", "carol", True) == (
        record["stop_reason"],
        record["user_id"],
        record["content_sealed"],
    )
    assert 0 == again.verify(tmp_path / "state").returncode
