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


class SqlContent:
    """``check(text)``: why ``text`` is destructive SQL for ``guard``, or None when it is not
    SQL or is harmless SQL.

    ``text`` reads as SQL when a parser of one of the guard's dialects reads it, or one of its
    ``;``-separated parts, as statements (not as a bare expression or an unknown command);
    then the guard judges the whole text. A text holding a statement word and an executable
    comment (``/*! ... */``, ``/*M! ... */``) or a NUL, or over the guard's ``max_length``, is
    judged by the guard without asking whether it reads as SQL (the guard refuses them: fail
    closed). Never raises.
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
            sql = any(reads(part) for part in parts for reads in self._reads)
        except Exception as exc:  # fail closed: a parser's failure on SQL-like text denies
            return f"text the guard cannot read ({type(exc).__name__})"
        return guard(text) if sql else None

    def __repr__(self) -> str:
        return f"SqlContent({self.guard!r})"
