"""tokentrail: a token-level, tamper-evident audit trail of every exchange with an LLM."""

from __future__ import annotations

from ._checkpoint import Checkpoint, Signer, Verifier
from ._errors import (
    ConfigError,
    DamagedLogError,
    KeyError_,
    LogBusyError,
    StoreError,
    TokentrailError,
    VerificationError,
)
from ._ledger import AsyncLedger, Ledger, LedgerConfig
from ._record import Exchange, Record
from ._sdk import (
    ExchangeScope,
    HFTokenizer,
    LocalTokenizer,
    Recorder,
    TiktokenBPE,
    Turn,
    audit,
    load_tokenizer,
    session_turns,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncLedger",
    "Checkpoint",
    "ConfigError",
    "DamagedLogError",
    "Exchange",
    "ExchangeScope",
    "HFTokenizer",
    "KeyError_",
    "Ledger",
    "LedgerConfig",
    "LocalTokenizer",
    "LogBusyError",
    "Record",
    "Recorder",
    "Signer",
    "StoreError",
    "TiktokenBPE",
    "TokentrailError",
    "Turn",
    "VerificationError",
    "Verifier",
    "__version__",
    "audit",
    "load_tokenizer",
    "session_turns",
]
