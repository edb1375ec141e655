"""The ledger writer: one append-only log per writer, on the local store (SPEC section 3).

An append encodes the record's content outside any lock, then, under a short lock, gives it the
next ``seq`` and the ``prev_hash`` of the record before and queues its line. One flusher thread
writes whatever is queued in one ``write`` and one ``fsync`` (group commit: every append that
arrived while the previous fsync ran shares the next one), extends the Merkle compact range, and
then releases the waiters. It also rotates segments (UTC midnight, size) and seals a signed
checkpoint at least every ``seal_interval_s`` while there are new records, and on close.

Async durability (nobody waits): the flusher writes what is queued within ``ASYNC_FLUSH_S``
(gathering that long after a pause too), and fsyncs at most every ``ASYNC_SYNC_S`` and before any
checkpoint. ``defer`` queues a record the flusher itself builds (the SDK's wrapped calls);
``orphan`` does so from finalizers, without ever waiting for the lock.

:class:`LedgerWriter` is the one implementation; :class:`Ledger` (blocking) and
:class:`AsyncLedger` (asyncio) are thin layers over it.

Restart: the writer reads back its tail from the last checkpoint it sealed (``writer.json``
holds the compact range there), checks every line's ``seq`` and ``prev_hash``, moves a torn
final line (a write the crash cut short, never acknowledged) to ``torn/``, and refuses to continue
a log whose tail is otherwise damaged. Any unsealed records it inherits are sealed at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import zstandard

from ._capture import Begun
from ._checkpoint import Checkpoint, Signer, Verifier, open_note, split_note
from ._errors import (
    ConfigError,
    DamagedLogError,
    KeyChangedError,
    LogBusyError,
    StoreError,
    SubjectForgottenError,
    TokentrailError,
    VerificationError,
)
from ._layout import (
    checkpoint_name,
    checkpoints_dir,
    fsync_dir,
    iter_lines,
    list_log,
    log_dir,
    mtime,
    segment_name,
    segments_dir,
    write_atomic,
)
from ._merkle import CompactRange, leaf_hash
from ._record import SCHEMA, ZERO_HASH, Exchange, Record, parse_rfc3339
from ._verify import record_line_problems

log = logging.getLogger("tokentrail.ledger")

Durability = Literal["strict", "async"]

#: Names the segment a live writer still appends to: ``<date>/<file name>``.
OPEN_SEGMENT_FILE = "open-segment"
#: Held (flock) by the one live writer of a log.
LOCK_FILE = "writer.lock"
LOCK_ATTEMPTS = 20
#: Exchanges begun whose records are not yet on disk (see :meth:`LedgerWriter.begin`).
JOURNAL_FILE = "inflight.jsonl"
#: Fields of a note taken at an exchange's start that speak of its output (the empty answer).
_OUTPUT_FIELDS = frozenset({"gen_ai.output.messages", "output_logprobs"})
_JOURNAL_COMPACT_BYTES = 4 << 20

#: Async durability: while records flow the flusher looks for them this often (appenders do not
#: wake it), or once this many are queued; after a look that finds none it sleeps until the next
#: append wakes it. So an async append is written within this, and a wake-up (costly on a busy
#: or virtual machine, and a turn of the GIL taken from the appenders) serves a whole batch:
#: 50 ms rather than 10 halved what the SDK's streamed calls add (bench/sdk.py, README).
ASYNC_FLUSH_S = 0.05
ASYNC_BATCH = 256
#: Async durability: what is written is fsynced at most this long after (and before any seal,
#: segment close or ``flush``), so one fsync serves every batch written in that time.
ASYNC_SYNC_S = 0.02
#: Async durability: how long to wait before writing a failed batch again.
ASYNC_RETRY_S = 0.5

#: How long the flusher may wait for the appenders its last fsync released (see ``_run``).
COMMIT_DELAY_S = 0.001
#: ``flush`` looks again this often even unwoken (a safety net; each fsync wakes it).
FLUSH_RECHECK_S = 0.05

# How many forks this process is from the one that imported this module: a writer belongs to
# the generation that opened it (a counter, not ``os.getpid()``, a system call on every append).
_forks = 0


def writer_is_live(log_folder: Path) -> bool:
    """Whether a writer holds the log's ``writer.lock`` (tested without blocking)."""
    try:
        fd = os.open(log_folder / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot open {log_folder / LOCK_FILE}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


@dataclass(frozen=True)
class LedgerConfig:
    """How a writer writes one log."""

    root: Path
    log_id: str
    signer: Signer
    durability: Durability = "strict"
    seal_interval_s: float = 60.0
    max_segment_bytes: int = 64 << 20
    rotate_interval_s: float | None = None
    #: Applied to every exchange before it is written (content sealing, SPEC section 7).
    sealer: Callable[[Exchange], Exchange] | None = field(default=None, repr=False)
    compress_sealed: bool = False
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        if self.durability not in ("strict", "async"):
            raise ConfigError(f"durability must be 'strict' or 'async', not {self.durability!r}")
        if self.seal_interval_s <= 0:
            raise ConfigError("seal interval must be positive")
        if self.max_segment_bytes < 1024:
            raise ConfigError("max segment size must be at least 1024 bytes")
        if self.rotate_interval_s is not None and self.rotate_interval_s <= 0:
            raise ConfigError("rotate interval must be positive")

    @property
    def origin(self) -> str:
        """The checkpoint origin ``<key name>/<log_id>``."""
        return f"{self.signer.name}/{self.log_id}"


Waiter = concurrent.futures.Future[Record] | asyncio.Future[Record]


@dataclass(slots=True)
class _Pending:
    seq: int
    line: bytes  # with the trailing newline
    lhash: bytes
    waiter: Waiter | None
    loop: asyncio.AbstractEventLoop | None  # set when ``waiter`` is an asyncio future
    record: Record


def _settle(items: list[_Pending], error: BaseException | None) -> None:
    """Resolve waiters; for asyncio ones this runs on their loop, once per batch."""
    for item in items:
        waiter = item.waiter
        if waiter is None or waiter.done():
            continue
        if error is None:
            waiter.set_result(item.record)
        else:
            waiter.set_exception(error)


def _release(items: list[_Pending], error: BaseException | None = None) -> None:
    """Release a batch's waiters: thread futures at once, each event loop with one wake-up."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    direct: list[_Pending] = []
    for item in items:
        if item.loop is not None:
            by_loop.setdefault(item.loop, []).append(item)
        elif item.waiter is not None:
            direct.append(item)
    _settle(direct, error)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, group, error)


def _signed_by_others_only(note: bytes, verifier: Verifier) -> bool:
    """Whether ``note`` is a well-formed signed note none of whose signatures names this key."""
    try:
        _, sigs = split_note(note)
    except VerificationError:
        return False
    return all((name, blob[:4]) != (verifier.name, verifier.key_id) for name, blob in sigs)


_day: tuple[int, str] = (-1, "")  # the last UTC day _utc_date named, as (days since epoch, text)


def _utc_date(ts: float) -> str:
    """``YYYY-MM-DD`` of the UTC day of epoch seconds ``ts`` (each append asks; a day is
    formatted once)."""
    global _day
    day = int(ts // 86400)
    cached = _day
    if cached[0] != day:
        cached = _day = (day, datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d"))
    return cached[1]


class LedgerWriter:
    """The single writer of one log; thread-safe; see the module docstring."""

    def __init__(self, config: LedgerConfig) -> None:
        self.config = config
        self._dir = log_dir(config.root, config.log_id)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._synced_cv = threading.Condition(self._lock)  # ``flush`` waits on it
        self._queue: list[_Pending] = []
        self._line_head = b'{"schema":"%s","log_id":"%s","seq":' % (
            SCHEMA.encode(),
            config.log_id.encode(),
        )
        # Deferred appends (``defer``): built on the flusher thread, after everything queued.
        self._deferred: list[Callable[[], Exchange]] = []
        self._building = False  # the flusher is building deferred records outside the lock
        # Appends from finalizers (``orphan``): taken without the lock, moved to ``_deferred``.
        self._orphans: deque[Callable[[], Exchange]] = deque()
        self._closing = False
        # The process that opened this writer; a fork of it must not touch it (its flusher
        # thread does not exist there, and its locks may have been held at the fork).
        self._pid = os.getpid()  # for messages
        self._generation = _forks
        #: Set when the flusher thread stopped on an unexpected error: every call raises it.
        self._error: StoreError | None = None
        self._inflight: list[_Pending] = []  # the batch the flusher is writing
        # Chain state as appends see it (may run ahead of the disk).
        self._next_seq = 0
        self._prev_hex = ZERO_HASH
        # Durable state, owned by the flusher thread.
        self._tree = CompactRange()
        self._durable_prev_hex = ZERO_HASH
        self._signed_size = 0
        self._last_seal = config.clock()
        self._segment_fd: int | None = None
        self._segment_path: Path | None = None
        self._segment_bytes = 0
        self._segment_date = ""
        self._segment_opened = 0.0
        self._lock_fd: int | None = None
        self._compressor: concurrent.futures.ThreadPoolExecutor | None = None
        self._flusher: threading.Thread | None = None
        self._seal_requests: list[concurrent.futures.Future[Checkpoint | None]] = []
        self._last_batch = 1
        # Async, while records flow: when the flusher next takes them (None: it sleeps until an
        # append wakes it).
        self._look_at: float | None = None
        self._unsynced = False  # async durability: written, not yet fsynced
        self._unsynced_paths: list[Path] = []  # closed segments whose fsync failed
        self._last_sync = 0.0  # time.monotonic() of the last fsync
        self._sync_wanted = False  # ``flush`` waits for an fsync
        self._synced_size = 0  # records written and fsynced
        self._journal_fd: int | None = None
        self._journal_bytes = 0
        self._intents: dict[str, bytes] = {}  # event id -> journal line, until durable
        #: When the last write failed (monotonic seconds), until a later write succeeds.
        self.failed_at: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, config: LedgerConfig) -> LedgerWriter:
        """Recover the log's tail (or start it), seal what was inherited, start the flusher."""
        writer = cls(config)
        try:
            for sub in (
                segments_dir(config.root, config.log_id),
                checkpoints_dir(config.root, config.log_id),
            ):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create ledger folders under {config.root}: {exc.strerror}"
            ) from exc
        writer._take_lock()
        try:
            writer._recover()
            # A restarted writer never appends to a segment it did not open: the old one is closed.
            with contextlib.suppress(FileNotFoundError):
                (writer._dir / OPEN_SEGMENT_FILE).unlink()
            if writer._tree.size > writer._signed_size:
                writer._seal()
        except KeyChangedError:  # no damage to see: the message says what to do
            writer._unlock()
            raise
        except DamagedLogError as exc:
            writer._unlock()
            raise DamagedLogError(
                f"{exc} (nothing was changed: see the damage with tokentrail verify --ledger"
                f" {config.root}, and record to another log id meanwhile)"
            ) from exc
        except BaseException:
            writer._unlock()
            raise
        if config.compress_sealed:
            writer._compressor = concurrent.futures.ThreadPoolExecutor(1, "tokentrail-zstd")
        writer._flusher = threading.Thread(
            target=writer._run_guarded, name=f"tokentrail-flush-{config.log_id}", daemon=True
        )
        writer._flusher.start()
        writer._replay_journal()
        return writer

    def _replay_journal(self) -> None:
        """Record, as ``interrupted``, every exchange a dead writer began but never recorded."""
        path = self._dir / JOURNAL_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        intents: dict[str, tuple[int, dict[str, Any]]] = {}
        for line in data.split(b"\n"):
            try:
                note = orjson.loads(line)
                if "abandoned" in note:  # begun, then never sent (see ``abandon``)
                    intents.pop(note["abandoned"], None)
                    continue
                # Either form names its event: a Begun's in its meta, a record's in its fields.
                fields = note["begun"]["meta"] if "begun" in note else note["exchange"]
                intents[fields["event_id"]] = (int(note["seq_hint"]), note)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn last line: the exchange had not even been noted
        if intents:
            # A note's hint is the log's size when it was taken, never more than the size now.
            since = min(min(max(0, hint), self._tree.size) for hint, _ in intents.values())
            recorded = self._event_ids_since(since)
            last_alive = mtime(path)
            for event_id, (_, note) in intents.items():
                if event_id in recorded:
                    continue
                try:
                    if "begun" in note:
                        exchange = Begun.rebuild(note["begun"])
                    else:
                        exchange = Exchange.from_fields(note["exchange"])
                except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as exc:
                    # Not a note this writer took (damage, or a hand's work): nothing to record.
                    log.error("in-flight note %r is not an exchange, skipped: %s", event_id, exc)
                    continue
                started = parse_rfc3339(exchange.timestamp)
                duration = max(0.0, (last_alive - started.timestamp()) * 1000.0) if started else 0.0
                # What the model said, if anything, died with the process: unknown (null), not
                # the empty answer the note taken at the start would say.
                extra = {k: v for k, v in exchange.extra.items() if k not in _OUTPUT_FIELDS}
                extra["tokentrail.interrupted"] = {
                    "recovered_by": "writer restart",
                    "request_duration_is_lower_bound": True,
                }
                try:
                    self.append(
                        replace(
                            exchange,
                            stop_reason="interrupted",
                            request_duration_ms=duration,
                            output_text=None,
                            output_tokens=None,
                            output_token_source="none",
                            extra=extra,
                        )
                    )
                except SubjectForgottenError as exc:
                    # A note written unsealed (before its ledger was sealed, or by an older
                    # version) of a subject since forgotten: its content is erased, so it goes.
                    log.error("exchange %s in flight at a crash is not recorded: %s", event_id, exc)
                    continue
                log.warning("recorded exchange %s as interrupted (in flight at a crash)", event_id)
        path.unlink()
        fsync_dir(self._dir)

    def _event_ids_since(self, seq: int) -> set[str]:
        """Event ids of the records from ``seq`` on (the tail a crash may have cut)."""
        found: set[str] = set()
        listing = list_log(self.config.root, self.config.log_id)
        for idx, seg in enumerate(listing.segments):
            nxt = listing.segments[idx + 1].first_seq if idx + 1 < len(listing.segments) else None
            if nxt is not None and nxt <= seq:
                continue
            for _, line, complete in iter_lines(seg.path):
                if complete:
                    obj = orjson.loads(line)
                    if obj.get("seq", -1) >= seq:
                        found.add(obj.get("event_id"))
        return found

    def _take_lock(self) -> None:
        """Take the log's writer lock: two live writers would fork one log."""
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        # A shipper probes the lock for an instant (shared lock): wait that out, no longer.
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < LOCK_ATTEMPTS - 1:
                    time.sleep(0.01)
        else:
            os.close(fd)
            raise LogBusyError(
                f"log {self.config.log_id} under {self.config.root} already has a live writer;"
                " give each writer its own log id (--log-id, or log_id= in the SDK)"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Flush everything queued, seal a final checkpoint and stop the flusher.

        In a forked child of the process that opened the writer this does nothing: the writer
        is its parent's to close.
        """
        if not self.owned_here:
            return
        with self._wake:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        if self._compressor is not None:
            self._compressor.shutdown(wait=True)
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        self._unlock()
        if self._error is not None:
            raise self._error

    @property
    def size(self) -> int:
        """How many records are durable on disk."""
        return self._tree.size

    @property
    def signed_size(self) -> int:
        """The tree size of the last checkpoint this log has."""
        return self._signed_size

    # ------------------------------------------------------------------ appends

    def submit(
        self,
        exchange: Exchange,
        waiter: Waiter | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Record:
        """Queue one record and return it; ``waiter`` is resolved once it is on disk."""
        self._check_process()
        content = self._content(exchange)
        with self._wake:
            self._check_open()
            if self._deferred or self._building:
                self._link_deferred_locked()  # deferred appends came first: keep their order
            record = self._link_locked(exchange.event_id, content, waiter, loop)
            queued = len(self._queue)
            if waiter is not None or self.config.durability == "strict":
                # One wake-up per batch: the flusher then gathers what follows (see ``_run``).
                if queued == 1 or queued == self._last_batch:
                    self._wake.notify()
            elif queued == ASYNC_BATCH or (queued == 1 and self._look_at is None):
                self._wake.notify()  # async: a full batch, or the first append after a pause
        return record

    def defer(self, build: Callable[[], Exchange]) -> None:
        """Queue a record whose exchange ``build()`` makes later, on the flusher thread.

        For callers that want neither the record nor its durability (async durability): the
        caller pays for a list append, and building, encoding and hashing the record happen
        off its thread, in order with every other append. Under strict durability the record
        is built here and this returns once it is on disk. A ``build`` that raises loses that
        record; the error is logged.
        """
        self._check_process()
        if self.config.durability == "strict":
            self.append(build())
            return
        with self._wake:
            self._check_open()
            self._deferred.append(build)
            queued = len(self._queue) + len(self._deferred)
            if queued == ASYNC_BATCH or (queued == 1 and self._look_at is None):
                self._wake.notify()

    def orphan(self, build: Callable[[], Exchange]) -> None:
        """:meth:`defer` for finalizers (``__del__``, a generator closed by the collector).

        A finalizer can run on a thread that holds this writer's lock (the collector runs
        inside any allocation), so this never waits for the lock: the build goes on a queue the
        flusher drains (on its next round, at ``flush`` and at close), under either durability.
        """
        if self._closing or self._error is not None or not self.owned_here:
            if not self.owned_here:
                state = f"open in process {self._pid}, not this one"
            else:
                state = "closed" if self._error is None else "stopped"
            log.error("tokentrail: ledger %s is %s; a record is lost", self.config.log_id, state)
            return
        self._orphans.append(build)
        if self._lock.acquire(blocking=False):  # else its holder is busy and will look again
            try:
                self._wake.notify()
            finally:
                self._lock.release()

    def _adopt_orphans_locked(self) -> None:
        while self._orphans:
            self._deferred.append(self._orphans.popleft())

    @property
    def owned_here(self) -> bool:
        """Whether this process opened the writer (not a fork of the one that did)."""
        return self._generation == _forks

    def _check_process(self) -> None:
        """Refuse use from a forked child, before touching any lock the fork may have copied
        held; the child must open a writer of its own."""
        if not self.owned_here:
            raise StoreError(
                f"ledger {self.config.log_id} was opened by process {self._pid}; process"
                f" {os.getpid()} is a fork of it and must open a writer of its own, on a log"
                " of its own (tokentrail.Recorder does so by itself)"
            )

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise StoreError(f"ledger {self.config.log_id} is closed")

    def _content(self, exchange: Exchange) -> bytes:
        if self.config.sealer is not None:
            exchange = self.config.sealer(exchange)
        return exchange.content_bytes()

    def _link_locked(
        self,
        event_id: str,
        content: bytes,
        waiter: Waiter | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Record:
        """Give a record's content the next ``seq`` and ``prev_hash`` and queue its line."""
        seq = self._next_seq
        # Same bytes as orjson.dumps of the merged dict, without encoding the content twice.
        line = (
            self._line_head
            + str(seq).encode()
            + b',"prev_hash":"'
            + self._prev_hex.encode()
            + b'",'
            + content[1:]
        )
        lhash = leaf_hash(line)
        record = Record(self.config.log_id, seq, event_id, line, lhash)
        self._queue.append(_Pending(seq, line + b"\n", lhash, waiter, loop, record))
        self._next_seq = seq + 1
        self._prev_hex = lhash.hex()
        return record

    def _build_deferred(self, builds: list[Callable[[], Exchange]]) -> list[tuple[str, bytes]]:
        built = []
        for build in builds:
            try:
                exchange = build()
                built.append((exchange.event_id, self._content(exchange)))
            except Exception:
                log.exception("tokentrail: cannot build a deferred record; it is lost")
        return built

    def _link_deferred_locked(self) -> None:
        """Link every deferred append now, on this thread (an ordinary append is behind them)."""
        while self._building:  # the flusher is building some: it links them, then wakes us
            self._wake.wait()
        if self._error is not None:  # it stopped meanwhile
            raise self._error
        self._adopt_orphans_locked()
        builds, self._deferred = self._deferred, []
        for event_id, content in self._build_deferred(builds):
            self._link_locked(event_id, content)

    def begin(self, provisional: Exchange | Begun) -> None:
        """Note an exchange that has started, so a crash before its record still leaves one.

        ``provisional`` holds what is known at the start (its ``stop_reason`` should be
        ``interrupted``): the record itself, or a :class:`Begun` that stands for it. If the
        process dies before the exchange's own record is on disk, the next writer on this log
        appends that record instead. The note is a write to the page cache, not an fsync: it
        survives the process, not the machine.
        """
        # Sealed as its record would be (a keystore's subject key): the note holds no plaintext
        # of a sealed ledger, and a forgotten subject's exchange stops here, before it starts.
        # Unsealed, a Begun's note holds what rebuilds the record, not the record.
        if not isinstance(provisional, Begun):
            content = b'"exchange":' + self._content(provisional)
        elif self.config.sealer is None and (note := provisional.note()) is not None:
            content = b'"begun":' + note
        else:
            content = b'"exchange":' + self._content(provisional.provisional())
        line = b'{"seq_hint":' + str(self._next_seq).encode() + b"," + content + b"}\n"
        self._check_process()
        with self._wake:
            try:
                if self._journal_fd is None:
                    self._journal_fd = os.open(
                        self._dir / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
                    )
                os.write(self._journal_fd, line)
            except OSError as exc:
                self.failed_at = time.monotonic()
                raise StoreError(
                    f"cannot note exchange in {self._dir / JOURNAL_FILE}: {exc.strerror}"
                ) from exc
            self._journal_bytes += len(line)
            self._intents[provisional.event_id] = line

    def abandon(self, event_id: str) -> None:
        """Forget a begun exchange that will have no record (it never reached the upstream):
        in the journal too, or a crash before the next write settles it would have the next
        writer record, as ``interrupted``, an exchange that never happened."""
        self._check_process()
        with self._wake:
            if self._intents.pop(event_id, None) is None or self._journal_fd is None:
                return
            try:
                if not self._intents:
                    os.ftruncate(self._journal_fd, 0)
                    self._journal_bytes = 0
                else:
                    line = b'{"abandoned":' + orjson.dumps(event_id) + b"}\n"
                    os.write(self._journal_fd, line)
                    self._journal_bytes += len(line)
            except OSError as exc:
                log.warning("cannot note in %s that %s was not sent: %s", JOURNAL_FILE,
                            event_id, exc.strerror)  # fmt: skip

    def append(self, exchange: Exchange) -> Record:
        """Append and, under strict durability, return only once the record is on disk."""
        if self.config.durability != "strict":
            return self.submit(exchange)
        waiter: concurrent.futures.Future[Record] = concurrent.futures.Future()
        self.submit(exchange, waiter)
        return waiter.result()

    def flush(self) -> None:
        """Wait until everything queued so far is on disk.

        Records whose write failed under strict durability are not waited for: their appenders
        had the error. Under async durability a failed write is retried, and this waits for it.
        """
        self._check_process()
        with self._wake:
            if self._error is not None:
                raise self._error
            if self._deferred or self._building or self._orphans:
                self._link_deferred_locked()
            target = self._next_seq
            # A strict batch that fails is rewound (``_fail``): its appenders were told, and
            # there is nothing more of it to wait for.
            while self._synced_size < min(target, self._next_seq):
                if self._error is not None:
                    raise self._error
                if not self._sync_wanted:  # none asked for, or one ran before ours was written
                    self._sync_wanted = True
                    self._wake.notify()
                self._synced_cv.wait(FLUSH_RECHECK_S)

    def seal(self) -> Checkpoint | None:
        """Flush, then sign a checkpoint now (``None`` if nothing new); for tests and tools."""
        self.flush()  # refuses a forked child too
        done: concurrent.futures.Future[Checkpoint | None] = concurrent.futures.Future()
        with self._wake:
            self._check_open()  # a closed writer's flusher would never answer
            self._seal_requests.append(done)
            self._wake.notify()
        return done.result()

    # ------------------------------------------------------------------ flusher thread

    def _run_guarded(self) -> None:
        """The flusher thread: :meth:`_run`, and if that dies, nobody is left waiting for it."""
        try:
            self._run()
        except BaseException as exc:
            log.exception("tokentrail: the writer of ledger %s stopped", self.config.log_id)
            self._stop(
                StoreError(
                    f"the writer of ledger {self.config.log_id} stopped on an unexpected error"
                    f" ({type(exc).__name__}: {exc}); records not yet written are lost"
                )
            )

    def _stop(self, error: StoreError) -> None:
        """Fail every waiter (appenders, ``flush``, ``seal``) and every later call: ``error``."""
        with self._wake:
            self._error = error
            failed = self._inflight + self._queue
            self._inflight, self._queue = [], []
            requests, self._seal_requests = self._seal_requests, []
            lost = len(self._deferred) + len(self._orphans)
            self._deferred = []
            self._orphans.clear()
            self._building = False
            self._wake.notify_all()
            self._synced_cv.notify_all()
        if lost:
            log.error("tokentrail: %d deferred records of %s are lost", lost, self.config.log_id)
        _release(failed, error)
        for req in requests:
            if not req.done():
                req.set_exception(error)
        if self._segment_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._segment_fd)
            self._segment_fd = None

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (take := self._takes_now_locked()):
                    timeout = self._next_timer()
                    if timeout == 0.0 or not self._wake.wait(timeout):
                        take = self._takes_now_locked()
                        break
                if take:
                    builds, batch, requests, closing = self._take_locked()
                else:  # a timer's turn only: fsync, seal, rotation
                    builds, batch, requests, closing = [], [], [], False
            if builds:  # build outside the lock, link (cheap) under it, behind what is queued
                built = self._build_deferred(builds)
                with self._wake:
                    for event_id, content in built:
                        self._link_locked(event_id, content)
                    self._building = False
                    self._wake.notify_all()
                    batch = self._take_batch_locked()
            if batch:
                self._inflight = batch
                self._write(batch)
                self._inflight = []
            elif self._rotation_due():
                self._close_segment()
            if self._sync_due():
                self._sync()
                self._sync_wanted = False
            due = self.config.clock() - self._last_seal >= self.config.seal_interval_s
            sealed: Checkpoint | None = None
            if (requests or closing or due) and self._tree.size > self._signed_size:
                try:
                    sealed = self._seal()
                except TokentrailError as exc:
                    log.error("cannot seal checkpoint for %s: %s", self.config.log_id, exc)
                    self._last_seal = self.config.clock()  # retry at the next interval
            for req in requests:
                req.set_result(sealed)
            if closing:
                with self._wake:
                    if not (self._queue or self._deferred or self._orphans):
                        break
        self._close_segment()

    def _take_locked(
        self,
    ) -> tuple[
        list[Callable[[], Exchange]],
        list[_Pending],
        list[concurrent.futures.Future[Checkpoint | None]],
        bool,
    ]:
        """Take what the flusher is to do this turn: the deferred builds (or, with none, the
        queued batch), the seal requests, and whether the writer is closing.

        Group commit. Strict: the appenders the last fsync released are about to append again;
        wait (briefly) for as many of them as there were, so one fsync serves them all. Async:
        the look-again interval gathers the batch; woken from idle by an append, gather for
        ASYNC_FLUSH_S, so the work is done while the appender (most likely) waits for its
        model, not at its next system call.
        """
        if self.config.durability == "async":
            idle = self._look_at is None
            want, deadline = (ASYNC_BATCH, time.monotonic() + ASYNC_FLUSH_S) if idle else (1, 0.0)
        else:
            want, deadline = self._last_batch, time.monotonic() + COMMIT_DELAY_S
        while (
            0 < len(self._queue) + len(self._deferred) < want
            and not self._closing
            and not self._seal_requests
            and (left := deadline - time.monotonic()) > 0
        ):
            self._wake.wait(left)
        self._adopt_orphans_locked()
        builds, self._deferred = self._deferred, []
        self._building = bool(builds)
        requests, self._seal_requests = self._seal_requests, []
        batch = [] if builds else self._take_batch_locked()
        return builds, batch, requests, self._closing

    def _takes_now_locked(self) -> bool:
        """Whether the flusher is to take what is queued now (or serve a close, seal or flush).

        Async durability, while records flow: only once the look-again interval has passed
        since the last take (or a full batch waits), not whenever one is queued when the
        flusher comes round for an fsync: so one turn of the GIL, taken from the appenders,
        serves the records of a whole interval.
        """
        queued = len(self._queue) + len(self._deferred)
        if (
            self._closing
            or self._seal_requests
            or self._orphans
            or (self._sync_wanted and (self._unsynced or queued))
        ):
            return True
        if self.config.durability == "strict" or self._look_at is None:
            return queued > 0
        return queued >= ASYNC_BATCH or time.monotonic() >= self._look_at

    def _take_batch_locked(self) -> list[_Pending]:
        batch, self._queue = self._queue, []
        self._last_batch = len(batch)
        # Async: look again soon while records flow, else sleep until an append wakes us.
        self._look_at = time.monotonic() + ASYNC_FLUSH_S if batch else None
        return batch

    def _next_timer(self) -> float | None:
        """Seconds until the next seal or timed rotation is due (``None``: nothing pending)."""
        now = self.config.clock()
        timers = []
        if self.config.durability == "async" and self._look_at is not None:
            timers.append(self._look_at - time.monotonic())  # records flow: look again soon
        if self._tree.size > self._signed_size:
            timers.append(self._last_seal + self.config.seal_interval_s - now)
        if self._unsynced:
            timers.append(self._last_sync + ASYNC_SYNC_S - time.monotonic())
        if self._segment_fd is not None and self.config.rotate_interval_s is not None:
            timers.append(self._segment_opened + self.config.rotate_interval_s - now)
        return max(0.0, min(timers)) if timers else None

    def _rotation_due(self) -> bool:
        interval = self.config.rotate_interval_s
        return (
            self._segment_fd is not None
            and interval is not None
            and self.config.clock() - self._segment_opened >= interval
        )

    def _write(self, batch: list[_Pending]) -> None:
        # Async durability leaves the fsync to ``_sync`` (when ``_sync_due``, and before any
        # seal or segment close), so one fsync serves every batch of ASYNC_SYNC_S.
        sync = self.config.durability == "strict"
        try:
            self._write_batch(batch, sync=sync)
        except OSError as exc:
            error = StoreError(
                f"cannot write ledger {self.config.log_id} at seq {batch[0].seq}: {exc.strerror}"
            )
            self._fail(batch, error)
            return
        for item in batch:
            self._tree.append(item.lhash)
        self._durable_prev_hex = batch[-1].lhash.hex()
        if sync:
            self._synced(self._tree.size)
        self.failed_at = None
        _release(batch)
        if self._journal_fd is not None:
            self._settle_journal(batch)

    def _settle_journal(self, batch: list[_Pending]) -> None:
        """Drop the intents whose records are now durable; keep the journal small."""
        with self._wake:
            for item in batch:
                self._intents.pop(item.record.event_id, None)
            fd = self._journal_fd
            if fd is None:
                return
            try:
                if not self._intents:
                    os.ftruncate(fd, 0)
                    self._journal_bytes = 0
                elif self._journal_bytes > _JOURNAL_COMPACT_BYTES:
                    keep = b"".join(self._intents.values())
                    write_atomic(self._dir / JOURNAL_FILE, keep)
                    os.close(fd)
                    self._journal_fd = os.open(
                        self._dir / JOURNAL_FILE, os.O_WRONLY | os.O_APPEND, 0o644
                    )
                    self._journal_bytes = len(keep)
            except OSError as exc:
                log.warning("cannot compact %s: %s", JOURNAL_FILE, exc.strerror)

    def _fail(self, batch: list[_Pending], error: StoreError) -> None:
        """Fail this batch and everything queued behind it; rewind the chain to the disk.

        Under async durability the callers were already told their records were taken, so the
        batch is kept, in order, and written again once the disk takes it.
        """
        if self.config.durability == "async" and not self._closing:
            log.error("%s; retrying in %.1fs", error, ASYNC_RETRY_S)
            with self._wake:
                self.failed_at = time.monotonic()
                self._queue = batch + self._queue
                self._wake.wait(ASYNC_RETRY_S)
            return
        with self._wake:
            failed = batch + self._queue
            self._queue = []
            self._next_seq = self._tree.size
            self._prev_hex = self._durable_prev_hex
            self._synced_cv.notify_all()
        log.error("%s", error)
        self.failed_at = time.monotonic()
        _release(failed, error)

    def _synced(self, size: int) -> None:
        with self._lock:
            self._unsynced = False
            self._last_sync = time.monotonic()
            self._synced_size = size
            self._synced_cv.notify_all()

    def _sync(self) -> None:
        """Fsync what async durability wrote and has not yet synced.

        That is the open segment, and any segment closed while its fsync failed (by name; one
        the compressor has since replaced was fsynced as ``.jsonl.zst``). Until every one of
        them succeeds nothing is called synced: ``flush`` keeps waiting, and a seal waits too.
        """
        if not self._unsynced:
            return
        try:
            if self._segment_fd is not None:
                os.fsync(self._segment_fd)
            while self._unsynced_paths:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(self._unsynced_paths[0], os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                self._unsynced_paths.pop(0)
        except OSError as exc:  # tried again ASYNC_SYNC_S later, or by the next write
            log.error("cannot fsync ledger %s: %s", self.config.log_id, exc.strerror)
            self.failed_at = self._last_sync = time.monotonic()
            return
        self._synced(self._tree.size)

    def _sync_due(self) -> bool:
        return self._unsynced and (
            self._sync_wanted or time.monotonic() - self._last_sync >= ASYNC_SYNC_S
        )

    def _write_batch(self, batch: list[_Pending], *, sync: bool = True) -> None:
        start = 0
        while start < len(batch):
            fd = self._segment_for(batch[start].seq, len(batch[start].line))
            budget = self.config.max_segment_bytes - self._segment_bytes
            end = start
            size = 0
            # A record larger than a whole segment still goes alone into a fresh one.
            while end < len(batch) and (
                size + len(batch[end].line) <= budget or (end == start and not self._segment_bytes)
            ):
                size += len(batch[end].line)
                end += 1
            data = b"".join(item.line for item in batch[start:end])
            pos = self._segment_bytes
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            except OSError:
                # Leave no partial line behind, so the log can go on when the disk recovers.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, pos)
                raise
            if not sync:  # now, not after the batch: a rotation below must fsync this segment
                self._unsynced = True
            self._segment_bytes += size
            start = end

    def _segment_for(self, seq: int, need: int) -> int:
        """The open segment to append ``seq`` (``need`` bytes) to, rotating by date and size."""
        today = max(_utc_date(self.config.clock()), self._segment_date)
        if self._segment_fd is not None and (
            today != self._segment_date
            or self._segment_bytes + need > self.config.max_segment_bytes
            or self._rotation_due()
        ):
            self._close_segment()
        if self._segment_fd is None:
            folder = segments_dir(self.config.root, self.config.log_id) / today
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / segment_name(seq)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                # This writer made it and a failed write (a full disk) left it empty: go on in
                # it. Anything in it is another writer's, or damage: never appended to.
                if path.stat().st_size != 0:
                    raise
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._segment_fd = fd
            self._segment_path = path
            self._segment_bytes = 0
            self._segment_date = today
            self._segment_opened = self.config.clock()
            fsync_dir(folder)
            if new_folder:
                fsync_dir(folder.parent)
            # Out-of-process shippers leave the open segment alone until it is closed.
            write_atomic(self._dir / OPEN_SEGMENT_FILE, f"{today}/{path.name}\n".encode())
        return self._segment_fd

    def _close_segment(self) -> None:
        if self._segment_fd is None:
            return
        self._sync()
        path = self._segment_path
        if self._unsynced and path is not None:
            self._unsynced_paths.append(path)  # its fsync failed: ``_sync`` tries it by name
        os.close(self._segment_fd)
        self._segment_fd = None
        with contextlib.suppress(FileNotFoundError):
            (self._dir / OPEN_SEGMENT_FILE).unlink()
        if self._compressor is not None and path is not None and self._segment_bytes:
            self._compressor.submit(compress_segment, path)

    def _seal(self) -> Checkpoint | None:
        self._sync()  # a checkpoint covers only what is on disk
        if self._unsynced:  # the fsync failed: the flusher tries again at the next interval
            raise StoreError(f"cannot seal {self.config.log_id}: its records are not fsynced")
        size = self._tree.size
        if size == 0 or size <= self._signed_size:
            return None
        checkpoint = Checkpoint(self.config.origin, size, self._tree.root())
        note = self.config.signer.sign_note(checkpoint.to_text())
        cp_path = checkpoints_dir(self.config.root, self.config.log_id) / checkpoint_name(size)
        try:
            write_atomic(cp_path, note, exclusive=True)
            state = {
                "origin": checkpoint.origin,
                "tree": self._tree.to_json(),
                "last_leaf_hash": self._durable_prev_hex,
            }
            write_atomic(self._dir / "writer.json", orjson.dumps(state))
        except OSError as exc:
            raise StoreError(f"cannot write checkpoint {cp_path}: {exc.strerror}") from exc
        self._signed_size = size
        self._last_seal = self.config.clock()
        return checkpoint

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Read back the tail from the last sealed state, checking seq and prev_hash.

        The record just below the remembered state must be on disk with the remembered leaf
        hash, and every record after it must continue the chain: a tail deleted, cut short or
        edited since the last seal is refused, never silently continued.
        """
        listing = list_log(self.config.root, self.config.log_id)
        if listing.checkpoints:
            self._signed_size = max(listing.checkpoints)
        tree, prev_hex = self._load_state(listing.checkpoints)
        trusted = tree.size  # records below this are covered by the state's checkpoint
        anchor = trusted - 1  # the record whose leaf hash the state remembers
        anchored = trusted == 0
        roots_to_check = {s: p for s, p in listing.checkpoints.items() if s > trusted}
        for seg in listing.segments:
            next_first = _next_first(listing.segments, seg)
            if next_first is not None and next_first <= max(anchor, 0):
                continue  # wholly below the anchor
            path = seg.plain or seg.path
            if seg.plain is not None and seg.plain.stat().st_size == 0 and seg.packed is None:
                # A crash between creating a segment and its first write: nothing to keep.
                seg.plain.unlink()
                continue
            for offset, line, complete in iter_lines(path):
                if not complete:
                    self._quarantine_torn(path, offset, line)
                    break
                seq, prev = _parse_chain_fields(line, path, self.config.log_id)
                if seq < anchor:
                    continue
                if seq == anchor:
                    if leaf_hash(line).hex() != prev_hex:
                        raise DamagedLogError(
                            f"{path}: seq {seq} differs from the record sealed at the last"
                            f" checkpoint; refusing to continue log {self.config.log_id}"
                        )
                    anchored = True
                    continue
                if not anchored or seq != tree.size or prev != prev_hex:
                    raise DamagedLogError(
                        f"{path}: record at offset {offset} (seq {seq}) does not continue the"
                        f" chain at seq {tree.size}; refusing to continue log {self.config.log_id}"
                    )
                if seq >= self._signed_size:
                    # Sealing vouches for a record: one no writer could have written (a broken
                    # rule of SPEC section 2) is refused, never signed on a restart.
                    problems = record_line_problems(line, self.config.log_id)
                    if problems:
                        raise DamagedLogError(
                            f"{path}: unsealed record at offset {offset} (seq {seq}) breaks the"
                            f" record rules ({problems[0]}); refusing to seal it into log"
                            f" {self.config.log_id}"
                        )
                lhash = leaf_hash(line)
                tree.append(lhash)
                prev_hex = lhash.hex()
                if tree.size in roots_to_check:
                    self._check_root(tree, roots_to_check[tree.size])
        if not anchored or self._signed_size > tree.size:
            raise DamagedLogError(
                f"log {self.config.log_id}: checkpoints cover {max(self._signed_size, trusted)}"
                f" records but the log on disk ends before that (deleted or truncated"
                f" segments); refusing to continue"
            )
        self._tree = tree
        self._synced_size = tree.size
        self._durable_prev_hex = prev_hex
        self._next_seq = tree.size
        self._prev_hex = prev_hex
        if listing.segments:
            self._segment_date = listing.segments[-1].date

    def _load_state(self, checkpoints: dict[int, Path]) -> tuple[CompactRange, str]:
        path = self._dir / "writer.json"
        if not path.exists():
            return CompactRange(), ZERO_HASH
        try:
            state = orjson.loads(path.read_bytes())
            tree = CompactRange.from_json(state["tree"])
            prev = state["last_leaf_hash"]
            assert isinstance(prev, str) and len(prev) == 64
        except (
            OSError,
            orjson.JSONDecodeError,
            KeyError,
            AssertionError,
            VerificationError,
        ) as exc:
            log.warning("ignoring unreadable %s (%s); re-reading the log from seq 0", path, exc)
            return CompactRange(), ZERO_HASH
        cp = checkpoints.get(tree.size)
        if cp is None:
            return CompactRange(), ZERO_HASH
        self._check_root(tree, cp)
        return tree, prev

    def _check_root(self, tree: CompactRange, cp_path: Path) -> None:
        verifier = self.config.signer.verifier
        note = b""
        try:
            note = cp_path.read_bytes()
            text, _ = open_note(note, [verifier])
            checkpoint = Checkpoint.from_text(text)
        except (OSError, VerificationError) as exc:
            if _signed_by_others_only(note, verifier):
                # Signed, only not by this writer's key: a key changed under a live log id.
                raise KeyChangedError(
                    f"{cp_path}: the log's checkpoints are not signed by this writer's key"
                    f" {self.config.signer.name!r} ({exc}): a log goes on under the key that"
                    " began it; with a new key, write to a new log id (the verifier takes both"
                    " keys)"
                ) from exc
            raise DamagedLogError(f"{cp_path}: cannot read own checkpoint: {exc}") from exc
        if checkpoint.root != tree.root() or checkpoint.origin != self.config.origin:
            raise DamagedLogError(
                f"{cp_path}: checkpoint does not match the records on disk; refusing to continue"
                f" log {self.config.log_id}"
            )

    def _quarantine_torn(self, path: Path, offset: int, fragment: bytes) -> None:
        torn_dir = self._dir / "torn"
        torn_dir.mkdir(exist_ok=True)
        keep = torn_dir / f"{path.name}.{offset}.torn"
        keep.write_bytes(fragment)
        with path.open("r+b") as fh:
            fh.truncate(offset)
            os.fsync(fh.fileno())
        log.warning("moved a torn final line of %s (%d bytes) to %s", path, len(fragment), keep)


def _next_first(segments: list[Any], seg: Any) -> int | None:
    idx = segments.index(seg)
    return segments[idx + 1].first_seq if idx + 1 < len(segments) else None


def _parse_chain_fields(line: bytes, path: Path, log_id: str) -> tuple[int, str]:
    try:
        obj = orjson.loads(line)
        seq, prev = obj["seq"], obj["prev_hash"]
        if obj["log_id"] != log_id or not isinstance(seq, int) or not isinstance(prev, str):
            raise TypeError("wrong log_id, seq or prev_hash")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise DamagedLogError(
            f"{path}: unreadable record line ({exc}); refusing to continue log {log_id}"
        ) from exc
    return seq, prev


def compress_segment(path: Path) -> Path:
    """Replace a sealed ``.jsonl`` segment by ``.jsonl.zst`` (tmp, fsync, rename, unlink)."""
    packed = path.with_name(path.name + ".zst")
    tmp = packed.with_name(packed.name + ".tmp")
    cctx = zstandard.ZstdCompressor(level=3)
    with path.open("rb") as src, tmp.open("wb") as dst:
        cctx.copy_stream(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, packed)
    fsync_dir(packed.parent)
    path.unlink()
    fsync_dir(packed.parent)
    return packed


class Ledger:
    """The blocking API over :class:`LedgerWriter`, for programs without an event loop."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    @classmethod
    def open(cls, config: LedgerConfig) -> Ledger:
        """Open (or start) the log described by ``config``."""
        return cls(LedgerWriter.open(config))

    def begin(self, provisional: Exchange | Begun) -> None:
        """Note a started exchange (see :meth:`LedgerWriter.begin`)."""
        self.writer.begin(provisional)

    def append(self, exchange: Exchange) -> Record:
        """Append one record (see :meth:`LedgerWriter.append`)."""
        return self.writer.append(exchange)

    def seal(self) -> Checkpoint | None:
        """Sign a checkpoint over everything appended so far."""
        return self.writer.seal()

    def close(self) -> None:
        """Flush, seal and stop."""
        self.writer.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLedger:
    """The asyncio API over the same :class:`LedgerWriter`."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    @classmethod
    async def open(cls, config: LedgerConfig) -> AsyncLedger:
        """Open (or start) the log, recovering its tail off the event loop."""
        return cls(await asyncio.to_thread(LedgerWriter.open, config))

    def begin(self, provisional: Exchange | Begun) -> None:
        """Note a started exchange (see :meth:`LedgerWriter.begin`); a quick page-cache write."""
        self.writer.begin(provisional)

    def abandon(self, event_id: str) -> None:
        """Forget a begun exchange that will have no record."""
        self.writer.abandon(event_id)

    async def append(self, exchange: Exchange) -> Record:
        """Append; under strict durability, resume only once the record is on disk."""
        if self.writer.config.durability != "strict":
            return self.writer.submit(exchange)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Record] = loop.create_future()
        self.writer.submit(exchange, waiter, loop)
        return await waiter

    async def seal(self) -> Checkpoint | None:
        """Sign a checkpoint over everything appended so far."""
        return await asyncio.to_thread(self.writer.seal)

    async def close(self) -> None:
        """Flush, seal and stop."""
        await asyncio.to_thread(self.writer.close)

    async def __aenter__(self) -> AsyncLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
