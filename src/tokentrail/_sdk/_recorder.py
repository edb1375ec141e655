"""The in-process recorder: one ledger writer per process, a plain ``record`` API, a timing scope.

::

    Recorder.open(root, ...) ──► LedgerWriter (flusher thread: group commit, fsync, seal)
        record(...)  / exchange(...) as ex       sync: the writer's future, on the caller's thread
        arecord(...) / async with exchange(...)  async: an asyncio future resolved on the loop
        audit(client, ledger=recorder)           the wrapped clients use the same two paths

There is one implementation of the writer (``LedgerWriter``); the blocking path waits on a
``concurrent.futures.Future`` the flusher resolves after its fsync, the asyncio path on a loop
future resolved with one wake-up per batch (as ``AsyncLedger`` does). Under ``durability="strict"``
a call returns once its record is on disk; under ``"async"`` it returns once the record is queued.

A recorder opened here is closed (flushed and sealed) on ``close()``, on context-manager exit and,
failing both, at interpreter exit (``atexit``, and in a ``multiprocessing`` child, whose end skips
``atexit``, at its finalizers). A process killed without any of these loses no record it had
acknowledged under strict durability: the next writer of the log seals that tail. A forked
child's log (``<log id>-<pid>``) has no next writer: the parent seals the log of a child that
died without sealing it (:func:`seal_abandoned`), once a minute and when it closes.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from .._checkpoint import Signer
from .._errors import ConfigError, LogBusyError, StoreError
from .._ledger import (
    OPEN_SEGMENT_FILE,
    AsyncLedger,
    Durability,
    Ledger,
    LedgerConfig,
    LedgerWriter,
    writer_is_live,
)
from .._paths import DEFAULT_LEDGER, default_signing_key
from .._record import (
    ID_SOURCES,
    MAX_AHEAD_S,
    Exchange,
    Record,
    TokenList,
    clean_text,
    is_token_source,
    new_event_id,
    now_rfc3339,
    parse_rfc3339,
    piece,
    rfc3339,
)
from ._tokenizers import LocalTokenizer, load_tokenizer

log = logging.getLogger("tokentrail.sdk")

#: Provenance: every record the SDK writes says so (the proxy's records lack this field).
VIA_FIELD = "tokentrail.via"
VIA_SDK = "sdk"

TokenizerConfig = LocalTokenizer | str | Path | Mapping[str, LocalTokenizer | str | Path] | None
_Tokenizers = LocalTokenizer | Mapping[str, LocalTokenizer] | None


def tokenizer_config(value: Any) -> _Tokenizers:
    """``tokenizer=`` as given: a tokenizer, the path of its file (:func:`load_tokenizer`),
    or a mapping from model name (``"*"``: any) to either; anything else is a ``ConfigError``
    here, not an ``AttributeError`` from the first record, after its call was sent."""

    def one(item: Any, where: str) -> LocalTokenizer:
        if isinstance(item, LocalTokenizer):
            return item
        if isinstance(item, str | Path):
            return load_tokenizer(item)
        raise ConfigError(
            f"tokenizer{where} must be a tokenizer (tokentrail.load_tokenizer(path)) or the"
            f" path of a tokenizer.json or tiktoken BPE file, not {type(item).__name__}"
        )

    if value is None:
        return None
    if isinstance(value, Mapping) and not isinstance(value, LocalTokenizer):
        out: dict[str, LocalTokenizer] = {}
        for model, item in value.items():
            if not isinstance(model, str):
                raise ConfigError(f"tokenizer: a model name must be a string, not {model!r}")
            out[model] = one(item, f"[{model!r}]")
        return out
    return one(value, "")


def default_log_id() -> str:
    """``<hostname>-sdk``: stable across restarts of the same program on the same host."""
    host = re.sub(r"[^a-z0-9._-]+", "-", socket.gethostname().lower()).strip("-._") or "host"
    return f"{host[:59]}-sdk"


# Recorders this module opened and has not closed; closed at interpreter exit.
_open_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False
# Taken in a forked child by the first call that reopens a recorder's writer (local_writer).
_fork_lock = threading.Lock()


#: How often a process that forked looks for its dead children's unsealed logs (well inside
#: the verifier's 5-minute grace for an unsealed tail).
REAP_INTERVAL_S = 60.0
# The process whose finalizers close the recorders at a multiprocessing child's end, and the
# one whose thread looks for dead children's logs (each started once per process).
_mp_finalizer_pid: int | None = None
_reaper_pid: int | None = None
# How long a child waits for a log the parent holds for an instant while sealing it (the log of
# a dead child whose pid the new one reuses).
_BUSY_WAIT_S = 2.0


def _after_fork_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()  # a thread of the parent may have held it at the fork


def _after_fork_in_parent() -> None:
    """A child may record to a log of its own and die without sealing it (killed, or a
    ``multiprocessing`` pool's worker terminated): look for such logs from now on."""
    global _reaper_pid
    with _atexit_lock:
        if _reaper_pid == os.getpid() or not _open_recorders:
            return
        _reaper_pid = os.getpid()
    threading.Thread(target=_reap_forever, name="tokentrail-reaper", daemon=True).start()


os.register_at_fork(after_in_child=_after_fork_in_child, after_in_parent=_after_fork_in_parent)


def forked_log_id(log_id: str, pid: int) -> str:
    """The log a forked child writes to: its parent's log id and the child's pid."""
    suffix = f"-{pid}"
    return log_id[: 64 - len(suffix)] + suffix


def seal_abandoned(config: LedgerConfig) -> list[str]:
    """Seal the logs that forks of ``config``'s log (``<log id>-<pid>``) left unsealed: a child
    killed, or ended without closing its recorder. Such a log has an open segment and no live
    writer; opening it seals its tail, as a restarted writer does (SPEC: a dead writer's records
    are a finding once older than the verifier's grace). Returns the logs sealed.

    A log a live process holds is left alone, as is one closed cleanly (no open segment)."""
    me = os.getpid()
    sealed: list[str] = []
    try:
        entries = list(os.scandir(config.root / "logs"))
    except OSError:
        return sealed
    for entry in entries:
        name = entry.name
        _, sep, pid = name.rpartition("-")
        if not (sep and pid.isdigit()) or int(pid) == me:
            continue
        if name != forked_log_id(config.log_id, int(pid)) or name == config.log_id:
            continue
        if not os.path.exists(os.path.join(entry.path, OPEN_SEGMENT_FILE)):
            continue  # closed cleanly, or never appended to
        try:
            if writer_is_live(Path(entry.path)):
                continue  # its process lives (asked at once, not with the writer's wait)
            LedgerWriter.open(replace(config, log_id=name)).close()
        except LogBusyError:
            continue  # its process lives
        except StoreError as exc:
            log.warning("tokentrail: cannot seal log %s of a process gone: %s", name, exc)
            continue
        log.info("tokentrail: sealed log %s, left unsealed by a process gone", name)
        sealed.append(name)
    return sealed


def _reap_owned(recorders: list[Recorder]) -> None:
    for recorder in recorders:
        writer = recorder.writer
        if recorder._owns_writer and writer.owned_here and not recorder._closed:
            try:
                seal_abandoned(writer.config)
            except Exception as exc:  # a daemon thread: nobody to raise to
                log.error("tokentrail: looking for unsealed logs failed: %s", exc)


def _reap_forever() -> None:
    while True:
        time.sleep(REAP_INTERVAL_S)
        _reap_owned(list(_open_recorders))


def _close_all_at_exit() -> None:
    for recorder in list(_open_recorders):
        try:
            recorder.close()
        except Exception as exc:  # at exit there is nobody left to raise to
            log.error("tokentrail: could not close ledger at exit: %s", exc)


def _register(recorder: Recorder) -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_close_all_at_exit)
            _atexit_registered = True
        _open_recorders.add(recorder)
    _close_at_mp_child_end()


def _close_at_mp_child_end() -> None:
    """In a ``multiprocessing`` child, close the recorders at its end: the child leaves by
    ``os._exit`` after its target, which skips ``atexit``, but runs ``multiprocessing``'s
    finalizers first (a pool's worker too, when the pool is closed rather than terminated)."""
    global _mp_finalizer_pid
    mp = sys.modules.get("multiprocessing")
    if mp is None or mp.parent_process() is None or _mp_finalizer_pid == os.getpid():
        return
    _mp_finalizer_pid = os.getpid()
    from multiprocessing import util

    util.Finalize(None, _close_all_at_exit, exitpriority=100)


#: The source whose tokens are pieces (SPEC section 5; ID_SOURCES give ids).
_PIECE_SOURCE = "upstream-pieces"
#: How many caller-chosen event ids a recorder remembers to refuse a second record under one.
CHOSEN_IDS_KEPT = 100_000
#: Largest token id stored: every JSON reader holds it exactly (I-JSON, RFC 7493 section 2.2).
MAX_TOKEN_ID = (1 << 53) - 1
#: Extra fields a caller may not set: tokentrail's own marker of sealed content (SPEC section 7),
#: and the names secrets go by (SPEC section 2: secrets never enter a record).
_RESERVED_EXTRA = frozenset({"content_sealed"})
_SECRET_NAMES = frozenset(
    {"authorization", "proxy-authorization", "api_key", "api-key", "x-api-key", "apikey"}
)


def _token_source(name: str, tokens: TokenList | None, given: str | None) -> str:
    """The source of a caller's tokens: the one given, checked against the tokens, or the
    one they show (ids: ``upstream-ids``, pieces: ``upstream-pieces``, none: ``none``)."""
    if given is None:
        if not tokens:
            return "none" if tokens is None else "upstream-ids"
        return "upstream-ids" if isinstance(tokens[0], int) else _PIECE_SOURCE
    if not is_token_source(given):
        return given  # the Exchange names the sources there are
    if given == "none":
        if tokens is not None:
            raise ConfigError(f"{name}: a source of 'none' says there are no tokens, but some are")
        return given
    if tokens is None:
        raise ConfigError(f"{name}: a source of {given!r} says where tokens came from; none given")
    if tokens and given in ID_SOURCES and not isinstance(tokens[0], int):
        raise ConfigError(f"{name}: {given!r} tokens are ids, but pieces are given")
    if tokens and given == _PIECE_SOURCE and isinstance(tokens[0], int):
        raise ConfigError(f"{name}: {given!r} tokens are pieces, but ids are given")
    return given


def check_identity(name: str, value: Any) -> str | None:
    """A caller's ``user_id`` or ``session_id``, or :class:`ConfigError`: a string the record
    stores as it is (a lone surrogate or a noncharacter would be stored as U+FFFD, naming
    whoever else's id cleans up the same way), or ``None``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string or None, not {value!r}")
    if clean_text(value) != value:
        raise ConfigError(
            f"{name} {value!a} holds a lone surrogate or a Unicode noncharacter, which a"
            " record cannot store as it is"
        )
    return value


def _check_tokens(name: str, tokens: Any) -> TokenList | None:
    """A caller's token list as SPEC section 2 stores it, or :class:`ConfigError`.

    Either all ids (ints, not negative) or all pieces: a piece is a string, or the byte values
    (0-255) of a piece that is not valid UTF-8; byte values that are valid UTF-8 are stored as
    their string, as SPEC says.
    """
    if tokens is None:
        return None
    if not isinstance(tokens, list | tuple):
        raise ConfigError(f"{name} must be a list of token ids or pieces, or None")
    ids_only = set(map(type, tokens)) <= {int}  # the usual case, checked at C speed
    if ids_only and 0 <= min(tokens, default=0) and max(tokens, default=0) <= MAX_TOKEN_ID:
        return list(tokens)
    out: TokenList = []
    ids = pieces = 0
    for t in tokens:
        if isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t <= MAX_TOKEN_ID:
                raise ConfigError(f"{name}: token id {t} is not between 0 and 2**53 - 1")
            ids += 1
            out.append(t)
        elif isinstance(t, str):
            pieces += 1
            out.append(t)
        elif isinstance(t, list | tuple | bytes | bytearray):
            if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in t):
                raise ConfigError(f"{name}: {t!r} is not a list of byte values (0-255)")
            pieces += 1
            out.append(piece(bytes(t)))
        else:
            raise ConfigError(f"{name}: {t!r} is not a token id, piece or list of byte values")
    if ids and pieces:
        raise ConfigError(f"{name} mixes token ids and pieces; give one or the other")
    return out


def _check_timestamp(timestamp: str | float | datetime | None) -> str:
    """RFC 3339 UTC with microseconds and ``Z``, from epoch seconds, an aware ``datetime`` or
    an RFC 3339 time with a UTC offset."""
    if timestamp is None:
        return now_rfc3339()
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None or timestamp.utcoffset() is None:
            raise ConfigError(
                f"timestamp {timestamp!r} has no time zone; give an aware datetime"
                " (datetime.now(timezone.utc)), not a naive one"
            )
        return _not_future(rfc3339(timestamp), timestamp.timestamp())
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
        if not math.isfinite(timestamp):
            raise ConfigError(f"timestamp must be finite, not {timestamp!r}")
        return _not_future(rfc3339(float(timestamp)), float(timestamp))
    moment = parse_rfc3339(timestamp)
    if moment is None or moment.tzinfo is None:
        raise ConfigError(
            f"timestamp {timestamp!r} is not an RFC 3339 time with a UTC offset "
            "(e.g. 2026-01-31T12:00:00Z) or epoch seconds"
        )
    return _not_future(rfc3339(moment), moment.timestamp())


def _not_future(stamp: str, epoch: float) -> str:
    """``stamp``, unless it is later than now (beyond clock skew): a request cannot arrive in
    the future, and ``verify`` treats an unsealed record from the future as forged."""
    ahead = epoch - time.time()
    if ahead > MAX_AHEAD_S:
        raise ConfigError(f"timestamp {stamp} is {ahead:.0f}s in the future")
    return stamp


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A caller's extra fields, refusing tokentrail's own markers and secrets."""
    if not extra:
        return {}
    for key in extra:
        if key in _RESERVED_EXTRA:
            raise ConfigError(f"extra field {key!r} is tokentrail's own; it may not be set")
        if isinstance(key, str) and key.lower() in _SECRET_NAMES:
            raise ConfigError(
                f"extra field {key!r} looks like a secret; secrets never enter a record"
            )
    return dict(extra)


def _open_waiting(config: LedgerConfig) -> LedgerWriter:
    """Open a forked child's log, waiting out a parent that holds it for an instant to seal
    it (the log of a dead child whose pid this one reuses: :func:`seal_abandoned`)."""
    deadline = time.monotonic() + _BUSY_WAIT_S
    while True:
        try:
            return LedgerWriter.open(config)
        except LogBusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class Recorder:
    """Records exchanges into one log of a local ledger; thread-safe and asyncio-safe.

    ``tokenizer`` (a :class:`LocalTokenizer` or the path of its file, or a mapping from model
    name to either, ``"*"`` for any model) tokenizes ``input_text`` / ``output_text`` when no
    token data came with them; the record then says ``local:<name>``.
    """

    def __init__(
        self,
        writer: LedgerWriter,
        *,
        tokenizer: TokenizerConfig = None,
        owns_writer: bool = False,
    ) -> None:
        self.writer = writer
        self._tokenizer = tokenizer_config(tokenizer)
        self._owns_writer = owns_writer
        self._closed = False
        self._strict = writer.config.durability == "strict"
        # Calls of wrapped clients not recorded yet (a stream the caller still holds): at close
        # they are recorded with what they have, before the writer stops.
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._live_lock = threading.Lock()
        #: The event ids callers chose for the records of this recorder (the last ones).
        self._chosen_ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        root: str | Path = DEFAULT_LEDGER,
        *,
        log_id: str | None = None,
        key: str | Path | Signer | None = None,
        durability: Durability = "strict",
        seal_interval_s: float = 60.0,
        tokenizer: TokenizerConfig = None,
        **ledger_options: Any,
    ) -> Recorder:
        """Open (or continue) log ``log_id`` under ``root``; closed at exit if not before.

        ``key`` is a :class:`Signer` or the path of a signing key (created there, mode 0600,
        when missing; default ``~/.config/tokentrail/signing.key``). ``log_id`` defaults to
        ``<hostname>-sdk``; give each concurrent process its own.
        """
        from .._proxy import load_or_create_key  # the proxy's rule for keys, shared

        tokenizer = tokenizer_config(tokenizer)  # refused before the log is taken
        signer = (
            key
            if isinstance(key, Signer)
            else load_or_create_key(Path(key) if key is not None else default_signing_key())[0]
        )
        config = LedgerConfig(
            root=Path(root),
            log_id=log_id or default_log_id(),
            signer=signer,
            durability=durability,
            seal_interval_s=seal_interval_s,
            **ledger_options,
        )
        try:
            writer = LedgerWriter.open(config)
        except LogBusyError:
            if log_id is not None:
                raise
            # The default log of this host is another live process's: take one of our own, as
            # a forked child does, rather than fail the program.
            config = replace(config, log_id=forked_log_id(config.log_id, os.getpid()))
            writer = LedgerWriter.open(config)
            log.info("tokentrail: default log in use; recording to log %s", config.log_id)
        recorder = cls(writer, tokenizer=tokenizer, owns_writer=True)
        _register(recorder)
        # What processes on this log id that died left unsealed (a worker killed, a second
        # program of the default log): sealed by whoever opens the log id next.
        seal_abandoned(replace(config, log_id=log_id or default_log_id()))
        return recorder

    @classmethod
    async def aopen(cls, root: str | Path = DEFAULT_LEDGER, **options: Any) -> Recorder:
        """:meth:`open`, recovering the log's tail off the event loop."""
        return await asyncio.to_thread(lambda: cls.open(root, **options))

    @classmethod
    def of(cls, ledger: Recorder | Ledger | AsyncLedger | LedgerWriter) -> Recorder:
        """A recorder over an open ledger (closing that ledger stays its owner's business)."""
        if isinstance(ledger, Recorder):
            return ledger
        if isinstance(ledger, Ledger | AsyncLedger):
            return cls(ledger.writer)
        if isinstance(ledger, LedgerWriter):
            return cls(ledger)
        raise ConfigError(
            f"ledger must be a tokentrail Recorder, Ledger, AsyncLedger or LedgerWriter,"
            f" not {type(ledger).__name__}"
        )

    @property
    def durability(self) -> Durability:
        """``strict`` (a call returns once its record is fsynced) or ``async``."""
        return self.writer.config.durability

    def close(self) -> None:
        """Flush everything queued, seal a final checkpoint and stop the writer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _open_recorders.discard(self)
        if not self.writer.owned_here:
            return  # a fork that never recorded: the writer is its parent's
        with self._live_lock:
            unfinished = [call for call in self._live if not call.recorded]
        for call in unfinished:  # e.g. a stream still referenced at exit, read or not
            call.abandon()
        if self._owns_writer:
            self.writer.close()
            seal_abandoned(self.writer.config)  # forks of it that died without sealing
        else:
            self.writer.flush()

    def local_writer(self) -> LedgerWriter:
        """This process's writer. In a forked child (gunicorn's or multiprocessing's workers,
        say) a recorder that opened its writer opens another, on log ``<log id>-<pid>``: a log
        has one writer, and the parent's flusher thread does not exist in the child. A recorder
        over someone else's ledger cannot, and says so (``StoreError``)."""
        if self.writer.owned_here:
            return self.writer
        with _fork_lock:
            if not self.writer.owned_here:
                if self._closed:
                    raise StoreError(f"the recorder of {self.writer.config.log_id} is closed")
                if not self._owns_writer:
                    self.writer.flush()  # raises the writer's own explanation
                config = self.writer.config
                forked = replace(config, log_id=forked_log_id(config.log_id, os.getpid()))
                self.writer = _open_waiting(forked)  # closed at exit as before: registered
                _close_at_mp_child_end()
                log.info("tokentrail: forked process records to log %s", forked.log_id)
        return self.writer

    def check_ready(self) -> None:
        """Before a wrapped call is sent: refuse it (``StoreError``) once this recorder is
        closed, and under async durability while the ledger cannot be written, as the proxy
        does, rather than let it happen unaudited or queue records without bound. Records
        accepted before stay queued and are written when the disk recovers (the writer retries
        on its own); under strict durability a failed write is the call's own error."""
        if self._closed:
            raise StoreError(
                f"the recorder of {self.writer.config.log_id} is closed; refusing to send an"
                " unaudited call"
            )
        self._refuse_while_failing(self.local_writer(), "send an unaudited call")

    def track(self, call: Any) -> None:
        """Note a wrapped client's call in flight, so that :meth:`close` records it."""
        with self._live_lock:
            self._live.add(call)

    def _refuse_while_failing(self, writer: LedgerWriter, doing: str) -> None:
        if not self._strict and writer.failed_at is not None:
            raise StoreError(
                f"the audit ledger {writer.config.log_id} cannot be written; refusing to {doing}"
                " (records accepted before are kept and written once it recovers)"
            )

    async def aclose(self) -> None:
        """:meth:`close` off the event loop."""
        await asyncio.to_thread(self.close)

    def flush(self) -> None:
        """Wait until every record queued so far is on disk."""
        self.local_writer().flush()

    def __reduce__(self) -> Any:
        """A recorder holds its log's writer (a lock, a thread): it cannot go to another
        process by pickling (a ``spawn`` pool's argument, say); each process opens its own."""
        raise TypeError(
            "a tokentrail Recorder cannot be pickled: open one in each process"
            " (Recorder.open(root, ...)); a forked child may use its parent's (see the README)"
        )

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ appending

    def prepare(self, exchange: Exchange) -> Exchange:
        """The exchange with local tokenization applied where no token data came with it."""
        tok = self._tokenizer_for(exchange.model)
        if tok is None:
            return exchange
        changes: dict[str, Any] = {}
        if exchange.input_token_source == "none" and exchange.input_text is not None:
            changes["input_tokens"] = tok.encode(clean_text(exchange.input_text))
            changes["input_token_source"] = f"local:{tok.name}"
        if exchange.output_token_source == "none" and exchange.output_text is not None:
            changes["output_tokens"] = tok.encode(clean_text(exchange.output_text))
            changes["output_token_source"] = f"local:{tok.name}"
        return replace(exchange, **changes) if changes else exchange

    def _tokenizer_for(self, model: str | None) -> LocalTokenizer | None:
        tok = self._tokenizer
        if tok is None or isinstance(tok, LocalTokenizer):
            return tok
        if model is not None and model in tok:
            return tok[model]
        if model is not None and ":" not in model and f"{model}:latest" in tok:
            return tok[f"{model}:latest"]
        return tok.get("*")

    def append(self, exchange: Exchange) -> Record:
        """Append; under strict durability return once the record is on disk (blocking).

        Under async durability, while the ledger cannot be written, a ``StoreError`` instead of
        a record queued in memory without bound.
        """
        exchange = self.prepare(exchange)
        writer = self.local_writer()
        if not self._strict:
            self._refuse_while_failing(writer, "take this record")
            return writer.submit(exchange)
        waiter: concurrent.futures.Future[Record] = concurrent.futures.Future()
        writer.submit(exchange, waiter)
        return waiter.result()

    async def aappend(self, exchange: Exchange) -> Record:
        """Append; under strict durability resume once the record is on disk."""
        exchange = self.prepare(exchange)
        writer = self.local_writer()
        if not self._strict:
            self._refuse_while_failing(writer, "take this record")
            return writer.submit(exchange)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Record] = loop.create_future()
        writer.submit(exchange, waiter, loop)
        return await waiter

    def defer(self, build: Callable[[], Exchange]) -> None:
        """Record the exchange ``build()`` makes, built on the writer thread under async
        durability; under strict, here, returning once it is on disk (``LedgerWriter.defer``).
        """
        writer = self.local_writer()
        if self._tokenizer is None:  # nothing to prepare: no closure to keep until it is built
            writer.defer(build)
        else:
            writer.defer(lambda: self.prepare(build()))

    def orphan(self, build: Callable[[], Exchange]) -> None:
        """Record what ``build()`` makes, from a finalizer: never waits for any lock."""
        self.writer.orphan(lambda: self.prepare(build()))  # never waits: no reopening here

    def submit(self, exchange: Exchange) -> Record | None:
        """Queue without waiting (for finalizers and abandoned streams); errors are logged."""
        try:
            return self.local_writer().submit(self.prepare(exchange))
        except Exception as exc:
            log.error("tokentrail: could not record exchange %s: %s", exchange.event_id, exc)
            return None

    # ------------------------------------------------------------------ the plain API

    def build(
        self,
        *,
        model: str,
        input_text: str | None = None,
        output_text: str | None = None,
        input_tokens: TokenList | None = None,
        output_tokens: TokenList | None = None,
        input_token_source: str | None = None,
        output_token_source: str | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        model_version: str | None = None,
        stop_reason: str = "stop",
        request_duration_ms: float = 0.0,
        timestamp: str | float | datetime | None = None,
        event_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Exchange:
        """The :class:`Exchange` :meth:`record` would append (api ``sdk``)."""
        if model == "":  # the proxy's "" means "the request named none"; a caller names one
            raise ConfigError("model must name the model, not be empty")
        if stop_reason == "":
            raise ConfigError("stop_reason must say why the exchange ended, not be empty")
        in_tokens = _check_tokens("input_tokens", input_tokens)
        out_tokens = _check_tokens("output_tokens", output_tokens)
        user_id = check_identity("user_id", user_id)
        session_id = check_identity("session_id", session_id)
        fields = _check_extra(extra)
        return Exchange(
            model=model,
            api="sdk",
            stop_reason=stop_reason,
            input_tokens=in_tokens,
            output_tokens=out_tokens,
            input_token_source=_token_source("input_tokens", in_tokens, input_token_source),
            output_token_source=_token_source("output_tokens", out_tokens, output_token_source),
            input_text=input_text,
            output_text=output_text,
            user_id=user_id,
            session_id=session_id,
            model_version=model_version,
            request_duration_ms=request_duration_ms,
            timestamp=_check_timestamp(timestamp),
            event_id=new_event_id() if event_id is None else event_id,
            extra={VIA_FIELD: VIA_SDK, **fields},
        )

    def record(self, **fields: Any) -> Record:
        """Record one exchange from the seed's fields (see :meth:`build`); blocking.

        ``input_tokens`` / ``output_tokens`` are what the upstream reported: their source
        defaults to ``upstream-ids`` (all ints) or ``upstream-pieces``; pass
        ``input_token_source`` to say otherwise. Without tokens, a configured local tokenizer
        fills them from the text (``local:<name>``), else the source is ``none``.
        """
        exchange = self.build(**fields)
        chosen = self._choose(fields.get("event_id"))
        record = self.append(exchange)
        self._chose(chosen)
        return record

    async def arecord(self, **fields: Any) -> Record:
        """:meth:`record` for asyncio code."""
        exchange = self.build(**fields)
        chosen = self._choose(fields.get("event_id"))
        record = await self.aappend(exchange)
        self._chose(chosen)
        return record

    def _choose(self, event_id: str | None) -> str | None:
        """A caller's ``event_id``, refused if this recorder stored a record under it already
        (SPEC section 2: unique within a store; a retry must not make a second record)."""
        if event_id is not None and event_id in self._chosen_ids:
            raise ConfigError(
                f"event_id {event_id} was recorded already (event ids are unique within a store)"
            )
        return event_id

    def _chose(self, event_id: str | None) -> None:
        if event_id is None:
            return
        self._chosen_ids[event_id] = None
        if len(self._chosen_ids) > CHOSEN_IDS_KEPT:
            self._chosen_ids.popitem(last=False)

    def exchange(self, *, model: str, **fields: Any) -> ExchangeScope:
        """``with recorder.exchange(model=..., input_text=...) as ex: ex.output_text = ...``.

        Times the body into ``request_duration_ms``; records ``stop`` (or ``ex.stop_reason``)
        when it completes, ``upstream_error`` with ``error.type`` / ``error_message`` when it
        raises (and re-raises). Works with ``with`` and ``async with``.
        """
        return ExchangeScope(self, model=model, **fields)


class ExchangeScope:
    """The mutable exchange of a ``with recorder.exchange(...)`` block; recorded on exit."""

    def __init__(self, recorder: Recorder, *, model: str, **fields: Any) -> None:
        if not isinstance(model, str) or not model:  # say so before the block runs, not after
            raise ConfigError(f"model must be the model name as requested, not {model!r}")
        self._recorder = recorder
        self.model = model
        self.input_text: str | None = fields.pop("input_text", None)
        self.output_text: str | None = fields.pop("output_text", None)
        self.input_tokens: TokenList | None = fields.pop("input_tokens", None)
        self.output_tokens: TokenList | None = fields.pop("output_tokens", None)
        self.input_token_source: str | None = fields.pop("input_token_source", None)
        self.output_token_source: str | None = fields.pop("output_token_source", None)
        self.user_id = check_identity("user_id", fields.pop("user_id", None))
        self.session_id = check_identity("session_id", fields.pop("session_id", None))
        self.model_version: str | None = fields.pop("model_version", None)
        self.stop_reason: str | None = fields.pop("stop_reason", None)
        self.extra: dict[str, Any] = dict(fields.pop("extra", None) or {})
        if fields:
            raise ConfigError(f"unknown exchange fields: {sorted(fields)}")
        self.event_id = new_event_id()
        self.timestamp = now_rfc3339()
        self.record: Record | None = None
        self._started = 0.0

    def _begin(self) -> ExchangeScope:
        self.timestamp = now_rfc3339()
        self._started = time.perf_counter()
        return self

    def _exchange(self, exc: BaseException | None) -> Exchange:
        duration = (time.perf_counter() - self._started) * 1000.0
        extra = dict(self.extra)
        stop = self.stop_reason or "stop"
        if exc is not None:
            stop = "interrupted" if isinstance(exc, KeyboardInterrupt) else "upstream_error"
            extra["error.type"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
            extra["error_message"] = str(exc)
        return self._recorder.build(
            model=self.model,
            input_text=self.input_text,
            output_text=self.output_text,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            input_token_source=self.input_token_source,
            output_token_source=self.output_token_source,
            user_id=self.user_id,
            session_id=self.session_id,
            model_version=self.model_version,
            stop_reason=stop,
            request_duration_ms=duration,
            timestamp=self.timestamp,
            event_id=self.event_id,
            extra=extra,
        )

    def __enter__(self) -> ExchangeScope:
        return self._begin()

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        exchange = self._exchange(exc)
        if exc is None:
            self.record = self._recorder.append(exchange)
            return
        try:
            self.record = self._recorder.append(exchange)
        except StoreError as store_exc:  # the body's own exception is the one to see
            log.error(
                "tokentrail: could not record failed exchange %s: %s", self.event_id, store_exc
            )

    async def __aenter__(self) -> ExchangeScope:
        return self._begin()

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        exchange = self._exchange(exc)
        if exc is None:
            self.record = await self._recorder.aappend(exchange)
            return
        try:
            self.record = await self._recorder.aappend(exchange)
        except StoreError as store_exc:
            log.error(
                "tokentrail: could not record failed exchange %s: %s", self.event_id, store_exc
            )
