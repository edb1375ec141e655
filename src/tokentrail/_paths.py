"""Default locations, following the XDG base directory conventions.

Every default can be overridden by an option or a ``TOKENTRAIL_*`` environment variable; these
are only what a user gets without saying anything.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LEDGER = Path("tokentrail-ledger")


def config_dir() -> Path:
    """``$TOKENTRAIL_HOME``, else ``$XDG_CONFIG_HOME/tokentrail``, else ``~/.config/tokentrail``."""
    if home := os.environ.get("TOKENTRAIL_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tokentrail"


def default_signing_key() -> Path:
    """Where ``keygen`` writes, and writers read, the private signing key."""
    return config_dir() / "signing.key"


def default_verifier_key() -> Path:
    """Where ``keygen`` writes, and ``verify`` reads, the public verifier key."""
    return config_dir() / "verifier.pub"
