"""The execute side of :meth:`Policy.no_destructive_sql`: which texts an agent is given read as
SQL, and whether they are destructive.

Free text is not SQL and is never judged; text that a parser of the guard's dialects reads as
statements, whole or in one of its ``;``-separated parts, is judged by the SQL guard as a
whole, and so fails closed like any SQL. What counts, and why: ``docs/control-plane.md``
(Guards, Execute).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from agent_os.control_plane.policy.regex import compile_regex
from agent_os.control_plane.policy.sql_guard import SqlGuard

# The words a statement can start with in the dialects the guard reads (PostgreSQL, MySQL and
# MariaDB, SQLite, and the usual heads of other dialects). Text holding none of them as a word
# cannot be a statement: the fast path for free text is this one search.
STATEMENT_HEADS: Final = frozenset({
    "abort", "alter", "analyse", "analyze", "attach", "backup", "begin", "binlog", "cache", "call",
    "change", "checkpoint", "check", "checksum", "close", "cluster", "comment", "commit", "copy",
    "create", "deallocate", "declare", "delete", "desc", "describe", "detach", "discard", "do", "drop",
    "end", "exec", "execute", "explain", "fetch", "flush", "get", "grant", "handler", "help", "import",
    "insert", "install", "kill", "listen", "load", "lock", "merge", "move", "notify", "optimize",
    "pragma", "prepare", "purge", "reassign", "refresh", "reindex", "release", "rename", "repair",
    "replace", "reset", "resignal", "restore", "revoke", "rollback", "savepoint", "security", "select",
    "set", "show", "shutdown", "signal", "start", "stop", "table", "truncate", "uninstall", "unlisten",
    "unlock", "update", "upsert", "use", "vacuum", "values", "with", "xa",
})  # fmt: skip
# RE2: one linear scan whatever the number of words (Python's re tries each word at each place).
_HEAD: Final = compile_regex(r"(?i)\b(?:" + "|".join(sorted(STATEMENT_HEADS)) + r")\b")


# What a server may run that no parser shows as a statement: MySQL's and MariaDB's executable
# comments, and a NUL (a server reading up to it, or past it, sees other text than the parsers).
_HIDDEN: Final = compile_regex(r"(?i)/\*m?!|\x00")


# Statements MySQL and MariaDB run that no parser of the guard reads (pglast does not know them,
# sqlglot falls back to a Command, as it does for free text like "Drop the report"), known by
# the words they start with: text starting so (or a ``;``-separated part of it) is SQL.
_SERVER_ONLY: Final = compile_regex(
    r"(?i)^(?:load\s+(?:data|xml|index)\b|handler\s+\S+\s+(?:open|read|close)\b"
    r"|begin\s+not\s+atomic\b|xa\s+(?:start|begin|end|prepare|commit|rollback|recover)\b"
    r"|prepare\s+\S+\s+from\b|execute\s+(?:immediate\b|[a-z_]\w*\s*(?:using\b|$))"
    r"|deallocate\s+prepare\b|call\s+[\w.`]+\s*(?:\(|$)|do\s+[\w.`]+\s*\("
    r"|create\s+(?:or\s+replace\s+)?(?:definer\s*=|trigger|event|procedure|function|aggregate"
    r"|server|user|role|table|database|schema|view|index|sequence|temporary|unique)\b"
    r"|alter\s+(?:online\s+|ignore\s+)?(?:table|database|schema|user|event|procedure|function|view"
    r"|server|tablespace|logfile|instance|sequence|definer)\b"
    r"|drop\s+(?:table|database|schema|view|index|user|role|event|procedure|function|trigger|server"
    r"|temporary|sequence|if)\b|rename\s+(?:table|user)\b|truncate\s+(?:table\s+)?[\w`\x22.]+\s*$"
    r"|delete\s+(?:low_priority\s+|quick\s+|ignore\s+)*[\w`.]+(?:\s*,\s*[\w`.]+)*\s+from\b"
    r"|replace\s+(?:low_priority\s+|delayed\s+)?(?:into\b|[\w`.]+\s*(?:\(|values\b|set\b|select\b))"
    r"|(?:grant|revoke)\s+[^;]*\bon\b|lock\s+tables?\b|unlock\s+tables?\b"
    r"|(?:optimize|repair|analyze|check|checksum)\s+(?:no_write_to_binlog\s+|local\s+)?tables?\b"
    r"|set\s+(?:global|persist|persist_only|names|password|character\s+set|@@)\b?"
    r"|kill\s+(?:connection\b|query\b|\d)|shutdown\s*$|(?:un)?install\s+(?:plugin|soname)\b"
    r"|purge\s+(?:binary|master)\s+logs\b|change\s+(?:master|replication)\b"
    r"|reset\s+(?:master|slave|replica|query)\b|binlog\s+'"
    r"|flush\s+(?:tables|privileges|logs|hosts|status|binary|engine|error|general|relay|slow"
    r"|query|user_resources|local|no_write_to_binlog)\b)"
)
_LEADING: Final = compile_regex(r"^(?:\s+|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|/\*(?:[^*]|\*+[^*/])*\*+/)+")


def _server_only(part: str) -> bool:
    """Whether ``part``, past leading whitespace and comments, starts a server-only statement."""
    lead = _LEADING.match(part)
    return _SERVER_ONLY.search(part[lead.end() :] if lead is not None else part) is not None


class SqlContent:
    """``check(text)``: why ``text`` is destructive SQL for ``guard``, or None when it is not
    SQL or is harmless SQL.

    ``text`` reads as SQL when a parser of one of the guard's dialects reads it, or one of its
    ``;``-separated parts, as statements (not as a bare expression or sqlglot's fallback
    Command), or one of them starts a statement MySQL runs and those parsers do not read
    (``PREPARE s FROM``, ``LOAD DATA``, ``CREATE TRIGGER``, ...); then the guard judges the
    whole text. A text holding a statement word and an executable comment (``/*! ... */``,
    ``/*M! ... */``) or a NUL, or over the guard's ``max_length``, is judged by the guard
    without asking whether it reads as SQL (the guard refuses them: fail closed). Never
    raises.
    """

    __slots__ = ("_reads", "guard")

    def __init__(self, guard: SqlGuard) -> None:
        self.guard = guard
        self._reads: list[Callable[[str], bool]] = guard.readers()

    def __call__(self, text: str) -> str | None:
        if _HEAD.search(text) is None:
            return None
        guard = self.guard
        if len(text) > guard.max_length or _HIDDEN.search(text) is not None:
            return guard(text)
        parts = [text]
        if ";" in text:
            parts += [p for p in text.split(";") if _HEAD.search(p) is not None]
        try:
            sql = any(_server_only(part) for part in parts) or any(
                reads(part) for part in parts for reads in self._reads
            )
        except Exception as exc:  # fail closed: a parser's failure on SQL-like text denies
            return f"text the guard cannot read ({type(exc).__name__})"
        return guard(text) if sql else None

    def __repr__(self) -> str:
        return f"SqlContent({self.guard!r})"
