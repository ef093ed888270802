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
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from agent_os.amb.envelope import new_id
from agent_os.control_plane.errors import RecorderConfigError, RecorderError
from agent_os.control_plane.policy.patterns import operator_condition
from agent_os.control_plane.recorder.codec import DataCodec
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
        compression: compress each record's data at rest (SQL storages; see
            :mod:`agent_os.control_plane.recorder.codec`). The memory storage keeps rows as they are.
        encryption_key: 32 bytes: encrypt each record's data at rest (XChaCha20-Poly1305,
            PyNaCl). SQL storages only: with ``"memory"`` it raises RecorderConfigError.
        batch_size, flush_interval: when batches are written (see above).
        table, schema: where records live in SQL storage.
        synchronous: SQLite's ``synchronous`` pragma: ``"NORMAL"`` (default; in WAL mode a
            flushed batch survives a crash of the process, the last batches may be lost if the
            machine loses power) or ``"FULL"`` (fsync at every flush: survives that too).

    Raises RecorderConfigError for an unsupported storage, a missing DSN, a key that is not
    32 bytes, or out-of-range options.
    """

    def __init__(
        self,
        storage: StorageName | str | Storage = "sqlite",
        connection_string: str | None = None,
        retention_days: float | None = 90,
        compression: bool = True,
        encryption_key: bytes | None = None,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        retention_interval: float = 3600.0,
        table: str = "flight_records",
        schema: str = "public",
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        if batch_size < 1 or flush_interval <= 0 or retention_interval <= 0:
            raise RecorderConfigError(
                "batch_size >= 1, flush_interval > 0 and retention_interval > 0 are required"
            )
        if retention_days is not None and retention_days <= 0:
            raise RecorderConfigError("retention_days must be positive (None keeps records forever)")
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
        self._batch: list[Record] = []
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._retention_due = 0.0
        self._retaining = False
        self._closing = False
        self._closed = False

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
            self._opened = True
        if self.retention_days is not None and tail is not None:
            await self._retain()

    async def close(self) -> None:
        """Write what is batched and close the storage. Idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._opened:
            if self._flush_task is not None:
                await asyncio.gather(self._flush_task, return_exceptions=True)
            await self.flush()
            await self.storage.close()
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
    ) -> Record:
        """Append one record and return it (hash included). A full batch is written in the
        background while the next one fills. Raises RecorderError for an unknown severity or a
        closed recorder, and when ten batches are waiting because the storage keeps failing."""
        if not self._opened:
            await self.open()
        record = self.append(event_type, agent_id, data, severity, execution_id=execution_id)
        if len(self._batch) >= self.batch_size:
            await self.backpressure()
        return record

    @property
    def ready(self) -> bool:
        """True when :meth:`append` may be called (opened, not closed)."""
        return self._opened and not self._closed

    @property
    def batch_full(self) -> bool:
        """True when the batch has reached ``batch_size``: await :meth:`backpressure` next."""
        return len(self._batch) >= self.batch_size

    async def backpressure(self) -> None:
        """What ``log`` does after appending to a full batch: wait for the batch being written,
        then start writing this one in the background (or, when ten batches are waiting because
        the storage keeps failing, write now and raise RecorderError). A caller cancelled while
        it waits leaves the write going on: it is everyone's, not the caller's."""
        running = self._flush_task
        if running is not None and not running.done():
            # Backpressure: one batch is written while the next one fills. Shielded, because
            # awaiting a task directly cancels that task when the waiter is cancelled (a killed
            # agent's handler waiting here would cancel the write every other waiter awaits).
            await asyncio.shield(running)
        if len(self._batch) >= 10 * self.batch_size:
            await self.flush()  # the storage keeps failing: raise instead of growing without bound
        elif len(self._batch) >= self.batch_size:
            self._flush_task = asyncio.get_running_loop().create_task(self._timed_flush())

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
        if self._closed or not self._opened:
            raise RecorderError("the flight recorder is closed" if self._closed else "call open() first")
        if severity not in _SEVERITIES:
            raise RecorderError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        seq = self._seq + 1
        rid = f"{self._ids}{seq:x}"  # unique: a fresh sortable id per recorder, plus the seq
        ts = _time_ns()
        if not data:
            raw = b"{}"
        elif plain:
            try:
                raw = json_bytes(data)
            except Exception:  # not plain after all (an integer beyond 64 bits ...)
                raw = canonical_bytes(data)
        else:
            raw = canonical_bytes(data)
        prev = self._prev
        # chain_hash, inline (the hot path)
        head = json_bytes([seq, rid, ts, event_type, agent_id, execution_id, severity, prev])
        h = _sha256(head + raw).hexdigest()
        self._seq, self._prev = seq, h
        record: Record = _new_record(
            Record, (seq, rid, ts, event_type, agent_id, execution_id, severity, raw.decode(), prev, h)
        )
        self._batch.append(record)
        self.appended += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._on_timer)
        return record

    def _on_timer(self) -> None:
        self._timer = None
        if self._batch and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.get_running_loop().create_task(self._timed_flush())

    async def _timed_flush(self) -> None:
        try:
            await self.flush()
        except RecorderError:
            # Kept in the batch; retried by the next flush. Arm the timer again.
            if self._timer is None and not self._closed:
                self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._on_timer)

    async def flush(self) -> int:
        """Write the batched records in one transaction; return how many. Raises RecorderError
        (the records stay batched for the next attempt)."""
        async with self._flush_lock:
            batch, self._batch = self._batch, []
            try:
                if batch:
                    await self.storage.append(batch)
            except BaseException:
                self._batch[:0] = batch
                raise
            self.flushed += len(batch)
            if not self._batch and self._timer is not None:
                self._timer.cancel()
                self._timer = None
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
        ``$gt`` ... as in policy conditions). Naive datetimes are local time.
        """
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

    async def verify(self, expected_head: tuple[int, str] | None = None) -> VerifyResult:
        """Check the whole chain; the result names the first bad record (see records module)."""
        await self._ready_to_read()
        anchor: tuple[int, str] | None = None
        found = await self.storage.newest_anchor()
        if found is not None:
            data = json.loads(self.codec.decode(*found))
            anchor = (int(data["pruned_through_seq"]), str(data["pruned_through_hash"]))
        rows: list[tuple[Any, ...]] = []
        async for chunk in self.storage.scan():
            rows.extend(chunk)
        return verify_rows(rows, anchor, expected_head, self.codec.decode if self.codec.active else None)

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
