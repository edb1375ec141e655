"""tokentrail: a token-level, tamper-evident audit trail of every exchange with an LLM."""

from __future__ import annotations

from ._checkpoint import Checkpoint, Signer, Verifier
from ._errors import (
    ConfigError,
    DamagedLogError,
    KeyError_,
    StoreError,
    TokentrailError,
    VerificationError,
)
from ._ledger import AsyncLedger, Ledger, LedgerConfig
from ._record import Exchange, Record

__version__ = "0.1.0"

__all__ = [
    "AsyncLedger",
    "Checkpoint",
    "ConfigError",
    "DamagedLogError",
    "Exchange",
    "KeyError_",
    "Ledger",
    "LedgerConfig",
    "Record",
    "Signer",
    "StoreError",
    "TokentrailError",
    "VerificationError",
    "Verifier",
    "__version__",
]
