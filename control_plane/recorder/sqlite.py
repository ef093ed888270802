"""SQLite storage for the flight recorder (the default).

All SQLite calls run on one dedicated thread, so the event loop never blocks on disk and the
connection is only ever used by that thread; records' data is encoded (compressed, encrypted)
on that thread too. The database is in WAL mode; a batch is one transaction. With
``synchronous="NORMAL"`` (the default) a batch survives a crash of the process once
:meth:`SqliteStorage.append` returns (the WAL is in the OS's hands; a power loss can lose the
last batches, never corrupt the chain); with ``"FULL"`` each commit is fsynced and survives a
crash of the machine too.

**One writer.** :meth:`SqliteStorage.open` takes ``<database>.lock`` (:mod:`.lockfile`) for the
storage's life: a second recorder on the file, in this process or another, gets RecorderInUse
naming the holder. Each batch's transaction also checks that it continues the stored tail.
A ``read_only`` storage (``agent-os log``) takes no lock, opens an existing file read-only and
reads beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from agent_os.control_plane.errors import RecorderConfigError, RecorderError
from agent_os.control_plane.recorder.codec import DataCodec
from agent_os.control_plane.recorder.lockfile import WriterLock
from agent_os.control_plane.recorder.records import ANCHOR_EVENT, COLUMNS, FREQUENT_EVENTS
from agent_os.control_plane.recorder.storage import Row, Where, check_continues

T = TypeVar("T")
log = logging.getLogger("agent_os.control_plane.recorder")

# The condition of the event-type index, and the term a query for rarer events adds so that
# SQLite may use that index (it must find the index's own condition among the query's terms).
RARE_EVENTS_SQL = "event_type NOT IN ({})".format(", ".join(f"'{e}'" for e in FREQUENT_EVENTS))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    execution_id TEXT,
    severity TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {t}_agent ON {t} (agent_id, seq);
CREATE INDEX IF NOT EXISTS {t}_type ON {t} (event_type, seq) WHERE {rare};
CREATE INDEX IF NOT EXISTS {t}_ts ON {t} (ts);
""".replace("{rare}", RARE_EVENTS_SQL)
_COLS = "seq, id, ts, event_type, agent_id, execution_id, severity, data, prev_hash, hash"
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# The row counts of the INSERT statements a write is made of: powers of two, so that a dozen
# prepared statements (the connection caches them) serve every write. Preparing a multi-row
# INSERT costs about 2 µs of CPU a row, nearly as much as running it, and each cached one holds
# about 1.4 KB a row: statements of whatever size a write happened to have cost both.
# The largest is also bounded by the library's parameters per statement (10 a row; read at
# open: 32,766 by default, 250,000 in Debian's build).
_MAX_ROWS = 2048
PAGE_SIZE = 16384
"""The page size of a new recorder file (an existing file keeps its own). SQLite's work on an
append grows with the pages it touches, each written to the WAL and then checkpointed into the
file; larger pages amortize it over more records, at a price per transaction. Measured here on
one core (CPU per record, the recorder's path, median of 5): in batches of 512, 6.46 µs with
SQLite's default 4 KiB, 5.87 with 8 KiB, 5.63 with 16 KiB; with one record per transaction,
31, 37 and 50 µs. The recorder's hot path is the large batch; a write of a few records comes
only when records are few, where 20 µs per write does not count."""
CHECKPOINT_BYTES = 4 << 20
"""The size of the WAL at which a checkpoint starts, on a thread of its own
(:class:`Checkpoints`)."""
CHECKPOINT_BEHIND = 4
"""When the WAL reaches this many times :data:`CHECKPOINT_BYTES` while a checkpoint on that
thread runs, the writer waits for it, then checkpoints itself (the WAL stays bounded)."""
WRITE_UNIT = 512
"""The recorder hands a busy storage multiples of this many rows (``FlightRecorder._flush``):
up to 4,096 rows, at most three statements (with the library's default parameter limit or
more; :attr:`SqliteStorage.write_unit` is smaller under a lower one)."""


def _nothing() -> None:
    return None


def where_sql(where: Where, param: str = "?") -> tuple[str, list[Any]]:
    """SQL conditions and parameters for ``where`` (shared with the PostgreSQL backend)."""
    parts: list[str] = []
    args: list[Any] = []
    for column, value in (("agent_id", where.agent_id), ("execution_id", where.execution_id)):
        if value is not None:
            parts.append(f"{column} = {param}")
            args.append(value)
    for column, values in (("event_type", where.event_types), ("severity", where.severities)):
        if values is not None:
            parts.append(f"{column} IN ({', '.join([param] * len(values))})" if values else "FALSE")
            args.extend(values)
    if where.event_types and not any(e in FREQUENT_EVENTS for e in where.event_types):
        parts.append(RARE_EVENTS_SQL)
    if where.start_ns is not None:
        parts.append(f"ts >= {param}")
        args.append(where.start_ns)
    if where.end_ns is not None:
        parts.append(f"ts <= {param}")
        args.append(where.end_ns)
    sql = (" WHERE " + " AND ".join(parts)) if parts else ""
    sql += " ORDER BY seq DESC" if where.descending else " ORDER BY seq"
    if where.limit is not None:
        sql += f" LIMIT {int(where.limit)}"
    return sql, args


class SqliteStorage:
    """Records in a SQLite file (``path``; ``":memory:"`` for a private in-memory database);
    ``read_only``: only read an existing file (no writer lock; appending fails).

    A write of n rows is one transaction: ``BEGIN IMMEDIATE``, the tail check, the INSERT
    statements :func:`_plan` gives (one when n is a power of two up to 2,048), ``COMMIT``."""

    def __init__(
        self,
        path: str | Path = "flight_recorder.db",
        table: str = "flight_records",
        *,
        codec: DataCodec | None = None,
        synchronous: str = "NORMAL",
        read_only: bool = False,
    ) -> None:
        if not table.isidentifier():
            raise RecorderConfigError(f"invalid table name {table!r}")
        if synchronous not in ("NORMAL", "FULL"):
            raise RecorderConfigError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = str(path)
        self.table = table
        self.codec = codec
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Reads of a file the writer holds: a connection and thread of their own (see _read).
        self._reader: sqlite3.Connection | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._closing: asyncio.Future[None] | None = None  # a close under way (see close())
        self.read_only = read_only
        private = self.path in ("", ":memory:")
        self._lock = None if private or read_only else WriterLock(os.path.realpath(self.path) + ".lock")
        self._tail_sql = f"SELECT seq, hash FROM {table} ORDER BY seq DESC LIMIT 1"
        self._max_rows = 1
        self._inserts: dict[int, str] = {}
        self.write_unit = WRITE_UNIT
        self.checkpoints: Checkpoints | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with the writer's connection on its thread (writes, and the reads a write
        depends on)."""
        if self._pool is None or self._db is None:
            raise RecorderError("sqlite storage is not open")
        db = self._db
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, db)
        except sqlite3.Error as exc:
            raise RecorderError(f"sqlite: {exc}") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run the read ``fn`` once the writes asked for before it have ended, so that it sees
        them, as it would on the writer's thread.

        A file the writer holds is read on a connection and thread of its own: a long read (a
        scan filtered by severity alone, a query without a limit) does not hold up the writes
        asked for after it, and so the agents whose records wait for them. A private database
        (``":memory:"``) and a read-only storage have one connection: reads run on its thread.
        """
        reader, pool = self._reader, self._pool
        if reader is None or pool is None or self._db is None:  # (not open: _run says so)
            return await self._run(fn)
        # The writer's thread takes its jobs in turn: a no-op there ends once every write asked
        # for before it has (one whose caller was cancelled runs on). Reads pay this hop, not
        # writes.
        await asyncio.wrap_future(pool.submit(_nothing))
        if self._reader is not reader:  # closed meanwhile
            raise RecorderError("sqlite storage is not open")
        pool = self._read_pool
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flight-recorder-read")
            self._read_pool = pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, reader)
        except sqlite3.Error as exc:
            raise RecorderError(f"sqlite: {exc}") from exc

    async def open(self) -> None:
        if self._closing is not None:
            await asyncio.wait([self._closing])  # the file unlocked first (whatever the close met)
        if self._db is not None:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flight-recorder")
        private = self.path in ("", ":memory:")

        def connect() -> sqlite3.Connection:
            if self._lock is not None:
                self._lock.acquire(self.path)
            if self.read_only:
                uri = f"{Path(self.path).resolve().as_uri()}?mode=ro"
                return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                try:
                    # Before WAL mode: it applies to a new file only (an existing one keeps its
                    # size). See PAGE_SIZE.
                    db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(f"PRAGMA synchronous={self.synchronous}")
                    if not private:
                        # Checkpoints come from Checkpoints; the WAL is cut back to its last
                        # transaction when it starts over, so that its size is what it holds.
                        db.execute("PRAGMA wal_autocheckpoint=0")
                        db.execute("PRAGMA journal_size_limit=0")
                    db.executescript(_SCHEMA.format(t=self.table))
                    per = min(_MAX_ROWS, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS))
                    self._max_rows = 1 << max(0, per.bit_length() - 1)  # a power of two
                    self.write_unit = min(WRITE_UNIT, self._max_rows)
                    if not private:
                        # Now, under the writer's lock: the same file as the writer's.
                        other = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                        try:
                            other.execute(f"PRAGMA synchronous={self.synchronous}")
                        except BaseException:
                            other.close()
                            raise
                        self.checkpoints = Checkpoints(self.path, other)
                        reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                        self._reader = reader
                        reader.execute("PRAGMA query_only=ON")
                        # A first read now opens the WAL beside the file, before it can move.
                        reader.execute(f"SELECT 1 FROM {self.table} LIMIT 1").fetchall()
                except BaseException:
                    self._close_reader()
                    checkpoints, self.checkpoints = self.checkpoints, None
                    if checkpoints is not None:
                        checkpoints.close()
                    db.close()
                    raise
            except BaseException:
                if self._lock is not None:
                    self._lock.release()
                raise
            return db

        pool = self._pool
        opening = asyncio.get_running_loop().run_in_executor(pool, connect)
        try:
            self._db = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The connect goes on in its thread: close what it opens (the file would stay
            # locked for this process's life), before the cancellation goes on.
            self._pool = None
            try:
                db = await asyncio.shield(opening)
            except asyncio.CancelledError:  # cancelled again: close it when the connect ends
                opening.add_done_callback(functools.partial(self._undo_open, pool))
                raise
            except BaseException:  # the connect failed: nothing is open
                pool.shutdown()
                raise asyncio.CancelledError from None
            checkpoints, self.checkpoints = self.checkpoints, None
            reader, self._reader = self._reader, None
            try:
                await asyncio.shield(
                    asyncio.get_running_loop().run_in_executor(
                        pool, self._close_opened, db, checkpoints, reader
                    )
                )
            finally:
                pool.shutdown(wait=False)
            raise
        except BaseException as exc:
            self._pool.shutdown()
            self._pool = None
            if isinstance(exc, sqlite3.Error):
                raise RecorderError(f"cannot open sqlite database {self.path!r}: {exc}") from exc
            raise

    async def close(self) -> None:
        if self._db is None or self._pool is None:
            if self._closing is not None:  # another close under way: until the file is unlocked
                await asyncio.wait([self._closing])
            return
        db, pool = self._db, self._pool
        self._db = self._pool = None
        # Reads and writes asked for from now on fail; those already asked for end first.
        reader, self._reader = self._reader, None
        read_pool, self._read_pool = self._read_pool, None
        checkpoints, self.checkpoints = self.checkpoints, None
        # In a task of its own: a caller cancelled meanwhile does not leave the file open and
        # locked, nor block the event loop on a thread still reading. open() and close() wait
        # for it.
        closing = self._closing = asyncio.ensure_future(
            self._close_all(db, pool, checkpoints, reader, read_pool)
        )
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            closing.add_done_callback(self._closed_unseen)
            raise
        finally:
            if closing.done() and self._closing is closing:
                self._closing = None

    def _closed_unseen(self, closing: asyncio.Future[None]) -> None:
        """Log how a close whose caller was cancelled ended, if it failed (no one else sees it)."""
        if self._closing is closing:
            self._closing = None
        if not closing.cancelled() and closing.exception() is not None:
            log.error("closing sqlite storage %r failed", self.path, exc_info=closing.exception())

    async def _close_all(
        self,
        db: sqlite3.Connection,
        pool: ThreadPoolExecutor,
        checkpoints: Checkpoints | None,
        reader: sqlite3.Connection | None,
        read_pool: ThreadPoolExecutor | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            if reader is not None and read_pool is not None:
                try:  # on its thread, after the reads asked for before
                    await loop.run_in_executor(read_pool, reader.close)
                finally:
                    read_pool.shutdown()
                reader = None
        finally:
            await loop.run_in_executor(pool, self._close_opened, db, checkpoints, reader)
            pool.shutdown()

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _close_opened(
        self, db: sqlite3.Connection, checkpoints: Checkpoints | None, reader: sqlite3.Connection | None
    ) -> None:
        """Close what connect() opened (the reader, if no read ever used it), and unlock."""
        try:
            try:
                if reader is not None:
                    reader.close()
                if checkpoints is not None:
                    checkpoints.close()  # first: the writer's close is the file's last checkpoint
            finally:
                db.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _undo_open(self, pool: ThreadPoolExecutor, opening: asyncio.Future[sqlite3.Connection]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            checkpoints, self.checkpoints = self.checkpoints, None
            reader, self._reader = self._reader, None
            pool.submit(self._close_opened, opening.result(), checkpoints, reader)
        pool.shutdown(wait=False)

    async def tail(self) -> tuple[int, str] | None:
        row = await self._run(
            lambda db: db.execute(f"SELECT seq, hash FROM {self.table} ORDER BY seq DESC LIMIT 1").fetchone()
        )
        return None if row is None else (int(row[0]), str(row[1]))

    async def append(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        codec = self.codec if self.codec is not None and self.codec.active else None
        where = f"sqlite {self.path!r}"
        checkpoints = self.checkpoints

        def write(db: sqlite3.Connection) -> None:
            stored = rows if codec is None else [_encoded(codec, r) for r in rows]
            if db.in_transaction:  # a failed write's ROLLBACK failed too: end that one first
                db.execute("ROLLBACK")
            if checkpoints is not None:
                checkpoints.before_write(db)
            db.execute("BEGIN IMMEDIATE")  # the write lock first: the tail cannot move under us
            try:
                check_continues(db.execute(self._tail_sql).fetchone(), rows[0], where)
                at = 0
                for n in _plan(len(stored), self._max_rows):
                    db.execute(self._values_sql(n), _flat(stored[at : at + n]))
                    at += n
                db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed can leave the transaction open (SQLITE_BUSY, some I/O
                # errors): end it, or every later write would fail to begin.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
            if checkpoints is not None:
                checkpoints.after_commit(db)  # never raises: the write is committed

        await self._run(write)

    def _values_sql(self, n: int) -> str:
        # Kept per row count (powers of two: a dozen at most), not built again for each write.
        sql = self._inserts.get(n)
        if sql is None:
            values = ", ".join([_ROW] * n)
            sql = self._inserts[n] = f"INSERT INTO {self.table} ({_COLS}) VALUES {values}"
        return sql

    async def select(self, where: Where) -> list[Row]:
        cond, args = where_sql(where)
        sql = f"SELECT {_COLS} FROM {self.table}{cond}"
        return await self._read(lambda db: db.execute(sql, args).fetchall())

    async def scan(self, chunk: int = 10_000) -> AsyncIterator[list[Row]]:
        after = -1 << 62
        sql = f"SELECT {_COLS} FROM {self.table} WHERE seq > ? ORDER BY seq LIMIT {int(chunk)}"
        while True:
            rows: list[Row] = await self._read(functools.partial(_fetch_after, sql, after))
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    async def newest_anchor(self) -> tuple[int, Any] | None:
        sql = (
            f"SELECT seq, data FROM {self.table} WHERE event_type = ? AND {RARE_EVENTS_SQL}"
            " ORDER BY seq DESC LIMIT 1"
        )
        row = await self._read(lambda db: db.execute(sql, (ANCHOR_EVENT,)).fetchone())
        return None if row is None else (int(row[0]), row[1])

    async def first_seq_after(self, ts_ns: int) -> int | None:
        sql = f"SELECT MIN(seq) FROM {self.table} WHERE ts >= ?"
        row = await self._read(lambda db: db.execute(sql, (ts_ns,)).fetchone())
        return None if row is None or row[0] is None else int(row[0])

    async def hash_at(self, seq: int) -> str | None:
        sql = f"SELECT hash FROM {self.table} WHERE seq = ?"
        row = await self._read(lambda db: db.execute(sql, (seq,)).fetchone())
        return None if row is None else str(row[0])

    async def delete_through(self, seq: int) -> int:
        sql = f"DELETE FROM {self.table} WHERE seq <= ?"
        return await self._run(lambda db: db.execute(sql, (seq,)).rowcount)


class Checkpoints:
    """The checkpoints of a recorder file, on a thread and connection of their own.

    SQLite's own checkpoints (``wal_autocheckpoint``) run inside a commit on the writer's
    thread: copying the WAL's pages into the file and two fsyncs, while the event loop's
    records wait once their pending batches are full. The writer's connection has them off;
    instead, once the WAL holds :data:`CHECKPOINT_BYTES` (the WAL is cut back to its last
    transaction each time it starts over, so its size is what it holds), a PASSIVE checkpoint
    runs here beside the writer (it never blocks the writer, nor waits for it). It copies the
    frames committed before it started; the writer's next write first copies those committed
    since (:meth:`before_write`), so that the WAL starts over instead of growing.

    If a checkpoint here fails or finds the WAL busy, the writer checkpoints itself after its
    next commit. If the WAL reaches :data:`CHECKPOINT_BEHIND` times :data:`CHECKPOINT_BYTES`
    while one runs here (a slow disk), the writer waits for it and then checkpoints itself, as
    it did with SQLite's own checkpoints: the WAL stays bounded. ``done`` counts the
    checkpoints that copied the WAL here; ``failed`` those, here or on the writer, that raised
    or found it busy (each also logged)."""

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        """``db``: the connection the checkpoints use, opened on the same file as the
        writer's while the writer's lock is held (so both are the same file)."""
        self.path = path
        self.wal = os.path.realpath(path) + "-wal"
        self.done = 0
        self.failed = 0
        self._count_lock = threading.Lock()
        self._db: sqlite3.Connection | None = db
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flight-recorder-checkpoint")
        self._running: Future[bool] | None = None
        self._tail_due = False  # set here when a checkpoint ends; the writer copies the rest
        self._wal_fd: int | None = None  # the writer's WAL, followed even if renamed

    def before_write(self, db: sqlite3.Connection) -> None:
        """On the writer's thread, before a write's transaction: after a checkpoint here has
        ended, copy the frames committed since it began, so that this write starts the WAL
        over. Never raises: a failure is logged and counted."""
        if self._tail_due:
            self._tail_due = False
            self._writer_checkpoint(db)

    def after_commit(self, db: sqlite3.Connection) -> None:
        """On the writer's thread, after a write's commit: start a checkpoint when the WAL has
        grown enough (or run one here, see the class). Never raises: the write is committed
        whatever happens to its checkpoint."""
        try:
            size = self._wal_size()
            if size < CHECKPOINT_BYTES:
                return
            running = self._running
            behind = size >= CHECKPOINT_BEHIND * CHECKPOINT_BYTES
            if running is not None and not running.done() and not behind:
                return
            if running is not None:
                self._running = None
                # When behind, this waits for the running one (a slow disk), as SQLite's own
                # checkpoints made the writer wait.
                if running.result() and not behind:
                    # It copied what was there. The frames since are for before_write, unless
                    # that ran and the WAL did not start over (a reader still uses its start):
                    # then another, as SQLite checkpoints at every commit in that case.
                    if not self._tail_due:
                        self._running = self._pool.submit(self._checkpoint)
                    return
                self._tail_due = False  # failed, busy, or the disk is behind: one here, now
                self._writer_checkpoint(db)
                return
            self._running = self._pool.submit(self._checkpoint)
        except Exception as exc:  # the write is committed; its checkpoint may wait
            self._count_failure(f"checkpoint scheduling failed: {type(exc).__name__}: {exc}")

    def _wal_size(self) -> int:
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self.wal, os.O_RDONLY)
            except OSError:
                return 0  # not made yet
        return os.fstat(self._wal_fd).st_size

    def _writer_checkpoint(self, db: sqlite3.Connection) -> None:
        self._passive(db, "checkpoint on the writer")

    def _checkpoint(self) -> bool:
        db = self._db
        if db is None or not self._passive(db, "checkpoint"):
            return False
        with self._count_lock:
            self.done += 1
        self._tail_due = True
        return True

    def _passive(self, db: sqlite3.Connection, what: str) -> bool:
        """One PASSIVE checkpoint on ``db``; False (logged and counted) when it raised or found
        the WAL busy."""
        try:
            busy = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0]
        except Exception as exc:  # logged and counted; the next write, or the writer, retries
            self._count_failure(f"{what} failed: {type(exc).__name__}: {exc}")
            return False
        if busy:
            self._count_failure(f"{what} found the WAL busy")
            return False
        return True

    def _count_failure(self, what: str) -> None:
        with self._count_lock:
            self.failed += 1
        log.warning("flight recorder %s: %s", self.path, what)

    def close(self) -> None:
        """Wait for a running checkpoint, close its connection and the WAL's descriptor, and
        stop the thread."""

        def close_db() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        try:
            self._pool.submit(close_db).result()
        finally:
            self._pool.shutdown()
            fd, self._wal_fd = self._wal_fd, None
            if fd is not None:
                os.close(fd)


def _plan(rows: int, largest: int) -> list[int]:
    """The row counts of the statements that write ``rows`` rows: powers of two, largest first,
    none above ``largest`` (itself a power of two)."""
    plan = [largest] * (rows // largest)
    rest = rows % largest
    while rest:
        n = 1 << (rest.bit_length() - 1)
        plan.append(n)
        rest -= n
    return plan


def _encoded(codec: DataCodec, row: Row) -> Row:
    seq, rid, ts, et, agent, exe, sev, data, prev, h = row
    return (seq, rid, ts, et, agent, exe, sev, codec.encode(seq, data), prev, h)


def _flat(rows: Sequence[Row]) -> list[Any]:
    return list(chain.from_iterable(rows))


def _fetch_after(sql: str, after: int, db: sqlite3.Connection) -> list[Row]:
    return db.execute(sql, (after,)).fetchall()
