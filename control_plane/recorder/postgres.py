"""PostgreSQL storage for the flight recorder (``pip install 'agent-os[postgres]'``).

One connection (psycopg 3, async); a batch is one transaction written with ``COPY``, durable
when :meth:`PostgresStorage.append` returns. ``schema`` and ``table`` name where records live
(the schema is created if missing). ``data`` is ``BYTEA``: the canonical JSON as UTF-8, or its
compressed/encrypted form (:mod:`agent_os.control_plane.recorder.codec`).

**One writer.** :meth:`PostgresStorage.open` takes a session-level advisory lock named after
the database, schema and table, held as long as the connection: a second recorder on the same
table (any process, any host) gets RecorderInUse naming the holder's backend pid, application
name and address. Each batch's transaction also checks that it continues the stored tail.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from agent_os.control_plane.errors import RecorderConfigError, RecorderError, RecorderInUse
from agent_os.control_plane.recorder.codec import DataCodec
from agent_os.control_plane.recorder.records import ANCHOR_EVENT
from agent_os.control_plane.recorder.sqlite import where_sql
from agent_os.control_plane.recorder.storage import Row, Where, check_continues

if TYPE_CHECKING:
    from psycopg import AsyncConnection, AsyncCursor

INSTALL_HINT = "the postgresql flight recorder needs psycopg: pip install 'agent-os[postgres]'"
_LOCK_WAIT = 1.0
_COLS = "seq, id, ts, event_type, agent_id, execution_id, severity, data, prev_hash, hash"


class PostgresStorage:
    """Records in ``schema.table`` of the database at ``dsn``; ``read_only``: only read (no
    writer lock, no schema created; the session is read-only)."""

    def __init__(
        self,
        dsn: str,
        table: str = "flight_records",
        schema: str = "public",
        *,
        codec: DataCodec | None = None,
        read_only: bool = False,
    ) -> None:
        for name in (table, schema):
            if not name.isidentifier():
                raise RecorderConfigError(f"invalid identifier {name!r}")
        self.codec = codec or DataCodec(False, None)
        self.dsn = dsn
        self.schema = schema
        self.table = table
        self.qualified = f'"{schema}"."{table}"'
        self.read_only = read_only
        self._conn: AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    def _c(self) -> AsyncConnection[Any]:
        if self._conn is None:
            raise RecorderError("postgresql storage is not open")
        return self._conn

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            import psycopg
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        try:
            name = f"agent-os flight recorder pid {os.getpid()} on {socket.gethostname()}"
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=name[:63]
            )
        except psycopg.Error as exc:
            raise RecorderError(f"postgresql: {exc}") from exc
        if self.read_only:
            await self._conn.execute("SET default_transaction_read_only = on")
            return
        try:
            await self._lock_writer(self._conn)
            q = self.qualified
            async with self._conn.transaction():
                await self._conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await self._conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {q} (seq BIGINT PRIMARY KEY, id TEXT NOT NULL, "
                    "ts BIGINT NOT NULL, event_type TEXT NOT NULL, agent_id TEXT NOT NULL, "
                    "execution_id TEXT, severity TEXT NOT NULL, data BYTEA NOT NULL, "
                    "prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"
                )
                await self._conn.execute(
                    f'CREATE INDEX IF NOT EXISTS "{self.table}_agent" ON {q} (agent_id, seq)'
                )
                await self._conn.execute(f'CREATE INDEX IF NOT EXISTS "{self.table}_ts" ON {q} (ts)')
        except BaseException as exc:
            conn, self._conn = self._conn, None
            await conn.close()
            if isinstance(exc, psycopg.Error):
                raise RecorderError(f"postgresql: {exc}") from exc
            raise

    async def _lock_writer(self, conn: AsyncConnection[Any]) -> None:
        """Take the table's advisory lock for the session, or raise RecorderInUse."""
        key = self.lock_key()
        # A holder whose client died still holds the lock until the server ends its backend,
        # which takes a moment: try for up to _LOCK_WAIT seconds before naming it.
        deadline = asyncio.get_running_loop().time() + _LOCK_WAIT
        while True:
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))).fetchone()
            if row is not None and row[0]:
                return
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        cur = await conn.execute(
            "SELECT a.pid, a.application_name, a.client_addr FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        )
        found = await cur.fetchone()
        holder = "another session"
        if found is not None:
            holder = f"backend pid {found[0]} ({found[1] or 'no application name'}, "
            holder += f"from {found[2] or 'a local socket'})"
        raise RecorderInUse(
            f"the flight recorder table {self.qualified} is already open for writing by {holder}: "
            "one recorder writes a table at a time"
        )

    def lock_key(self) -> int:
        """The advisory-lock key of this table (a signed 64-bit hash of schema and table; advisory
        locks are per database)."""
        digest = hashlib.blake2b(
            f"{self.schema}.{self.table}".encode(), digest_size=8, person=b"agentos-fr-lock"
        )
        return int.from_bytes(digest.digest(), "big", signed=True)

    async def close(self) -> None:
        if self._conn is not None:
            import psycopg

            conn, self._conn = self._conn, None
            try:
                # the lock goes with the connection anyway, but not at once
                if not conn.closed and not self.read_only:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (self.lock_key(),))
            except psycopg.Error:
                pass
            finally:
                await conn.close()

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        import psycopg

        async with self._lock:
            try:
                cur = await self._c().execute(sql, args)
                return [tuple(r) for r in await cur.fetchall()]
            except psycopg.Error as exc:
                raise RecorderError(f"postgresql: {exc}") from exc

    async def tail(self) -> tuple[int, str] | None:
        rows = await self._fetch(f"SELECT seq, hash FROM {self.qualified} ORDER BY seq DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    async def append(self, rows: Sequence[Row]) -> None:
        import psycopg

        conn = self._c()
        async with self._lock:
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    if rows:
                        await cur.execute(f"SELECT seq, hash FROM {self.qualified} ORDER BY seq DESC LIMIT 1")
                        check_continues(await cur.fetchone(), rows[0], f"postgresql {self.qualified}")
                    await self._copy(cur, rows)
            except psycopg.Error as exc:
                raise RecorderError(f"postgresql: {exc}") from exc

    async def _copy(self, cur: AsyncCursor[Any], rows: Sequence[Row]) -> None:
        encode = self.codec.encode
        async with cur.copy(f"COPY {self.qualified} ({_COLS}) FROM STDIN") as copy:
            for row in rows:
                seq, rid, ts, et, agent, exe, sev, data, prev, h = row
                stored = encode(seq, data)
                if type(stored) is str:
                    stored = stored.encode()
                await copy.write_row((seq, rid, ts, et, agent, exe, sev, stored, prev, h))

    async def select(self, where: Where) -> list[Row]:
        cond, args = where_sql(where, "%s")
        return await self._fetch(f"SELECT {_COLS} FROM {self.qualified}{cond}", args)

    async def scan(self, chunk: int = 10_000) -> AsyncIterator[list[Row]]:
        after = -(1 << 62)
        sql = f"SELECT {_COLS} FROM {self.qualified} WHERE seq > %s ORDER BY seq LIMIT {int(chunk)}"
        while True:
            rows = await self._fetch(sql, (after,))
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    async def newest_anchor(self) -> tuple[int, Any] | None:
        sql = f"SELECT seq, data FROM {self.qualified} WHERE event_type = %s ORDER BY seq DESC LIMIT 1"
        rows = await self._fetch(sql, (ANCHOR_EVENT,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    async def first_seq_after(self, ts_ns: int) -> int | None:
        rows = await self._fetch(f"SELECT MIN(seq) FROM {self.qualified} WHERE ts >= %s", (ts_ns,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    async def hash_at(self, seq: int) -> str | None:
        rows = await self._fetch(f"SELECT hash FROM {self.qualified} WHERE seq = %s", (seq,))
        return str(rows[0][0]) if rows else None

    async def delete_through(self, seq: int) -> int:
        import psycopg

        async with self._lock:
            try:
                cur = await self._c().execute(f"DELETE FROM {self.qualified} WHERE seq <= %s", (seq,))
                return cur.rowcount
            except psycopg.Error as exc:
                raise RecorderError(f"postgresql: {exc}") from exc
