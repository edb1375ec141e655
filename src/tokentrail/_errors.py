"""The one error hierarchy of tokentrail.

    TokentrailError
    ├── ConfigError          bad arguments, options or configuration files
    ├── KeyError_            a signing or verifier key that cannot be used
    ├── StoreError           a ledger store that cannot be read or written
    │   ├── DamagedLogError  a log whose stored tail cannot be continued
    │   │   └── KeyChangedError  a log another key signed (a new key takes a new log id)
    │   └── LogBusyError     a log another live writer holds
    └── VerificationError    a stored value that fails an integrity check

Errors from libraries underneath are mapped at the edge (``raise ... from exc``) so that a user
sees one clear line, never a traceback, for anything they could have caused.
"""

from __future__ import annotations


class TokentrailError(Exception):
    """Base class of every error tokentrail raises on purpose."""


class ConfigError(TokentrailError):
    """A bad argument, option or configuration value."""


class KeyError_(TokentrailError):
    """A signing or verifier key that is missing, malformed or unsafe."""


class StoreError(TokentrailError):
    """A ledger store that cannot be read or written."""


class LogBusyError(StoreError):
    """A log that another live writer (process) already holds; each writer needs its own."""


class DamagedLogError(StoreError):
    """A log whose stored tail is damaged, so a writer refuses to continue it."""


class KeyChangedError(DamagedLogError):
    """A log whose checkpoints another key signed: a writer with a new key takes a new log id."""


class SubjectForgottenError(StoreError):
    """A data subject whose content key was destroyed (``forget``): nothing more of theirs can
    be recorded, so nothing more of theirs is forwarded."""


class VerificationError(TokentrailError):
    """A stored value that fails an integrity check, with where it was found."""

    def __init__(
        self,
        message: str,
        *,
        log_id: str | None = None,
        seq: int | None = None,
        event_id: str | None = None,
        location: str | None = None,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.log_id = log_id
        self.seq = seq
        self.event_id = event_id
        self.location = location
        self.expected = expected
        self.found = found
