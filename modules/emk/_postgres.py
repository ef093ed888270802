"""PostgreSQL + pgvector storage (also used, unchanged, for the embedded server).

One schema per namespace (``memories``, ``meta``, ``retention_log``) whose triggers make it
append-only; the schema, the triggers and the search strategy are described in ``docs/memory.md``.

Over 400 lines: the schema's SQL and the one class that owns it (connection, migrations, writes,
searches) belong together.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from array import array
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from agent_os.emk._store import Filters, Found, NamespaceInfo, Scope
from agent_os.emk.errors import (
    AlreadySuperseded,
    ConfigError,
    EmbedderMismatch,
    ForeignSupersedes,
    ImmutableRecord,
    StorageError,
    StorageUnavailable,
    UnknownSupersedes,
)
from agent_os.emk.records import RetentionRecord, Row

SCHEMA_VERSION = 1
MAX_INDEXED_DIMENSION = 2000  # pgvector's HNSW limit for the vector type
_LOCK_KEY = 0x656D6B  # "emk": advisory lock around schema creation
_KEY_DETAIL = re.compile(r"\(supersedes\)=\(([0-9a-fA-F-]+)\)")

_COLUMNS = (
    "id",
    "agent_id",
    "session_id",
    "content",
    "metadata_json",
    "tags",
    "supersedes",
    "created_at",
    "embedding",
    "content_hash",
)
_COPY_TYPES = ["uuid", "text", "text", "text", "text", "text[]", "uuid", "timestamptz", "vector", "text"]

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.memories (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id uuid PRIMARY KEY,
    agent_id text NOT NULL,
    session_id text,
    content text NOT NULL,
    metadata_json text NOT NULL,
    metadata jsonb GENERATED ALWAYS AS (metadata_json::jsonb) STORED,
    tags text[] NOT NULL,
    supersedes uuid UNIQUE,
    created_at timestamptz NOT NULL,
    embedding vector({dim}) NOT NULL,
    content_hash text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.retention_log (
    id uuid PRIMARY KEY,
    txid bigint NOT NULL DEFAULT txid_current(),
    older_than timestamptz NOT NULL,
    agent_id text,
    reason text NOT NULL,
    deleted bigint NOT NULL,
    executed_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS memories_scope ON {s}.memories (agent_id, session_id, created_at);
CREATE INDEX IF NOT EXISTS memories_created ON {s}.memories (created_at);
CREATE INDEX IF NOT EXISTS memories_tags ON {s}.memories USING gin (tags);
CREATE INDEX IF NOT EXISTS memories_metadata ON {s}.memories USING gin (metadata jsonb_path_ops);

CREATE OR REPLACE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'memories' THEN
        IF EXISTS (
            SELECT 1 FROM {s}.retention_log r
            WHERE r.txid = txid_current() AND OLD.created_at < r.older_than
              AND (r.agent_id IS NULL OR r.agent_id = OLD.agent_id)
        ) THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION 'emk: % on %.% refused: memories are append-only', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'EK001';
END $$;

CREATE OR REPLACE FUNCTION {s}.refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'emk: TRUNCATE on %.% refused: memories are append-only', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'EK001';
END $$;

CREATE OR REPLACE FUNCTION {s}.check_supersedes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_agent text;
    old_session text;
    isolation text;
BEGIN
    SELECT m.agent_id, m.session_id INTO old_agent, old_session
        FROM {s}.memories m WHERE m.id = NEW.supersedes;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'emk: no memory % to supersede', NEW.supersedes
            USING ERRCODE = 'EK002', DETAIL = NEW.supersedes::text;
    END IF;
    SELECT value INTO isolation FROM {s}.meta WHERE key = 'isolation';
    IF old_agent <> NEW.agent_id
       OR (isolation = 'session' AND old_session IS DISTINCT FROM NEW.session_id) THEN
        RAISE EXCEPTION 'emk: memory % belongs to another agent or session', NEW.supersedes
            USING ERRCODE = 'EK003', DETAIL = NEW.supersedes::text;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.memories
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.memories
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_truncate();
CREATE OR REPLACE TRIGGER check_supersedes BEFORE INSERT ON {s}.memories
    FOR EACH ROW WHEN (NEW.supersedes IS NOT NULL) EXECUTE FUNCTION {s}.check_supersedes();
CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.meta
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.meta
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_truncate();
CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.retention_log
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.retention_log
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_truncate();
REVOKE UPDATE, DELETE, TRUNCATE ON {s}.memories, {s}.meta, {s}.retention_log FROM PUBLIC;
"""

_tuple_new = tuple.__new__
_SEARCH_SHAPES = 256  # search statements kept rendered (filter shapes x limits); then started over

_EXTENSION = (
    "SELECT e.extversion, n.nspname FROM pg_catalog.pg_extension e"
    " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
)

_HNSW_DDL = """
CREATE INDEX IF NOT EXISTS memories_embedding ON {s}.memories
    USING hnsw (embedding vector_cosine_ops) WITH (m = {m}, ef_construction = {ef_construction});
"""

# The embedding's SHA-256 is computed where it is stored: vector_send gives a 4-byte header (the
# dimension and a reserved field) and the big-endian float32 values, exactly what
# records.embedding_digest hashes. A search then moves 64 hex characters per row, not the vector.
_COLUMNS_READ = (
    "m.id::text, m.agent_id, m.session_id, m.content, m.metadata_json, m.tags, m.supersedes::text, "
    "m.created_at, pg_catalog.encode(pg_catalog.sha256(pg_catalog.substr({vs}.vector_send(m.embedding), 5)),"
    " 'hex'), m.content_hash, "
)
_ROW_SELECT = (
    _COLUMNS_READ + "(SELECT n.id::text FROM {s}.memories n WHERE n.supersedes = m.id) AS superseded_by"
)
# Where the filter keeps only current records, none has a newer version: no lookup for it.
_CURRENT_ROW_SELECT = _COLUMNS_READ + "NULL::text AS superseded_by"


def _import_psycopg(extra: str) -> Any:
    try:
        import pgvector.psycopg  # noqa: F401
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"PostgreSQL storage needs {exc.name or 'psycopg'}: pip install 'agent-os[{extra}]'"
        ) from None
    return psycopg


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class _Lease:
    """``async with _Lease(pool) as conn``: a connection of the pool for the block.

    ``pool.connection()`` without its generator-based context manager and its transaction block
    (EMK's connections are in autocommit; a block that opens a transaction closes it): the
    pool's ``putconn`` rolls back a connection left in a transaction and replaces a broken
    one. Per search, ``pool.connection()`` cost about 70,000 instructions of the client's 1.1
    million; a lease costs about 18,000."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        self._conn = await self._pool.getconn()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        conn, self._conn = self._conn, None
        await self._pool.putconn(conn)


class PostgresStore:
    """Storage in one PostgreSQL schema (``namespace``) of the database at ``conninfo``."""

    def __init__(
        self,
        conninfo: str,
        namespace: str,
        *,
        pool_size: int = 4,
        ef_search: int = 40,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
        iterative_scan: bool | None = None,
        settings: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        defer_index: bool = False,
        extra: str = "postgres",
    ) -> None:
        if not namespace.isidentifier() or len(namespace) > 50:
            raise ConfigError(f"namespace {namespace!r} must be a short identifier (letters, digits, _)")
        if pool_size < 1 or ef_search < 1 or hnsw_m < 2 or hnsw_ef_construction < 4:
            raise ConfigError("pool_size, ef_search, hnsw_m and hnsw_ef_construction must be positive")
        self._psycopg = _import_psycopg(extra)  # the extra named when psycopg is missing
        self.conninfo = conninfo
        self.namespace = namespace
        self._pool_size = pool_size
        self._ef_search = ef_search
        self._hnsw = (hnsw_m, hnsw_ef_construction)
        self._iterative_wanted = iterative_scan
        self._settings = dict(settings or {})
        for name, value in self._settings.items():
            if type(name) is not str or not name.strip() or type(value) is not str:
                raise ConfigError(
                    f"settings must map PostgreSQL setting names to text, got {name!r}: {value!r}"
                )
        self._connect_timeout = connect_timeout
        self._defer_index = defer_index
        self._pool: Any = None
        self.exact_only = False
        self.pgvector_version = ""
        self.isolation = "agent"
        from psycopg import sql

        self._sql = sql
        self._s = sql.Identifier(namespace)
        self._vs = sql.Identifier("public")  # the vector extension's schema, read when opening
        self._searches: dict[tuple[Any, ...], bytes] = {}

    def _q(self, text: str, **params: Any) -> Any:
        return self._sql.SQL(text).format(s=self._s, vs=self._vs, **params)

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """Translate database errors into EMK errors, in one place."""
        psycopg = self._psycopg
        import psycopg_pool

        try:
            yield
        except psycopg.Error as exc:
            raise self._translate(exc) from exc
        except psycopg_pool.PoolTimeout as exc:
            raise StorageUnavailable(f"no database connection within the timeout: {exc}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"database connection failed: {exc}") from exc

    def _translate(self, exc: Any) -> Exception:
        psycopg = self._psycopg
        state = getattr(exc, "sqlstate", None)
        detail = exc.diag.message_detail if getattr(exc, "diag", None) is not None else None
        record_id = detail or ""
        if state == "EK001":
            return ImmutableRecord(str(exc.diag.message_primary or exc))
        if state == "EK002":
            return UnknownSupersedes(f"no memory {record_id} to supersede", record_id)
        if state == "EK003":
            return ForeignSupersedes(f"memory {record_id} belongs to another agent or session", record_id)
        if state == "23505" and (exc.diag.constraint_name or "").endswith("supersedes_key"):
            match = _KEY_DETAIL.search(record_id)
            found = match.group(1) if match else ""
            return AlreadySuperseded(f"memory {found} already has a newer version", found)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
            state is not None and state[:2] in ("08", "57")
        ):
            return StorageUnavailable(f"database connection lost; the operation was rolled back: {exc}")
        return StorageError(f"database error ({state}): {exc}")

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, info: NamespaceInfo) -> None:
        psycopg = self._psycopg
        from pgvector.psycopg import register_vector_async
        from psycopg_pool import AsyncConnectionPool

        if info.dimension > MAX_INDEXED_DIMENSION:
            raise ConfigError(
                f"{info.dimension} dimensions: pgvector indexes at most {MAX_INDEXED_DIMENSION}; choose a "
                "smaller model or shorten its vectors (LiteLLMEmbedder(..., request_dimensions=True))"
            )
        async with self._errors():
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=self._connect_timeout
            )
            async with conn:
                await self._migrate(conn, info)
        self.isolation = info.isolation
        iterative = _version(self.pgvector_version) >= (0, 8, 0)
        if self._iterative_wanted and not iterative:
            raise ConfigError(f"pgvector {self.pgvector_version} has no iterative index scans (0.8.0+)")
        if self._iterative_wanted is False:
            iterative = False
        # Without iterative scans an HNSW scan loses every candidate a filter removes, and every
        # search has filters (scope, superseded): search exactly instead.
        self.exact_only = not iterative
        settings = dict(self._settings)
        # Defaults for what the settings do not name (PostgreSQL's names ignore case). Times
        # come back with datetime.UTC as their tzinfo (psycopg maps the session's "UTC" to it),
        # not a ZoneInfo of the server's zone: each result's hash check takes the time's
        # microseconds, at half the cost.
        given = {name.lower() for name in settings}
        defaults = {"hnsw.ef_search": str(self._ef_search), "TimeZone": "UTC"}
        if iterative:
            defaults["hnsw.iterative_scan"] = "relaxed_order"
        settings.update((name, value) for name, value in defaults.items() if name.lower() not in given)

        async def configure(conn: Any) -> None:
            await register_vector_async(conn)
            for name, value in settings.items():
                await conn.execute("SELECT set_config(%s, %s, false)", (name, value))

        self._pool = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self._pool_size,
            kwargs={
                "autocommit": True,
                "connect_timeout": self._connect_timeout,
                "application_name": f"emk:{self.namespace}",
            },
            configure=configure,
            open=False,
            timeout=self._connect_timeout,
        )
        try:
            async with self._errors():
                await self._pool.open(wait=True, timeout=self._connect_timeout)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def _migrate(self, conn: Any, info: NamespaceInfo) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            row = await (await conn.execute(_EXTENSION)).fetchone()
            if row is None:
                try:
                    async with conn.transaction():
                        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except self._psycopg.Error as exc:
                    raise ConfigError(
                        f"pgvector is not installed in this database and cannot be created: {exc}"
                    ) from exc
                row = await (await conn.execute(_EXTENSION)).fetchone()
            self.pgvector_version = row[0]
            self._vs = self._sql.Identifier(row[1])
            await conn.execute(self._q(_DDL, dim=self._sql.Literal(info.dimension)))
            if not self._defer_index:
                await conn.execute(self._hnsw_ddl())
            wanted = {
                "schema_version": str(SCHEMA_VERSION),
                "dimension": str(info.dimension),
                "isolation": info.isolation,
                "embedding_model": info.model,
            }
            for key, value in wanted.items():
                await conn.execute(
                    self._q("INSERT INTO {s}.meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING"),
                    (key, value),
                )
            rows = await (await conn.execute(self._q("SELECT key, value FROM {s}.meta"))).fetchall()
        stored = dict(rows)
        if int(stored["schema_version"]) > SCHEMA_VERSION:
            raise ConfigError(f"namespace {self.namespace!r} has a newer schema ({stored['schema_version']})")
        if stored["dimension"] != wanted["dimension"] or stored["isolation"] != wanted["isolation"]:
            raise ConfigError(
                f"namespace {self.namespace!r} holds {stored['dimension']}-dimension vectors in "
                f"{stored['isolation']!r} isolation, not {info.dimension} / {info.isolation!r}"
            )
        if stored["embedding_model"] != info.model:
            raise EmbedderMismatch(
                f"namespace {self.namespace!r} was created with embedding model "
                f"{stored['embedding_model']!r}, not {info.model!r}: their vectors cannot be compared"
            )

    def _hnsw_ddl(self) -> Any:
        m, ef_construction = self._hnsw
        return self._q(_HNSW_DDL, m=self._sql.Literal(m), ef_construction=self._sql.Literal(ef_construction))

    async def build_index(self, maintenance_work_mem: str) -> None:
        """Create the HNSW index if it does not exist (after a bulk load with ``defer_index``)."""
        async with self._errors(), self._connection() as conn:
            await conn.execute(
                "SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,)
            )
            try:
                await conn.execute(self._hnsw_ddl())
            finally:
                await conn.execute("RESET maintenance_work_mem")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _connection(self) -> _Lease:
        if self._pool is None:
            raise StorageUnavailable("the PostgreSQL store is not open")
        return _Lease(self._pool)

    # -- writes ------------------------------------------------------------------------------

    async def insert(self, rows: Sequence[Row]) -> None:
        from pgvector import Vector

        copy_sql = self._q(
            "COPY {s}.memories ({cols}) FROM STDIN (FORMAT BINARY)",
            cols=self._sql.SQL(", ").join(map(self._sql.Identifier, _COLUMNS)),
        )
        async with (
            self._errors(),
            self._connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(copy_sql) as copy,
        ):
            copy.set_types(_COPY_TYPES)
            for r in rows:
                await copy.write_row(
                    (
                        uuid.UUID(r.id),
                        r.agent_id,
                        r.session_id,
                        r.content,
                        r.metadata_json,
                        list(r.tags),
                        uuid.UUID(r.supersedes) if r.supersedes else None,
                        r.created_at,
                        Vector(list(r.embedding)),
                        r.content_hash,
                    )
                )

    # -- reads -------------------------------------------------------------------------------

    def _where(self, scope: Scope, filters: Filters, isolation_clause: Any) -> tuple[Any, dict[str, Any]]:
        sql = self._sql
        parts = [isolation_clause]
        if not filters.include_superseded:
            parts.append(self._q("NOT EXISTS (SELECT 1 FROM {s}.memories n WHERE n.supersedes = m.id)"))
        if filters.tags:
            parts.append(sql.SQL("m.tags @> %(tags)s::text[]"))
        if filters.metadata:
            parts.append(sql.SQL("m.metadata @> %(metadata)s::jsonb"))
        if filters.since is not None:
            parts.append(sql.SQL("m.created_at >= %(since)s"))
        if filters.until is not None:
            parts.append(sql.SQL("m.created_at < %(until)s"))
        return sql.SQL(" AND ").join(parts), _where_params(scope, filters)

    def _isolation(self, isolation: str) -> Any:
        """The scope predicate, part of every read statement."""
        if isolation == "agent":
            return self._sql.SQL("m.agent_id = %(agent_id)s")
        if isolation == "session":
            return self._sql.SQL("m.agent_id = %(agent_id)s AND m.session_id = %(session_id)s")
        return self._sql.SQL("TRUE")

    def _found(self, rec: Sequence[Any], distance: float | None = None) -> Found:
        # id, agent_id, session_id, content, metadata_json, tags, supersedes, created_at,
        # embedding (not read back: its digest is), content_hash, embedding_sha256
        # The named tuples' own __new__ parse their arguments in Python: built directly.
        row: Row = _tuple_new(
            Row, (rec[0], rec[1], rec[2], rec[3], rec[4], tuple(rec[5]), rec[6], rec[7], (), rec[9], rec[8])
        )
        found: Found = _tuple_new(Found, (row, rec[10], distance))
        return found

    async def search(
        self, scope: Scope, vector: Sequence[float], limit: int, filters: Filters, exact: bool
    ) -> list[Found]:
        import numpy as np
        from pgvector import Vector

        params = _where_params(scope, filters)  # the SQL is composed only on a cache miss
        # A float32 array (what EMK.search checked) goes in without a list of Python floats.
        f32 = vector if isinstance(vector, array) and vector.typecode == "f" else array("f", vector)
        params["q"] = Vector(np.frombuffer(f32, dtype=np.float32))
        exact = exact or self.exact_only
        current = not filters.include_superseded
        key = (exact, int(limit), current, *sorted(params))
        async with self._errors(), self._connection() as conn:
            query = self._searches.get(key)
            if query is None:
                if len(self._searches) >= _SEARCH_SHAPES:
                    self._searches.clear()
                where, _ = self._where(scope, filters, self._isolation(self.isolation))
                sql = self._search_sql(where, exact, int(limit), current)
                query = self._searches[key] = sql.as_bytes(conn)
            # Results in binary, as every read of records here: psycopg loads them in half the
            # time of text (timestamps and tag arrays above all).
            rows = await (await conn.execute(query, params, prepare=True, binary=True)).fetchall()
        return [self._found(r, float(r[11])) for r in rows]

    def _search_sql(self, where: Any, exact: bool, limit: int, current: bool) -> Any:
        """The search statement for one shape of filters and one limit (rendered once and
        cached: composing it costs more than the rest of the client's work). The limit is a
        literal: with a parameter, the prepared statement's generic plan does not know it and
        the index scan costs about a fifth more."""
        # The query vector travels in binary (%b): 4 bytes a dimension, no float formatting.
        # "+ 0" keeps the planner off the HNSW index: an exact scan over the filtered rows.
        distance = "(m.embedding <=> %(q)b) + 0" if exact else "m.embedding <=> %(q)b"
        # One pass over the index: the row's columns come with it (the heap tuple is read anyway);
        # the outer ORDER BY puts back in order what relaxed_order scans may return slightly out.
        return self._q(
            "SELECT * FROM (SELECT "
            + (_CURRENT_ROW_SELECT if current else _ROW_SELECT)
            + ", {distance} AS distance FROM {s}.memories m "
            "WHERE {where} ORDER BY {distance} LIMIT {limit}) hits ORDER BY hits.distance, hits.id",
            distance=self._sql.SQL(distance),
            where=where,
            limit=self._sql.Literal(limit),
        )

    async def query(self, scope: Scope, limit: int, filters: Filters, newest_first: bool) -> list[Found]:
        where, params = self._where(scope, filters, self._isolation(self.isolation))
        params["limit"] = limit
        order = "m.created_at DESC, m.seq DESC" if newest_first else "m.created_at, m.seq"
        query = self._q(
            "SELECT " + _ROW_SELECT + " FROM {s}.memories m WHERE {where} ORDER BY {order} LIMIT %(limit)s",
            where=where,
            order=self._sql.SQL(order),
        )
        async with self._errors(), self._connection() as conn:
            rows = await (await conn.execute(query, params, binary=True)).fetchall()
        return [self._found(r) for r in rows]

    async def get(self, scope: Scope, record_id: str) -> Found | None:
        query = self._q(
            "SELECT " + _ROW_SELECT + " FROM {s}.memories m WHERE m.id = %(id)s AND {scope}",
            scope=self._isolation(self.isolation),
        )
        params = {"id": record_id, "agent_id": scope.agent_id, "session_id": scope.session_id}
        async with self._errors(), self._connection() as conn:
            row = await (await conn.execute(query, params, binary=True)).fetchone()
        return None if row is None else self._found(row)

    async def history(self, scope: Scope, record_id: str) -> list[Found]:
        scope_sql = self._isolation(self.isolation)
        query = self._q(
            # The path stops a chain that comes back to itself (only tampering behind the
            # triggers can make one): the query ends, and the records' hash checks report it.
            "WITH RECURSIVE chain(id, supersedes, depth, path) AS ("
            " SELECT m.id, m.supersedes, 0, ARRAY[m.id] FROM {s}.memories m WHERE m.id = %(id)s AND {scope}"
            " UNION ALL"
            " SELECT m.id, m.supersedes, chain.depth + 1, chain.path || m.id FROM chain JOIN {s}.memories m"
            " ON m.id = chain.supersedes WHERE {scope} AND NOT m.id = ANY(chain.path))"
            " SELECT " + _ROW_SELECT + " FROM chain JOIN {s}.memories m ON m.id = chain.id"
            " WHERE {scope} ORDER BY chain.depth",
            scope=scope_sql,
        )
        params = {"id": record_id, "agent_id": scope.agent_id, "session_id": scope.session_id}
        async with self._errors(), self._connection() as conn:
            rows = await (await conn.execute(query, params, binary=True)).fetchall()
        return [self._found(r) for r in rows]

    # -- retention ---------------------------------------------------------------------------

    async def apply_retention(
        self, older_than: datetime, agent_id: str | None, reason: str, executed_at: datetime, log_id: str
    ) -> RetentionRecord:
        scope = "m.created_at < %(older_than)s AND (%(agent_id)s::text IS NULL OR m.agent_id = %(agent_id)s)"
        params = {"older_than": older_than, "agent_id": agent_id}
        async with self._errors(), self._connection() as conn, conn.transaction():
            # Block concurrent inserts so the recorded count is the deleted count.
            await conn.execute(self._q("LOCK TABLE {s}.memories IN SHARE ROW EXCLUSIVE MODE"))
            count_row = await (
                await conn.execute(self._q("SELECT count(*) FROM {s}.memories m WHERE " + scope), params)
            ).fetchone()
            count = int(count_row[0])
            await conn.execute(
                self._q(
                    "INSERT INTO {s}.retention_log (id, older_than, agent_id, reason, deleted, executed_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s)"
                ),
                (log_id, older_than, agent_id, reason, count, executed_at),
            )
            cur = await conn.execute(self._q("DELETE FROM {s}.memories m WHERE " + scope), params)
            if cur.rowcount != count:
                raise StorageError(
                    f"retention deleted {cur.rowcount} memories, expected {count}; rolled back"
                )
        return RetentionRecord(
            id=log_id,
            older_than=older_than,
            agent_id=agent_id,
            reason=reason,
            deleted=count,
            executed_at=executed_at,
        )

    async def retention_log(self) -> list[RetentionRecord]:
        query = self._q(
            "SELECT id, older_than, agent_id, reason, deleted, executed_at FROM {s}.retention_log "
            "ORDER BY executed_at, id"
        )
        async with self._errors(), self._connection() as conn:
            rows = await (await conn.execute(query)).fetchall()
        return [
            RetentionRecord(
                id=str(r[0]), older_than=r[1], agent_id=r[2], reason=r[3], deleted=int(r[4]), executed_at=r[5]
            )
            for r in rows
        ]


def _where_params(scope: Scope, filters: Filters) -> dict[str, Any]:
    """The parameters of :meth:`PostgresStore._where`'s clause (without composing the SQL)."""
    params: dict[str, Any] = {"agent_id": scope.agent_id, "session_id": scope.session_id}
    if filters.tags:
        params["tags"] = list(filters.tags)
    if filters.metadata:
        params["metadata"] = json.dumps(filters.metadata)
    if filters.since is not None:
        params["since"] = filters.since
    if filters.until is not None:
        params["until"] = filters.until
    return params
