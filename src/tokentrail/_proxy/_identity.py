"""Who is asking, and whether this is a retry (SPEC section 6).

``user_id`` comes from the API key the client presents (``Authorization: Bearer <key>`` or
``X-API-Key``), looked up by its SHA-256 in the configured table, so the key itself is never
stored; or, only when the operator trusts the network in front, from ``X-Tokentrail-User`` (and
``session_id`` from ``X-Tokentrail-Session``). A key wins over a header.

Retries: a client that repeats a request with the same ``Idempotency-Key`` gets a new record whose
``retry_of`` is the ``event_id`` of the first record with that key (per user). The index is in
memory and bounded (least recently used keys are forgotten); a restarted proxy rebuilds it from
its log's last two UTC days.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError
from .._record import clean_text
from ._config import key_digest

USER_HEADER = "X-Tokentrail-User"
SESSION_HEADER = "X-Tokentrail-Session"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_MAX_HEADER_VALUE = 256


@dataclass(frozen=True, slots=True)
class Identity:
    """The resolved caller."""

    user_id: str | None
    session_id: str | None
    presented_key: bool


def _bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("X-API-Key") or headers.get("Api-Key")
    return key.strip() if key and key.strip() else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    if len(value) > _MAX_HEADER_VALUE:  # cut, it would name someone else: refused instead
        raise ConfigError(f"{name} is longer than {_MAX_HEADER_VALUE} characters")
    # Bytes that are not UTF-8 (decoded as surrogates) or noncharacters (U+FFFF, ...) are
    # stored as U+FFFD, so they too would name someone else: "bob\uffff" would be "bob\ufffe".
    if clean_text(value) != value:
        raise ConfigError(f"{name} is not valid UTF-8, or holds a Unicode noncharacter")
    return value or None


class IdentityResolver:
    """Turns request headers into an :class:`Identity`."""

    def __init__(self, api_keys: Mapping[str, str], *, trust_headers: bool) -> None:
        self.api_keys = dict(api_keys)
        self.trust_headers = trust_headers

    def resolve(self, headers: Mapping[str, str]) -> Identity:
        """The caller's identity; unknown keys and untrusted headers resolve to ``None``.

        A trusted identity header too long to store is a :class:`ConfigError`.
        """
        user: str | None = None
        session: str | None = None
        key = _bearer(headers)
        if key is not None and self.api_keys:
            user = self.api_keys.get(key_digest(key))
        if self.trust_headers:
            if user is None:
                user = _header(headers, USER_HEADER)
            session = _header(headers, SESSION_HEADER)
        return Identity(user, session, key is not None)


class RetryIndex:
    """``(user, Idempotency-Key)`` → the first ``event_id`` seen with it, LRU-bounded."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._first: OrderedDict[tuple[str | None, str], str] = OrderedDict()

    def claim(self, user: str | None, key: str, event_id: str) -> str | None:
        """Register ``event_id`` under the key; return the earlier event id if there is one."""
        slot = (user, key)
        earlier = self._first.get(slot)
        if earlier is not None:
            self._first.move_to_end(slot)
            return earlier
        self._first[slot] = event_id
        if len(self._first) > self.capacity:
            self._first.popitem(last=False)
        return None

    def release(self, user: str | None, key: str, event_id: str) -> None:
        """Forget a claim whose exchange left no record (it never reached the upstream)."""
        if self._first.get((user, key)) == event_id:
            del self._first[(user, key)]

    def remember(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Claim the keys of exchanges already recorded, oldest first, as if seen live: a
        client's retry after a restart (a crash, the commonest cause of retries) still links
        to its first attempt. Returns how many keys were claimed."""
        claimed = 0
        for record in records:
            key, event_id = record.get("idempotency_key"), record.get("event_id")
            if not isinstance(key, str) or not key or not isinstance(event_id, str):
                continue
            user = record.get("user_id")
            first = record.get("retry_of")
            claimed += (
                self.claim(
                    user if isinstance(user, str) else None,
                    key,
                    first if isinstance(first, str) else event_id,
                )
                is None
            )
        return claimed
