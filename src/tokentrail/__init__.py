"""tokentrail: a token-level, tamper-evident audit trail of every exchange with an LLM.

The names below load on first use (PEP 562), so ``import tokentrail`` and the command start
without loading the ledger, the SDK or aiohttp until they are needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._errors import (
    ConfigError,
    DamagedLogError,
    KeyChangedError,
    KeyError_,
    LogBusyError,
    StoreError,
    TokentrailError,
    VerificationError,
)

if TYPE_CHECKING:
    from ._checkpoint import Checkpoint, Signer, Verifier
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

_SDK_NAMES = (
    "ExchangeScope",
    "HFTokenizer",
    "LocalTokenizer",
    "Recorder",
    "TiktokenBPE",
    "Turn",
    "audit",
    "load_tokenizer",
    "session_turns",
)
_LAZY = {
    **dict.fromkeys(("Checkpoint", "Signer", "Verifier"), "._checkpoint"),
    **dict.fromkeys(("AsyncLedger", "Ledger", "LedgerConfig"), "._ledger"),
    **dict.fromkeys(("Exchange", "Record"), "._record"),
    **dict.fromkeys(_SDK_NAMES, "._sdk"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokentrail' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AsyncLedger",
    "Checkpoint",
    "ConfigError",
    "DamagedLogError",
    "Exchange",
    "ExchangeScope",
    "HFTokenizer",
    "KeyChangedError",
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
