"""Ollama model digests (``GET /api/tags``) and when to look them up: the rule the proxy and the
SDK's ``ollama`` wrapper share (each makes the request its own way).

A record's ``model_version`` is its model's digest. The digests are cached for ``ttl`` seconds
and looked up beside the exchange, not before it; a record waits for the lookup under way at
most until the lookup is :data:`DIGEST_WAIT_S` old, and not at all while lookups fail or run
longer than that (a slow ``/api/tags`` must not slow every exchange). A lookup that failed, or
found no digest for the model, is tried again after :data:`DIGEST_RETRY_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

#: How long after a lookup began a record may wait for it (one not known in time has none).
DIGEST_WAIT_S = 2.0
#: How soon a lookup that failed, or found no digest for the model, is tried again.
DIGEST_RETRY_S = 10.0
#: How soon after a lookup another one may start (requests arriving together share one).
RECENT_S = 1.0


class Digests:
    """The digests known, keyed by model name (``name`` and ``name:latest`` both answer), and
    the times of the last lookup."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.digests: dict[str, str] = {}
        self.fetched = float("-inf")  # when the last lookup ended
        self.started = float("-inf")  # when the last lookup began
        #: The last lookup failed or took longer than DIGEST_WAIT_S: records do not wait.
        self.slow = False

    def find(self, model: str | None) -> str | None:
        """The digest of ``model`` known now (fresh or not), or None."""
        if not model:
            return None
        return self.digests.get(model) or self.digests.get(f"{model}:latest")

    def age(self) -> float:
        """Seconds since the last lookup ended."""
        return time.monotonic() - self.fetched

    def fresh(self) -> bool:
        """Whether the last lookup is younger than ``ttl``."""
        return self.age() <= self.ttl

    def due(self, model: str | None) -> bool:
        """Whether an exchange with ``model`` should start a lookup: the digests are older than
        ``ttl``, or ``model`` has none; never within RECENT_S of the last lookup (DIGEST_RETRY_S
        after one that failed or was slow)."""
        age = self.age()
        if age < (DIGEST_RETRY_S if self.slow else RECENT_S):
            return False
        return age > self.ttl or self.find(model) is None

    def begin(self) -> None:
        """A lookup begins."""
        self.started = time.monotonic()

    def ended(self, ok: bool) -> None:
        """A lookup ended (``ok``: the upstream answered it, whatever it said)."""
        self.fetched = time.monotonic()
        self.slow = not ok or self.fetched - self.started > DIGEST_WAIT_S

    def wait_left(self) -> float:
        """How long a record may still wait for the lookup under way (0: not at all)."""
        if self.slow:
            return 0.0
        return max(0.0, self.started + DIGEST_WAIT_S - time.monotonic())

    def store(self, models: Iterable[Any], field: Callable[[Any, str], Any]) -> None:
        """Take a listing's models (``field(model, name)`` reads one of a model's fields): each
        model's ``digest`` under its ``name`` and its ``model``."""
        digests: dict[str, str] = {}
        for m in models:
            digest = field(m, "digest")
            if isinstance(digest, str):
                for name in (field(m, "name"), field(m, "model")):
                    if isinstance(name, str):
                        digests[name] = digest
        self.digests = digests
