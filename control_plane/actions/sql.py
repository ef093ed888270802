"""The ``sql.query`` provider: one SQL statement on a named database (:class:`Sql`).

The policy judges it as operation ``sql`` with the SQL text as the resource, so
``Policy.no_destructive_sql()`` applies as is. The permission it needs comes from the statement,
read by the SQL guard's parsers: ``read`` for one statement that only reads, ``write`` for
anything else, text the parser cannot read included. A read runs in a read-only transaction
(PostgreSQL) or on a read-only connection (SQLite), so the database refuses a write the reading
missed. Values are passed as bound parameters, never formatted into the text. Guarantees and
limits: ``docs/control-plane.md`` (Actions). PostgreSQL needs psycopg (``postgres`` extra).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.errors import KernelError
from agent_os.control_plane.policy.sql_guard import MAX_SQL_LENGTH, statements_reading

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest

INSTALL_HINT: Final = "sql.query on PostgreSQL needs psycopg: pip install 'agent-os[postgres]'"
MAX_ROWS: Final = 1_000
MAX_ARGS: Final = 1_000
_SCALARS: Final = (str, int, float, bool, bytes, type(None))
_PG_SCHEMES: Final = ("postgresql://", "postgres://")


class SqlError(Exception):
    """A statement failed: the database's error, or the statement timeout."""


@dataclass(frozen=True, slots=True)
class Database:
    """A configured connection: ``kind`` (``sqlite`` or ``postgresql``), and ``where`` (the
    SQLite file's absolute path or the PostgreSQL DSN)."""

    kind: Literal["sqlite", "postgresql"]
    where: str

    @property
    def dialect(self) -> str:
        return self.kind

    def __repr__(self) -> str:  # a DSN may hold a password
        shown = self.where if self.kind == "sqlite" else self.where.split("@")[-1]
        return f"Database({self.kind!r}, {shown!r})"


class Sql:
    """The ``sql.query`` action: the target is the SQL text (one statement); params ``args``
    (bound parameters: a list for positional placeholders, a mapping for named ones; SQLite
    ``?``/``:name``, PostgreSQL its own ``$1``, ``$2`` ..., a list, so the text the guard reads
    is the text the server parses) and ``database`` (a name of
    ``databases``; may be left out when there is only one).

    ``databases``: name to a PostgreSQL DSN (``postgresql://...``) or an existing SQLite file
    (a path; never created). ``timeout``: seconds a statement may run (the server's
    ``statement_timeout`` on PostgreSQL, an interrupt on SQLite); ``max_rows``: the most rows
    returned (the output says ``truncated``). Raises KernelError for an empty or bad
    configuration."""

    ACTION: Final = "sql.query"
    OPERATION: Final = "sql"

    def __init__(
        self,
        databases: Mapping[str, str | os.PathLike[str]],
        *,
        timeout: float = 30.0,
        max_rows: int = MAX_ROWS,
    ) -> None:
        if not isinstance(databases, Mapping) or not databases:
            raise KernelError("Sql needs at least one database: {name: DSN or SQLite path}")
        self.databases: dict[str, Database] = {}
        for name, where in databases.items():
            if not isinstance(name, str) or not name:
                raise KernelError(f"a database name is a non-empty string, got {name!r}")
            if not isinstance(where, str | os.PathLike):
                raise KernelError(f"database {name!r}: a DSN or a path, got {type(where).__name__}")
            text = os.fspath(where)
            if text.startswith(_PG_SCHEMES):
                self.databases[name] = Database("postgresql", text)
            elif os.path.isfile(text):
                self.databases[name] = Database("sqlite", os.path.realpath(text))
            else:
                raise KernelError(f"database {name!r}: not a postgresql:// DSN or an existing SQLite file")
        seconds(timeout, "timeout", error=KernelError)
        whole(max_rows, "max_rows", 0, error=KernelError)
        self.timeout = float(timeout)
        self.max_rows = max_rows

    def __repr__(self) -> str:
        return f"Sql({sorted(self.databases)!r})"

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``sql.query`` (operation ``sql``; permission ``read`` or ``write`` by the
        statement, ``write`` in listings) in ``registry``."""
        registry.register(self.ACTION, self, "write", operation=self.OPERATION, replace=replace)

    # -- the provider ---------------------------------------------------------------------------

    def database(self, request: ActionRequest) -> tuple[str, Database]:
        """The request's database (name and connection). Raises ActionRefused."""
        name = request.params.get("database")
        if name is None:
            if len(self.databases) != 1:
                raise ActionRefused(f"params['database'] is needed: one of {sorted(self.databases)}")
            name = next(iter(self.databases))
        if not isinstance(name, str) or name not in self.databases:
            raise ActionRefused(f"unknown database {name!r}: one of {sorted(self.databases)}")
        return name, self.databases[name]

    def resource(self, request: ActionRequest) -> str:
        """The SQL text; refuses text that is not a string, empty or over the guard's length
        bound, more than one statement, an unknown database, and malformed ``args``."""
        sql = request.target
        if not isinstance(sql, str) or not sql.strip():
            raise ActionRefused("the target of sql.query is the SQL text (a non-empty string)")
        if len(sql) > MAX_SQL_LENGTH or "\0" in sql:
            raise ActionRefused(f"SQL text over {MAX_SQL_LENGTH} characters, or with a NUL")
        _, db = self.database(request)
        reading = statements_reading(sql, db.dialect)
        if reading is not None and len(reading) > 1:
            raise ActionRefused(f"{len(reading)} statements: sql.query runs one")
        _args(request, db)
        return sql

    def permission(self, request: ActionRequest) -> str:
        """``read`` when the text is one statement that only reads, else ``write``."""
        return "read" if self._reads(request) else "write"

    def context(self, request: ActionRequest) -> dict[str, Any]:
        """``database`` (the name) and ``dialect`` for the policy's conditions."""
        name, db = self.database(request)
        return {"database": name, "dialect": db.dialect}

    async def run(self, request: ActionRequest) -> dict[str, Any]:
        """Run the statement. Output: ``columns`` (names; empty for a statement without
        rows), ``rows`` (lists of values, at most ``max_rows``), ``truncated`` and
        ``rowcount`` (rows changed, or -1). Raises SqlError."""
        _, db = self.database(request)
        args = _args(request, db)
        reads = self._reads(request)
        if db.kind == "sqlite":
            return await asyncio.to_thread(self._sqlite, db.where, request.target, args, reads)
        return await self._postgres(db.where, request.target, args, reads)

    def _reads(self, request: ActionRequest) -> bool:
        _, db = self.database(request)
        reading = statements_reading(request.target, db.dialect)
        return reading is not None and reading == [True]

    def _sqlite(self, path: str, sql: str, args: Any, reads: bool) -> dict[str, Any]:
        uri = f"file:{quote(path)}?mode={'ro' if reads else 'rw'}"
        deadline = time.monotonic() + self.timeout
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level="DEFERRED")
        except sqlite3.Error as exc:
            raise SqlError(f"cannot open the database: {exc}") from None
        try:
            if reads:
                conn.execute("PRAGMA query_only = ON")
            conn.set_authorizer(_sqlite_authorizer)
            conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1_000)
            cursor = conn.execute(sql, args)
            rows = cursor.fetchmany(self.max_rows + 1) if cursor.description else []
            columns = [d[0] for d in cursor.description or ()]
            if not reads:
                conn.commit()
            return _output(columns, rows, self.max_rows, cursor.rowcount)
        except (sqlite3.Error, sqlite3.Warning) as exc:
            if time.monotonic() > deadline:
                raise SqlError(f"statement timeout ({self.timeout}s)") from None
            raise SqlError(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    async def _postgres(self, dsn: str, sql: str, args: Any, reads: bool) -> dict[str, Any]:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError(INSTALL_HINT) from exc
        ms = max(1, int(self.timeout * 1000))
        try:
            async with asyncio.timeout(self.timeout + 5):
                conn = await psycopg.AsyncConnection.connect(
                    dsn, options=f"-c statement_timeout={ms}", cursor_factory=psycopg.AsyncRawCursor
                )
                async with conn:
                    await conn.set_read_only(reads)
                    async with conn.cursor() as cursor:
                        await cursor.execute(sql, args or None, prepare=False)  # $1 placeholders
                        rows = await cursor.fetchmany(self.max_rows + 1) if cursor.description else []
                        columns = [d.name for d in cursor.description or ()]
                        count = cursor.rowcount
                    if reads:
                        await conn.rollback()
                    return _output(columns, [tuple(r) for r in rows], self.max_rows, count)
        except TimeoutError:
            raise SqlError(f"statement timeout ({self.timeout}s)") from None
        except psycopg.errors.QueryCanceled:
            raise SqlError(f"statement timeout ({self.timeout}s)") from None
        except psycopg.Error as exc:
            raise SqlError(f"{type(exc).__name__}: {exc}") from None


_SQLITE_REFUSED: Final = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})


def _sqlite_authorizer(action: int, *_: str | None) -> int:
    """Keeps a statement on its configured file: ATTACH (which opens or creates any file the
    process can reach) and DETACH are denied."""
    return sqlite3.SQLITE_DENY if action in _SQLITE_REFUSED else sqlite3.SQLITE_OK


def _args(request: ActionRequest, db: Database) -> Any:
    args = request.params.get("args", ())
    if isinstance(args, Mapping) and db.kind == "postgresql":
        raise ActionRefused("PostgreSQL takes positional args ($1, $2 ...): pass a list")
    if isinstance(args, Mapping):
        values = list(args.values())
        if not all(isinstance(k, str) for k in args):
            raise ActionRefused("params['args'] as a mapping needs str keys")
        bound: Any = dict(args)
    elif isinstance(args, list | tuple):
        values = list(args)
        bound = tuple(args)
    else:
        raise ActionRefused("params['args'] must be a list (positional) or a mapping (named)")
    if len(values) > MAX_ARGS:
        raise ActionRefused(f"more than {MAX_ARGS} args")
    for value in values:
        if not isinstance(value, _SCALARS):
            raise ActionRefused(
                f"an arg must be str, int, float, bool, bytes or None, got {type(value).__name__}"
            )
    return bound


def _output(columns: list[str], rows: list[Any], limit: int, rowcount: int) -> dict[str, Any]:
    return {
        "columns": columns,
        "rows": [list(r) for r in rows[:limit]],
        "truncated": len(rows) > limit,
        "rowcount": rowcount,
    }
