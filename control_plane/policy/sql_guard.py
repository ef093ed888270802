"""The check behind :meth:`Policy.no_destructive_sql`: SQL text read by a real parser per dialect.

:class:`SqlGuard` reads the text with PostgreSQL's own parser (pglast) or sqlglot's reading of
another dialect, under every setting of the server that changes how text is lexed, and says why
it is destructive or None. It fails closed: text a parser cannot read, a statement kind it does
not list as harmless, and text over the length bound are all destructive. The rules, the
dialects and the limits are in ``docs/control-plane.md`` (Guards).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final

from agent_os.control_plane.errors import PolicyError

MAX_SQL_LENGTH: Final = 8_192
"""The default bound on the SQL text's length, in characters; longer text is refused."""

CATEGORIES: Final = frozenset({"dynamic", "routines", "server", "privileges", "maintenance"})
"""What ``allow=`` may name: kinds of statement denied by default because the guard cannot see
what they will do (``docs/control-plane.md``, Guards)."""

CATEGORY_WORDS: Final = {
    "dynamic": "dynamic SQL the guard cannot see",
    "routines": "code that runs later or elsewhere",
    "server": "acts on the server, its files or other sessions",
    "privileges": "changes privileges",
    "maintenance": "maintenance that locks or rewrites tables",
}

# Built-in functions (lower-case names) that act outside the statement: on other sessions, the
# server's files, large objects, other databases, or that run SQL given as text. One list for
# every dialect: a name means the same thing wherever it exists.
FUNCTIONS: Final = {
    **dict.fromkeys((
        "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
        "cursor_to_xmlschema", "ts_stat", "dblink", "dblink_exec", "dblink_open",
        "dblink_send_query", "dblink_fetch",
    ), "dynamic"),
    **dict.fromkeys((
        "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
        "pg_promote", "pg_switch_wal", "pg_create_restore_point", "pg_drop_replication_slot",
        "pg_replication_origin_drop", "pg_read_file", "pg_read_binary_file", "pg_ls_dir",
        "pg_stat_file", "pg_file_write", "pg_file_rename", "pg_file_unlink", "pg_file_sync",
        "pg_logdir_ls", "lo_import", "lo_export", "lo_unlink", "lo_truncate", "lo_truncate64",
        "lo_put", "lo_create", "lo_creat", "lo_from_bytea", "lo_open", "lowrite", "set_config",
        "pg_stat_reset", "pg_stat_reset_shared", "pg_stat_reset_single_table_counters",
        "pg_stat_statements_reset", "pg_backup_start", "pg_backup_stop", "pg_wal_replay_pause",
        "pg_wal_replay_resume", "pg_replication_slot_advance", "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot", "pg_log_backend_memory_contexts",
        # MySQL/MariaDB (and common UDFs), SQLite
        "load_file", "sys_exec", "sys_eval", "load_extension", "readfile", "writefile", "edit",
        "fts3_tokenizer",
    ), "server"),
}  # fmt: skip

WRITING_FUNCTIONS: Final = frozenset({"nextval", "setval"})
"""Functions that write though they are called by a query (for :func:`statements_reading`)."""

_ALIASES: Final = {"postgres": "postgresql", "mariadb": "mysql", "sqlite3": "sqlite"}
_ANY: Final = ("postgresql", "mysql", "sqlite")

Judge = Callable[[str], "str | None"]


class SqlGuard:
    """Why a text of SQL statements is destructive in ``dialect``, or None when it is not.

    Args:
        dialect: ``"any"`` (the default: every reading of PostgreSQL, MySQL/MariaDB and SQLite
            must parse and be harmless), ``"postgresql"``, ``"mysql"`` (MariaDB too),
            ``"sqlite"``, or another dialect sqlglot reads (``"tsql"``, ``"oracle"``, ...).
        allow: categories of :data:`CATEGORIES` to let through.
        max_length: text longer than this many characters is refused.

    Raises PolicyError for an unknown dialect or category, or a ``max_length`` below 1.
    Calling it never raises: an error while reading the text is a reason to deny.
    """

    __slots__ = ("_judges", "allow", "dialect", "max_length")

    def __init__(
        self, dialect: str = "any", allow: Collection[str] = (), max_length: int = MAX_SQL_LENGTH
    ) -> None:
        if not isinstance(dialect, str):
            raise PolicyError(f"dialect must be a string, got {type(dialect).__name__}")
        allowed = frozenset(allow) if not isinstance(allow, str) else frozenset({allow})
        unknown = allowed - CATEGORIES
        if unknown:
            raise PolicyError(f"allow: unknown categories {sorted(unknown)}; known: {sorted(CATEGORIES)}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise PolicyError(f"max_length must be a positive integer, got {max_length!r}")
        name = dialect.strip().lower()
        name = _ALIASES.get(name, name)
        self.dialect = name
        self.allow = allowed
        self.max_length = max_length
        self._judges = [_judge_for(d, allowed) for d in (_ANY if name == "any" else (name,))]

    def __call__(self, text: str) -> str | None:
        if not isinstance(text, str):
            return f"SQL text must be a string, got {type(text).__name__}"
        if len(text) > self.max_length:
            return f"SQL text of {len(text)} characters is over the limit of {self.max_length}"
        if "\0" in text:
            return "SQL text with a NUL character"
        for judge in self._judges:
            try:
                why = judge(text)
            except RecursionError:
                why = "SQL nested too deeply to read"
            except Exception as exc:  # fail closed: whatever a parser does is a reason to deny
                why = f"SQL the guard cannot read ({type(exc).__name__})"
            if why is not None:
                return why
        return None

    def readers(self) -> list[Callable[[str], bool]]:
        """One function per dialect of this guard: whether that dialect's parser reads a text
        as statements (see :class:`~agent_os.control_plane.policy.sql_content.SqlContent`)."""
        return [_parser_for(d) for d in (_ANY if self.dialect == "any" else (self.dialect,))]

    def __repr__(self) -> str:
        return f"SqlGuard({self.dialect!r}, allow={sorted(self.allow)}, max_length={self.max_length})"


def _judge_for(dialect: str, allow: frozenset[str]) -> Judge:
    if dialect == "postgresql":
        from agent_os.control_plane.policy.sql_postgres import judge_postgres

        return lambda text: judge_postgres(text, allow)
    from agent_os.control_plane.policy.sql_sqlglot import sqlglot_judge

    judge = sqlglot_judge(dialect, allow)
    if judge is None:
        raise PolicyError(
            f"unknown SQL dialect {dialect!r}: 'any', 'postgresql', 'mysql', 'sqlite' or a sqlglot dialect"
        )
    return judge


def statements_reading(text: str, dialect: str) -> list[bool] | None:
    """For each statement of ``text``, whether it only reads (a query, EXPLAIN or SHOW, with
    nothing inside that writes, locks or acts on the server), read by ``dialect``'s parser
    (``postgresql``: PostgreSQL's own; others: sqlglot); None when the parser cannot read the
    text, or for an unknown dialect. Never raises. A caller that needs a permission reads
    None, and any False, as a write (fail closed); the database should still run a read in a
    read-only transaction, since a function called by a query can write."""
    if not isinstance(text, str) or "\0" in text or len(text) > MAX_SQL_LENGTH:
        return None
    name = _ALIASES.get(dialect.strip().lower(), dialect.strip().lower())
    try:
        if name == "postgresql":
            from agent_os.control_plane.policy.sql_postgres import reads_postgres

            return reads_postgres(text)
        from agent_os.control_plane.policy.sql_sqlglot import reads_sqlglot

        return reads_sqlglot(text, name)
    except RecursionError:
        return None
    except Exception:  # fail closed: whatever a parser does means "cannot tell"
        return None


def _parser_for(dialect: str) -> Callable[[str], bool]:
    if dialect == "postgresql":
        from agent_os.control_plane.policy.sql_postgres import parses_postgres

        return parses_postgres
    from agent_os.control_plane.policy.sql_sqlglot import sqlglot_parses

    parses = sqlglot_parses(dialect)
    if parses is None:  # not reached: the guard was built for this dialect
        raise PolicyError(f"unknown SQL dialect {dialect!r}")
    return parses
