"""The flight recorder: an append-only, hash-chained log of every decision.

Over 400 lines: one class, whose writing (batching, flushing, retention) and reading share the
chain's state. Batching, durability, storage at rest and retention are explained in
``docs/control-plane.md`` (The flight recorder and its hash chain).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from nacl.signing import SigningKey, VerifyKey

from agent_os.amb.envelope import new_id
from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.errors import RecorderConfigError, RecorderError, RecorderInUse, TamperDetected
from agent_os.control_plane.policy.patterns import operator_condition
from agent_os.control_plane.recorder.codec import DataCodec
from agent_os.control_plane.recorder.heads import (
    HEAD_AGENT,
    HEAD_EVENT,
    Head,
    HeadRecords,
    public_keys,
    sign_head,
    signing_key,
    trusted_by,
)
from agent_os.control_plane.recorder.records import (
    ANCHOR_EVENT,
    GENESIS,
    SEVERITIES,
    Record,
    VerifyResult,
    canonical_bytes,
    json_bytes,
    verify_rows,
)
from agent_os.control_plane.recorder.storage import MemoryStorage, Row, Storage, Where

log = logging.getLogger("agent_os.control_plane.recorder")
_SEVERITIES = frozenset(SEVERITIES)
_sha256 = hashlib.sha256
_time_ns = time.time_ns
_new_record = tuple.__new__  # Record's own __new__ without the argument parsing

# How many batches may fill while one is written before ``log`` waits for the writer. The
# writer thread needs the GIL to start and end each write, which a busy event loop hands over
# only every few milliseconds (``sys.getswitchinterval``): the slack keeps the loop from waiting
# on those hand-overs, and the batches that filled meanwhile go out in one write.
_PENDING_BATCHES = 8

StorageName = Literal["memory", "sqlite", "postgresql"]


def _ns(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp() * 1e9)


def _many(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class FlightRecorder:
    """Audit log of agent activity (docs/control-plane.md).

    Args:
        storage: ``"sqlite"`` (default), ``"memory"``, ``"postgresql"``, or a Storage object.
            ``"s3"`` (in the API reference, ``docs/api-reference.md``) is not supported and
            raises RecorderConfigError.
        connection_string: the SQLite file (default ``flight_recorder.db``) or the PostgreSQL
            DSN (required for postgresql).
        retention_days: records older than this are pruned, with a chained anchor, when the
            recorder opens and then every ``retention_interval`` seconds while it writes (see
            :meth:`apply_retention`); None keeps everything. Fractions of a day are allowed.
        compression: compress each record's data at rest (SQL storages; off by default:
            ``docs/control-plane.md``, At rest, says what it saves and costs; see
            :mod:`agent_os.control_plane.recorder.codec`). The memory storage keeps rows as they are.
        encryption_key: 32 bytes: encrypt each record's data at rest (XChaCha20-Poly1305,
            PyNaCl). SQL storages only: with ``"memory"`` it raises RecorderConfigError.
        batch_size, flush_interval: when batches are written (see above).
        table, schema: where records live in SQL storage.
        synchronous: SQLite's ``synchronous`` pragma: ``"NORMAL"`` (default; in WAL mode a
            flushed batch survives a crash of the process, the last batches may be lost if the
            machine loses power) or ``"FULL"`` (fsync at every flush: survives that too).
        signing_key: an ed25519 key (a nacl SigningKey, its 32-byte seed, or a 64-byte secret
            key) to sign heads with: a ``signed_head`` record after every ``head_every``
            records, every ``head_interval`` seconds while records arrive, and at close; and
            the heads :meth:`export_head` writes. ``verify`` then checks them (see
            ``docs/control-plane.md``, Anchoring the chain).

    One recorder writes a file or table at a time: a second one raises RecorderInUse at open.
    Raises RecorderConfigError for an unsupported storage, a missing DSN, a key that is not
    32 bytes, or out-of-range options.
    """

    def __init__(
        self,
        storage: StorageName | str | Storage = "sqlite",
        connection_string: str | None = None,
        retention_days: float | None = 90,
        compression: bool = False,
        encryption_key: bytes | None = None,
        *,
        batch_size: int = 512,
        flush_interval: float = 0.2,
        retention_interval: float = 3600.0,
        table: str = "flight_records",
        schema: str = "public",
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        signing_key: bytes | SigningKey | None = None,
        head_every: int = 1000,
        head_interval: float = 60.0,
    ) -> None:
        whole(batch_size, "batch_size", error=RecorderConfigError)
        whole(head_every, "head_every", error=RecorderConfigError)
        for name, value in (
            ("flush_interval", flush_interval),
            ("retention_interval", retention_interval),
            ("head_interval", head_interval),
        ):
            seconds(value, name, error=RecorderConfigError)
        if retention_days is not None:  # None keeps records forever
            seconds(retention_days, "retention_days", most=36_500, error=RecorderConfigError, unit="days")
        self.codec = DataCodec(compression, encryption_key)
        self.storage: Storage
        if not isinstance(storage, str):
            self.storage = storage
        elif storage == "memory":
            if encryption_key is not None:
                raise RecorderConfigError(
                    "encryption_key encrypts data at rest: use storage 'sqlite' or 'postgresql'"
                )
            self.codec = DataCodec(False, None)
            self.storage = MemoryStorage()
        elif storage == "sqlite":
            from agent_os.control_plane.recorder.sqlite import SqliteStorage

            self.storage = SqliteStorage(
                connection_string or "flight_recorder.db", table, codec=self.codec, synchronous=synchronous
            )
        elif storage in ("postgresql", "postgres"):
            from agent_os.control_plane.recorder.postgres import PostgresStorage

            if not connection_string:
                raise RecorderConfigError("postgresql storage needs a connection_string")
            self.storage = PostgresStorage(connection_string, table, schema, codec=self.codec)
        elif storage == "s3":
            raise RecorderConfigError(
                "storage 's3' is not supported; the supported storages are memory, sqlite and postgresql"
            )
        else:
            raise RecorderConfigError(
                f"unknown storage {storage!r}; the supported storages are memory, sqlite and postgresql"
            )
        self.retention_days = retention_days
        self.retention_interval = retention_interval
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.appended = 0
        self.flushed = 0
        self.pruned = 0
        self.retention_failures = 0
        self._seq = 0
        self._prev = GENESIS
        self._ids = f"evt_{new_id()}_"
        # Records waiting for the writer, as plain tuples in column order: the garbage collector
        # stops tracking a tuple of plain values at its first pass, and never a Record (a tuple
        # subclass), so Records waiting here would make every later collection longer.
        self._batch: list[Row] = []
        self._writing: list[Row] = []  # the batch flush() is writing now
        self.last_verification: tuple[VerifyResult, float] | None = None
        """The result of the latest :meth:`verify` and when it ended (``time.time()``), or None."""
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._writing_behind = False  # a background write runs: batch up to max_pending
        self._retention_due = 0.0
        self._retaining = False
        self._closing = False
        self._closed = False
        self._fenced: RecorderInUse | None = None  # another writer took the chain: stop appending
        self.head_every = head_every
        self.head_interval = head_interval
        self._signer: SigningKey | None = None
        self._head_seq = 0  # the newest signed_head record's seq (the chain's start before one)
        self._head_due = 0.0
        if signing_key is not None:
            self.set_signing_key(signing_key)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the storage, continue its chain and apply retention. Idempotent; ``log``
        calls it."""
        if self._opened:
            return
        async with self._open_lock:
            if self._opened:
                return
            if self._closed:
                raise RecorderError("the flight recorder is closed")
            await self.storage.open()
            tail = await self.storage.tail()
            if tail is not None:
                self._seq, self._prev = tail
            if self._signer is not None:
                await self._find_head()
            self._opened = True
            if self._signer is not None and self._seq - self._head_seq >= self.head_every:
                self._sign_head()  # a longer unsigned stretch: sign it now (verify reports it)
        if self.retention_days is not None and tail is not None:
            await self._retain()

    async def close(self) -> None:
        """Write what is batched and close the storage (releasing its writer lock). Idempotent.
        Records logged while it writes are written too. When that last write fails, the storage
        is closed all the same and the RecorderError raised: the records still batched are
        lost."""
        if self._closed:
            return
        self._closing = True
        if self._opened and not self._closed and self._signer is not None and self._seq > self._head_seq:
            self._sign_head()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._opened:
            if self._flush_task is not None:
                await asyncio.gather(self._flush_task, return_exceptions=True)
            try:
                # Again while records come during the write (agents still logging): a record
                # log() returned is written or close() raises.
                for _ in range(10):
                    await self.flush()
                    if not self._batch:
                        break
                    if self._signer is not None and self._seq > self._head_seq:
                        self._sign_head()
                else:
                    raise RecorderError(
                        f"{len(self._batch)} records logged while the recorder closed were not written"
                    )
            finally:
                self._closed = True
                await self.storage.close()  # and its writer lock, even when the last flush failed
        self._closed = True

    async def __aenter__(self) -> FlightRecorder:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- writing -----------------------------------------------------------------------------

    async def log(
        self,
        event_type: str,
        agent_id: str,
        data: Mapping[str, Any] | None = None,
        severity: str = "info",
        *,
        execution_id: str | None = None,
        plain: bool = False,
    ) -> Record:
        """Append one record and return it (hash included). A full batch is written in the
        background while the next one fills. ``plain``: as for :meth:`append`. Raises
        RecorderError for an unknown severity, an event type or agent id that is not a str (an
        execution id that is neither a str nor None), text that is not valid Unicode, or a closed
        recorder, and when ten batches are waiting because the storage keeps failing."""
        if not self._opened:
            await self.open()
        record = self.append(event_type, agent_id, data, severity, execution_id, plain)
        if self.batch_full:
            await self.backpressure()
        return record

    @property
    def ready(self) -> bool:
        """True when :meth:`append` may be called (opened, not closed)."""
        return self._opened and not self._closed

    @property
    def batch_full(self) -> bool:
        """True when :meth:`backpressure` has something to do: the batch has reached
        ``batch_size`` (and, while a write started by a full batch is under way,
        :attr:`max_pending`). Await :meth:`backpressure` next."""
        n = len(self._batch)
        size = self.batch_size
        return n >= size and (not self._writing_behind or n >= _PENDING_BATCHES * size)

    @property
    def max_pending(self) -> int:
        """How many records may wait in memory while a write is under way before ``log`` (and
        a kernel's decisions) wait for the writer: eight batches."""
        return _PENDING_BATCHES * self.batch_size

    async def backpressure(self) -> None:
        """What ``log`` does after appending to a full batch: while a write is under way, go on
        (up to :attr:`max_pending` records) or wait for it; then start writing the batch in the
        background (or, when ten batches are waiting because
        the storage keeps failing, write now and raise RecorderError). A caller cancelled while
        it waits leaves the write going on: it is everyone's, not the caller's."""
        running = self._flush_task
        if running is not None and not running.done():
            if len(self._batch) < self.max_pending:
                # The writer is busy: keep batching; its next write takes them all. Until it
                # ends, batch_full stays False below max_pending (no call here per record).
                self._writing_behind = True
                return
            # Backpressure: a few batches fill while one is written. Shielded, because
            # awaiting a task directly cancels that task when the waiter is cancelled (a killed
            # agent's handler waiting here would cancel the write every other waiter awaits).
            await asyncio.shield(running)
        if len(self._batch) >= 10 * self.batch_size:
            await self.flush()  # the storage keeps failing: raise instead of growing without bound
        elif len(self._batch) >= self.batch_size:
            self._start_flush(whole=False)
            # Let the task hand the batch to the writer now: a caller whose awaits never
            # suspend (an agent acting in a tight loop) would otherwise fill every pending
            # batch before the loop ran the task, and then wait for the whole write.
            await asyncio.sleep(0)

    def append(
        self,
        event_type: str,
        agent_id: str,
        data: Mapping[str, Any] | None = None,
        severity: str = "info",
        execution_id: str | None = None,
        plain: bool = False,
    ) -> Record:
        """Synchronous ``log`` for an opened recorder (no await between hashing and batching).

        ``plain=True`` promises ``data`` is a dict of plain JSON values (see
        :func:`~agent_os.control_plane.recorder.records.canonical_bytes`): the control plane's own
        decision records skip the check."""
        if self._closed or not self._opened or self._fenced is not None:
            if self._fenced is not None:
                raise RecorderInUse(str(self._fenced))
            raise RecorderError("the flight recorder is closed" if self._closed else "call open() first")
        if severity not in _SEVERITIES:
            raise RecorderError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        if (
            type(event_type) is not str
            or type(agent_id) is not str
            or not (execution_id is None or type(execution_id) is str)
        ):
            event_type, agent_id, execution_id = _plain_ids(event_type, agent_id, execution_id)
        if event_type == HEAD_EVENT:
            raise RecorderError(f"event type {HEAD_EVENT!r} is the recorder's own (signed heads)")
        try:
            if not data:
                raw = b"{}"
            elif plain:
                try:
                    raw = json_bytes(data)
                except Exception:  # not plain after all (an integer beyond 64 bits ...)
                    raw = canonical_bytes(data)
            else:
                raw = canonical_bytes(data)
            record = self._chain(event_type, agent_id, execution_id, severity, raw)
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 text to hash or store
            raise RecorderError(f"the record holds text that is not valid Unicode: {exc}") from exc
        if self._signer is not None and record.seq - self._head_seq >= self.head_every:
            self._sign_head()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._on_timer)
        return record

    def _chain(
        self, event_type: str, agent_id: str, execution_id: str | None, severity: str, raw: bytes
    ) -> Record:
        """Number, hash and batch one record (no await: the chain order is the call order)."""
        seq = self._seq + 1
        rid = f"{self._ids}{seq}"  # unique: a fresh sortable id per recorder, plus the seq
        ts = _time_ns()
        prev = self._prev
        # chain_hash, inline (the hot path)
        head = json_bytes([seq, rid, ts, event_type, agent_id, execution_id, severity, prev])
        h = _sha256(head + raw).hexdigest()
        self._seq, self._prev = seq, h
        row = (seq, rid, ts, event_type, agent_id, execution_id, severity, raw.decode(), prev, h)
        self._batch.append(row)
        self.appended += 1
        record: Record = _new_record(Record, row)
        return record

    # -- signed heads ------------------------------------------------------------------------

    def set_signing_key(self, key: bytes | SigningKey) -> None:
        """Sign heads with this ed25519 key from now on (the control-plane service passes its
        IATP key). Raises RecorderConfigError for something that is not such a key."""
        self._signer = signing_key(key)

    @property
    def public_key(self) -> str | None:
        """The hex ed25519 public key heads are signed with, or None without a signing key."""
        return None if self._signer is None else bytes(self._signer.verify_key).hex()

    def _sign_head(self) -> None:
        assert self._signer is not None
        signed = sign_head(self._signer, self._seq, self._prev, _time_ns(), self.head_every)
        record = self._chain(HEAD_EVENT, HEAD_AGENT, None, "info", json_bytes(signed.as_dict()))
        self._head_seq = record.seq
        self._head_due = time.monotonic() + self.head_interval

    async def _find_head(self) -> None:
        """Where the stored chain's newest signed head (or its start) is, for the next one."""
        found = await self.storage.select(Where(event_types=[HEAD_EVENT], descending=True, limit=1))
        if found:
            self._head_seq = int(found[0][0])
        else:
            try:
                anchor = await self._anchor()
            except TamperDetected:
                anchor = None  # verify reports it
            self._head_seq = anchor[0] if anchor is not None else 0
        self._head_due = time.monotonic() + self.head_interval

    async def export_head(self, path: str | Path | None = None) -> Head:
        """The chain's head (the newest record's seq and hash), signed when the recorder has a
        signing key, and written to ``path`` as JSON when given (replacing the file atomically).
        Keep it where the recorder's writer cannot reach, and pass it to :meth:`verify` later:
        any rewrite of the chain up to it is then detected. Raises RecorderError, OSError."""
        await self._ready_to_read()
        ts = _time_ns()
        if self._signer is not None:
            found = sign_head(self._signer, self._seq, self._prev, ts, self.head_every)
        else:
            found = Head(self._seq, self._prev, ts, self.head_every)
        if path is not None:
            await asyncio.to_thread(_write_atomic, Path(path), found.to_json())
        return found

    def _start_flush(self, whole: bool) -> None:
        """Write the batch in the background (the one such write at a time)."""
        self._flush_task = task = asyncio.get_running_loop().create_task(self._timed_flush(whole))
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        if task is self._flush_task:
            self._writing_behind = False

    def _on_timer(self) -> None:
        self._timer = None
        if self._batch and (self._flush_task is None or self._flush_task.done()):
            self._start_flush(whole=True)

    async def _timed_flush(self, whole: bool) -> None:
        try:
            await self._flush(whole)
        except RecorderError:
            # Kept in the batch; retried by the next flush. Arm the timer again.
            if self._timer is None and not self._closed:
                self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._on_timer)

    async def flush(self) -> int:
        """Write the batched records in one transaction; return how many. Raises RecorderError
        (the records stay batched for the next attempt)."""
        return await self._flush(True)

    async def _flush(self, whole: bool) -> int:
        """``whole=False`` (a flush started by a full batch): when more than the storage's
        ``write_unit`` records wait (SQLite:
        :data:`~agent_os.control_plane.recorder.sqlite.WRITE_UNIT`), write a multiple of it and
        leave the newest rest batched for the next write. A caller cancelled while the storage
        writes does not stop the write (a thread or a server may be running it): the flush waits
        for it, counts its records as written or keeps them batched, then raises
        CancelledError."""
        cancelled = False
        async with self._flush_lock:
            if (
                self._signer is not None
                and self._opened
                and not self._closed
                and self._seq > self._head_seq
                and time.monotonic() >= self._head_due
            ):
                self._sign_head()
            unit = getattr(self.storage, "write_unit", 1)
            batch, self._batch = self._batch, []
            if not whole and type(unit) is int and len(batch) > unit > 1:
                keep = len(batch) % unit
                if keep:
                    batch, self._batch = batch[:-keep], batch[-keep:]
            self._writing = batch
            try:
                if batch:
                    write = asyncio.ensure_future(self.storage.append(batch))
                    while True:
                        try:
                            await asyncio.shield(write)
                            break
                        except asyncio.CancelledError:
                            if not write.done():
                                cancelled = True  # the write goes on: wait for its end
                            elif write.cancelled() or write.exception() is not None:
                                raise
                            else:  # written, then this flush was cancelled: count them
                                cancelled = True
                                break
            except BaseException as exc:
                self._batch[:0] = batch
                if isinstance(exc, RecorderInUse):
                    self._fenced = exc  # nothing more is numbered from a tail that moved
                elif self._batch and self._timer is None and not self._closing:
                    # Kept for the next write: the timer may have fired during this one.
                    self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._on_timer)
                raise
            finally:
                self._writing = []
            self.flushed += len(batch)
            if not self._batch and self._timer is not None:
                self._timer.cancel()
                self._timer = None
            elif self._batch and self._timer is None and not self._closing:
                # Records that came during the write: their timer may have fired while it ran.
                self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._on_timer)
        if cancelled:
            raise asyncio.CancelledError
        if (
            self.retention_days is not None
            and not self._retaining
            and not self._closing
            and time.monotonic() >= self._retention_due
        ):
            await self._retain()
        return len(batch)

    async def _retain(self) -> None:
        self._retaining = True
        self._retention_due = time.monotonic() + self.retention_interval
        try:
            self.pruned += await self.apply_retention()
        except RecorderError as exc:
            # Retention must not stop the recording of decisions; it is retried next interval.
            self.retention_failures += 1
            log.warning("flight-recorder retention failed: %s", exc)
        finally:
            self._retaining = False

    @property
    def unwritten_since_ns(self) -> int | None:
        """The time (ns since the epoch) of the oldest record appended and not yet written, or
        None when every record is written: how far the storage lags behind."""
        oldest = self._writing or self._batch
        return int(oldest[0][2]) if oldest else None  # the ts column

    async def log_state_dump(self, agent_id: str, state: Mapping[str, Any]) -> Record:
        """Record an agent's state (``replay`` merges it into the replayed state)."""
        return await self.log("state_dump", agent_id, {"state": dict(state)})

    # -- reading -----------------------------------------------------------------------------

    async def _ready_to_read(self) -> None:
        await self.open()
        await self.flush()

    async def query(
        self,
        event_type: str | Sequence[str] | None = None,
        agent_id: str | None = None,
        severity: str | Sequence[str] | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        limit: int | None = None,
        filters: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> list[Record]:
        """Records matching every given filter, in ``seq`` order (``order="desc"``: newest first).

        ``filters`` map a dotted field of the record (``data.resource``, ``event_type`` ...) to a
        value (equality), a list (membership) or $-operators (``$regex`` searches, ``$in``,
        ``$gt`` ... as in policy conditions). Naive datetimes are local time. Raises
        RecorderError for a ``limit`` that is not a whole number, 0 or more.
        """
        if limit is not None:
            limit = whole(limit, "limit", 0, error=RecorderError)
        await self._ready_to_read()
        checks = []
        for field, spec in (filters or {}).items():
            if isinstance(spec, Mapping) and spec and all(str(k).startswith("$") for k in spec):
                checks.append(operator_condition(field, spec))
            elif isinstance(spec, list | tuple):
                checks.append(operator_condition(field, {"$in": list(spec)}))
            else:
                checks.append(operator_condition(field, {"$eq": spec}))
        where = Where(
            agent_id=agent_id,
            execution_id=execution_id,
            event_types=_many(event_type),
            severities=_many(severity),
            start_ns=_ns(start_time),
            end_ns=_ns(end_time),
            descending=order == "desc",
            limit=None if checks else limit,
        )
        records = [self._record(r) for r in await self.storage.select(where)]
        if checks:
            records = [r for r in records if all(c(r.as_dict()) for c in checks)]
            if limit is not None:
                records = records[:limit]
        return records

    def _record(self, row: Row) -> Record:
        """A stored row as a Record with its data decoded (RecorderKeyError, TamperDetected)."""
        seq, rid, ts, et, agent, exe, sev, data, prev, h = row
        if type(data) is not str:
            data = self.codec.decode(int(seq), data)
        return Record(int(seq), rid, int(ts), et, agent, exe, sev, data, prev, h)

    async def get_timeline(self, agent_id: str, execution_id: str | None = None) -> list[Record]:
        """The agent's records (of one execution, when given) in order."""
        return await self.query(agent_id=agent_id, execution_id=execution_id)

    async def replay(
        self, agent_id: str, execution_id: str | None = None, to_event_id: str | None = None
    ) -> dict[str, Any]:
        """The state of an execution up to and including ``to_event_id`` (all when None).

        The state is: ``status`` (the last ``data.status`` seen), ``events`` (how many),
        ``counts`` per event type, ``state`` (the merge of every ``data.state`` in order, as
        written by ``log_state_dump``), ``last_event``. Raises RecorderError when
        ``to_event_id`` is not in the timeline.
        """
        timeline = await self.get_timeline(agent_id, execution_id)
        if to_event_id is not None and all(r.id != to_event_id for r in timeline):
            raise RecorderError(f"event {to_event_id!r} is not in the timeline of {agent_id}")
        state: dict[str, Any] = {
            "agent_id": agent_id,
            "execution_id": execution_id,
            "status": None,
            "events": 0,
            "counts": {},
            "state": {},
            "last_event": None,
        }
        for record in timeline:
            data = record.data
            state["events"] += 1
            state["counts"][record.event_type] = state["counts"].get(record.event_type, 0) + 1
            if isinstance(data.get("status"), str):
                state["status"] = data["status"]
            if isinstance(data.get("state"), dict):
                state["state"].update(data["state"])
            state["last_event"] = record.as_dict()
            if record.id == to_event_id:
                break
        return state

    async def export(
        self,
        format: Literal["json", "csv"],
        output_path: str | Path,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        include_metadata: bool = True,
        fields: Sequence[str] | None = None,
    ) -> int:
        """Write the records of a time range to ``output_path`` as JSON (a list of objects) or
        CSV (``fields`` as columns; nested values as JSON). Returns how many were written.
        ``include_metadata`` adds seq, ts, prev_hash and hash. Raises RecorderError for another
        format."""
        if format not in ("json", "csv"):
            raise RecorderError(f"export format must be json or csv, got {format!r}")
        records = await self.query(start_time=start_time, end_time=end_time)
        rows = [r.as_dict(include_metadata) for r in records]
        if fields is not None:
            rows = [{f: row.get(f) for f in fields} for row in rows]
        await asyncio.to_thread(_write_export, format, Path(output_path), rows, fields)
        return len(rows)

    # -- integrity and retention -------------------------------------------------------------

    async def head(self) -> tuple[int, str]:
        """The newest record's (seq, hash): keep it elsewhere to detect a cut-off tail."""
        await self._ready_to_read()
        return self._seq, self._prev

    async def verify(
        self,
        expected_head: tuple[int, str] | Head | None = None,
        *,
        trusted_keys: Iterable[bytes | str | VerifyKey] | None = None,
    ) -> VerifyResult:
        """Check the whole chain; the result names the first bad record (see records module),
        and is kept with its time in :attr:`last_verification`.

        ``expected_head`` (a ``(seq, hash)`` from :meth:`head`, or a :class:`Head`): the record
        at its seq must still have its hash, and none may be missing up to it. A signed Head
        must be signed by a trusted key. ``trusted_keys`` (ed25519 public keys: raw, hex or
        base64; the recorder's own key is always trusted): every ``signed_head`` record must be
        signed by one, and no stretch of the chain may lack one for longer than its signer's
        ``head_every`` (docs/control-plane.md, Anchoring the chain). Raises RecorderKeyError
        for records encrypted under another key, RecorderConfigError for a malformed key."""
        result = await self._verify(expected_head, trusted_keys)
        self.last_verification = (result, time.time())
        return result

    async def _verify(
        self,
        expected_head: tuple[int, str] | Head | None,
        trusted_keys: Iterable[bytes | str | VerifyKey] | None,
    ) -> VerifyResult:
        trusted = public_keys(trusted_keys or ())
        if self._signer is not None:
            trusted |= {bytes(self._signer.verify_key)}
        refused = _refused_head(expected_head, trusted)
        if refused is not None:
            return refused
        head: tuple[int, str] | None = None
        if isinstance(expected_head, Head):
            head = (expected_head.seq, expected_head.hash)
        elif expected_head is not None:
            head = (int(expected_head[0]), str(expected_head[1]))
        await self._ready_to_read()
        try:
            anchor = await self._anchor()
        except TamperDetected as exc:
            return VerifyResult(False, 0, exc.sequence, None, str(exc))
        rows: list[tuple[Any, ...]] = []
        async for chunk in self.storage.scan():
            rows.extend(chunk)
        checker = HeadRecords(trusted, (anchor[0] if anchor else 0) + 1, self.head_every)
        return verify_rows(rows, anchor, head, self.codec.decode, checker)

    async def _anchor(self) -> tuple[int, str] | None:
        """The newest retention anchor's (pruned_through_seq, pruned_through_hash). Raises
        TamperDetected for an anchor record that is not one."""
        found = await self.storage.newest_anchor()
        if found is None:
            return None
        try:
            data = json.loads(self.codec.decode(*found))
            return int(data["pruned_through_seq"]), str(data["pruned_through_hash"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise TamperDetected(
                f"record {found[0]}: a retention anchor that is not one", sequence=found[0]
            ) from exc

    async def apply_retention(self, now: datetime | None = None) -> int:
        """Delete records older than ``retention_days`` (seen from ``now``), after appending an
        anchor record that keeps the rest verifiable; the anchor is the record of the pruning.
        Returns how many were deleted (0 when ``retention_days`` is None). The recorder calls
        this itself when it opens and every ``retention_interval`` seconds of writing."""
        if self.retention_days is None:
            return 0
        await self._ready_to_read()
        cutoff = (now or datetime.now().astimezone()) - timedelta(days=self.retention_days)
        first_kept = await self.storage.first_seq_after(int(cutoff.timestamp() * 1e9))
        through = (first_kept - 1) if first_kept is not None else self._seq
        rows = await self.storage.select(Where(limit=1))
        if not rows or through < rows[0][0]:
            return 0
        pruned_hash = await self.storage.hash_at(through)
        if pruned_hash is None:
            raise RecorderError(f"record {through} is missing: verify the chain before pruning")
        await self.log(
            ANCHOR_EVENT,
            "flight_recorder",
            {"pruned_through_seq": through, "pruned_through_hash": pruned_hash},
            severity="info",
        )
        await self.flush()
        return await self.storage.delete_through(through)


def _plain_ids(event_type: Any, agent_id: Any, execution_id: Any) -> tuple[str, str, str | None]:
    """The ids as plain str (a str subclass, such as a StrEnum member, by its text). Raises
    RecorderError for anything else: taken into the batch, a record the storage cannot store
    would fail every later write."""
    if not (
        isinstance(event_type, str)
        and isinstance(agent_id, str)
        and (execution_id is None or isinstance(execution_id, str))
    ):
        raise RecorderError(
            "event_type and agent_id must be str, execution_id str or None; got "
            f"{type(event_type).__name__}, {type(agent_id).__name__}, {type(execution_id).__name__}"
        )
    return (
        str.__str__(event_type),
        str.__str__(agent_id),
        None if execution_id is None else str.__str__(execution_id),
    )


def _refused_head(head: tuple[int, str] | Head | None, trusted: frozenset[bytes]) -> VerifyResult | None:
    """The failed result for a signed head no trusted key signed (None for any other head)."""
    if not isinstance(head, Head) or not head.signed or trusted_by(head, trusted):
        return None
    if not head.signature_valid():
        why = "its signature does not verify"
    else:
        why = "its key is not trusted" if trusted else "no trusted key was given to check it"
    return VerifyResult(False, 0, head.seq, None, f"the expected head is refused: {why}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _write_export(format: str, path: Path, rows: list[dict[str, Any]], fields: Sequence[str] | None) -> None:
    if format == "json":
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    names = list(fields) if fields is not None else (list(rows[0]) if rows else ["id"])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in row.items()})
