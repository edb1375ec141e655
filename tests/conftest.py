"""Shared fixtures for the ledger tests: a signing key, a temporary ledger and witness-state
folder, and a helper that writes N varied records (token ids, UTF-8 and byte pieces, ``null``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tokentrail._checkpoint import Signer
from tokentrail._ledger import Ledger, LedgerConfig
from tokentrail._record import Exchange, Record

LOG_ID = "test-log"

#: Token lists of every kind SPEC section 2 allows, cycled through by :func:`exchange_for`.
TOKEN_SAMPLES: tuple[list[Any] | None, ...] = (
    [1, 22, 333, 4444, 0],
    ["Hel", "lo", " wor", "ld", "é", "😀"],
    ["a", [0xE2, 0x82], [0xAC], "b"],
    None,
    [],
)


def exchange_for(i: int, **overrides: Any) -> Exchange:
    """The ``i``-th test exchange: token lists, text and ids vary with ``i``."""
    fields: dict[str, Any] = {
        "model": "llama3.2:1b",
        "api": "ollama.generate",
        "stop_reason": "stop",
        "input_tokens": TOKEN_SAMPLES[i % len(TOKEN_SAMPLES)],
        "output_tokens": TOKEN_SAMPLES[(i + 1) % len(TOKEN_SAMPLES)],
        "input_token_source": "upstream-ids",
        "output_token_source": "upstream-pieces",
        "input_text": f"prompt number {i}: why is the sky blue?",
        "output_text": None if i % 7 == 3 else f"answer {i}: Rayleigh scattering ☀",
        "user_id": f"user-{i % 5}",
        "session_id": f"session-{i % 3}",
        "model_version": "sha256:a80c4f17acd5",
        "request_duration_ms": 12.5 + i,
    }
    fields.update(overrides)
    return Exchange(**fields)


@pytest.fixture
def make_exchange() -> Callable[..., Exchange]:
    """``make_exchange(i, **overrides)``: the ``i``-th varied test exchange."""
    return exchange_for


@pytest.fixture
def signer() -> Signer:
    """The deployment's signing key."""
    return Signer.generate("test-key")


@pytest.fixture
def ledger_root(tmp_path: Path) -> Path:
    """A ledger directory that does not exist yet."""
    return tmp_path / "ledger"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A witness-state directory for the verifier."""
    return tmp_path / "witness"


WriteRecords = Callable[..., list[Record]]


@pytest.fixture
def write_records(ledger_root: Path, signer: Signer) -> WriteRecords:
    """``write_records(n, start=0, seal_every=None, log_id=..., root=..., **config)``.

    Opens a sync :class:`Ledger`, appends ``n`` exchanges (numbered from ``start``), seals
    after every ``seal_every`` appends when given, closes it (which seals) and returns the
    records.
    """

    def write(
        n: int,
        *,
        start: int = 0,
        seal_every: int | None = None,
        log_id: str = LOG_ID,
        root: Path | None = None,
        key: Signer | None = None,
        **config: Any,
    ) -> list[Record]:
        cfg = LedgerConfig(root or ledger_root, log_id, key or signer, **config)
        records = []
        with Ledger.open(cfg) as ledger:
            for i in range(start, start + n):
                records.append(ledger.append(exchange_for(i)))
                if seal_every and (i - start + 1) % seal_every == 0:
                    ledger.seal()
        return records

    return write
