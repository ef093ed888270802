"""The SQL guard's reading of MySQL/MariaDB, SQLite and the other dialects sqlglot reads.

sqlglot is not the server's parser, so its reading is held to the server's lexical rules:
everything between two of its tokens must be whitespace or a comment as the server reads it
(MySQL: ``--`` needs a space after it, ``#`` starts a comment, ``/*! ... */`` is run; comments
do not nest), and MySQL text is read under each ``sql_mode`` that changes lexing
(``ANSI_QUOTES``, ``NO_BACKSLASH_ESCAPES``). The statement trees are judged by the rules of
``docs/control-plane.md`` (Guards).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from sqlglot import Token, TokenType, exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.dialects.mysql import MySQL
from sqlglot.errors import ParseError, TokenError

from agent_os.control_plane.policy.sql_guard import CATEGORY_WORDS, FUNCTIONS, WRITING_FUNCTIONS


class _MySQLAnsiQuotes(MySQL):
    class Tokenizer(MySQL.Tokenizer):
        QUOTES: ClassVar[list[str | tuple[str, str]]] = ["'"]
        IDENTIFIERS: ClassVar[list[str | tuple[str, str]]] = ["`", '"']


class _MySQLNoBackslashEscapes(MySQL):
    class Tokenizer(MySQL.Tokenizer):
        STRING_ESCAPES: ClassVar[list[str]] = ["'", '"']


class _MySQLAnsiNoBackslash(MySQL):
    class Tokenizer(MySQL.Tokenizer):
        QUOTES: ClassVar[list[str | tuple[str, str]]] = ["'"]
        IDENTIFIERS: ClassVar[list[str | tuple[str, str]]] = ["`", '"']
        STRING_ESCAPES: ClassVar[list[str]] = ["'"]


@dataclass(frozen=True, slots=True)
class _Lexis:
    """How the server reads what lies between tokens."""

    hash_comments: bool = False  # '#' starts a comment to the end of the line
    dash_needs_space: bool = False  # '--' starts a comment only before whitespace or a control character
    executable_comments: bool = False  # '/*!' and '/*M!' comments are run


_MYSQL: Final = _Lexis(hash_comments=True, dash_needs_space=True, executable_comments=True)
_PLAIN: Final = _Lexis()
_SPACE: Final = frozenset(" \t\n\r\f\v")

_HARMLESS: Final = (
    exp.Select, exp.SetOperation, exp.Values, exp.Insert, exp.Update, exp.Delete, exp.Create,
    exp.Alter, exp.Describe, exp.Show, exp.Set, exp.Transaction, exp.Commit, exp.Rollback,
    exp.Use, exp.Pragma,
)  # fmt: skip
_ALWAYS: Final = (
    (exp.Drop, "DROP statement"),
    (exp.TruncateTable, "TRUNCATE statement"),
    (exp.Merge, "MERGE (it can update or delete every matched row)"),
)
_COMMANDS: Final = {
    "PREPARE": "dynamic", "EXECUTE": "dynamic", "EXEC": "dynamic", "CALL": "routines",
    "GRANT": "privileges", "REVOKE": "privileges", "LOCK TABLES": "maintenance",
    "OPTIMIZE": "maintenance", "VACUUM": "maintenance", "REINDEX": "maintenance",
}  # fmt: skip
_ROUTINE_KINDS: Final = frozenset({"FUNCTION", "PROCEDURE", "TRIGGER", "EVENT", "MACRO"})
_CREATE_KINDS: Final = frozenset({"TABLE", "INDEX", "VIEW", "SCHEMA", "DATABASE", "SEQUENCE", "TYPE"})
_READ_PRAGMAS: Final = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check", "function_list",
    "pragma_list", "collation_list", "database_list",
})  # fmt: skip
_ALTER_ARGS: Final = frozenset({"this", "kind", "actions", "exists"})
_CHARSET_VARIABLES: Final = frozenset(
    {"character_set_client", "character_set_connection", "charset", "names"}
)
_CHARSET = (
    "SET of the client character set (in a multi-byte set such as GBK the server would read later "
    "text differently: a byte of one character can hide a quote or backtick)"
)
_SERVER_SETS: Final = frozenset({"GLOBAL", "PERSIST", "PERSIST_ONLY"})

_quiet = threading.local()


class _FallbackFilter(logging.Filter):
    """Silences sqlglot's "falling back to a Command" warnings while the guard reads: such
    text is denied with a reason, not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


logging.getLogger("sqlglot").addFilter(_FallbackFilter())


def sqlglot_judge(dialect: str, allow: frozenset[str]) -> Callable[[str], str | None] | None:
    """The judge of ``dialect``'s text, or None when sqlglot does not know the dialect."""
    if dialect == "mysql":
        variants: dict[tuple[bool, bool], Dialect] = {
            (False, False): MySQL(),
            (True, False): _MySQLAnsiQuotes(),
            (False, True): _MySQLNoBackslashEscapes(),
            (True, True): _MySQLAnsiNoBackslash(),
        }

        def judge_mysql(text: str) -> str | None:
            ansi = (False, True) if '"' in text else (False,)
            plain = (False, True) if "\\" in text else (False,)
            for a in ansi:
                for p in plain:
                    why = _judge(text, variants[a, p], _MYSQL, allow)
                    if why is not None:
                        modes = ", ANSI_QUOTES" * a + ", NO_BACKSLASH_ESCAPES" * p
                        return f"{why} (mysql{modes})"
            return None

        return judge_mysql
    try:
        reader = Dialect.get_or_raise(dialect)
    except ValueError:
        return None

    def judge(text: str) -> str | None:
        why = _judge(text, reader, _PLAIN, allow)
        return None if why is None else f"{why} ({dialect})"

    return judge


def _judge(text: str, dialect: Dialect, lexis: _Lexis, allow: frozenset[str]) -> str | None:
    try:
        tokens = dialect.tokenize(text)
    except TokenError as exc:
        return f"SQL that does not lex: {exc}"
    why = _between_tokens(text, tokens, dialect, lexis)
    if why is not None:
        return why
    if any(t.token_type is TokenType.DROP for t in tokens):
        return "DROP"
    _quiet.on = True
    try:
        statements = dialect.parser().parse(tokens, text)
    except ParseError as exc:
        return f"SQL that does not parse: {str(exc).splitlines()[0]}"
    finally:
        _quiet.on = False
    for statement in statements:
        if statement is not None:
            why = _judge_statement(statement, allow)
            if why is not None:
                return why
    return None


def _between_tokens(text: str, tokens: list[Token], dialect: Dialect, lexis: _Lexis) -> str | None:
    """Why the server would read what lies between two tokens as something other than
    whitespace and comments, or None. A command sqlglot keeps as raw text (``PREPARE``,
    ``REPLACE``, ...) runs to the next ``;`` it finds: that text is tokenized and held to the
    same rules, so a comment cannot hide the end of the command."""
    tokenizer = dialect.tokenizer_class
    end = 0
    i, n = 0, len(tokens)
    while i < n:
        token = tokens[i]
        why = _gap(text[end : token.start], lexis, at_end=False)
        if why is not None:
            return f"{why}, at offset {end}"
        end = token.end + 1
        if token.token_type in tokenizer.COMMANDS and (
            i == 0 or tokens[i - 1].token_type in tokenizer.COMMAND_PREFIX_TOKENS
        ):
            j = i + 1
            while j < n and tokens[j].token_type is not TokenType.SEMICOLON:
                j += 1
            stop = tokens[j].start if j < n else len(text)
            region = text[end:stop]
            why = None
            if region.strip():
                why = _between_tokens(region, dialect.tokenize(region), dialect, lexis)
            if why is not None:
                return f"{why} (in the text of {token.text.upper()})"
            end, i = stop, j
            continue
        i += 1
    why = _gap(text[end:], lexis, at_end=True)
    return None if why is None else f"{why}, at offset {end}"


def _gap(gap: str, lexis: _Lexis, at_end: bool) -> str | None:
    i, n = 0, len(gap)
    while i < n:
        c = gap[i]
        if c in _SPACE:
            i += 1
        elif gap.startswith("--", i) or (lexis.hash_comments and c == "#"):
            if c == "-" and lexis.dash_needs_space and i + 2 < n:
                after = gap[i + 2]
                if not (after in _SPACE or ord(after) < 32 or ord(after) == 127):
                    return "'--' not followed by a space (not a comment in MySQL)"
            newline = gap.find("\n", i)
            if newline < 0:
                if not at_end:
                    return "a line comment that runs past where the parser ends it"
                return None
            i = newline + 1
        elif gap.startswith("/*", i):
            if lexis.executable_comments and (gap.startswith("/*!", i) or gap.startswith("/*M!", i)):
                return "an executable comment (/*! ... */ is run by MySQL and MariaDB)"
            close = gap.find("*/", i + 2)
            if close < 0:
                return "a block comment that runs past where the parser ends it"
            i = close + 2
        else:
            return f"text the parser skipped ({gap[i : i + 20]!r})"
    return None


def _judge_statement(statement: exp.Expr, allow: frozenset[str]) -> str | None:
    why = _judge_kind(statement, allow)
    if why is not None:
        return why
    for node in statement.walk():
        if node is not statement:
            if isinstance(node, exp.Delete | exp.Update):
                return f"{node.key.upper()} inside another statement"
            for always, reason in _ALWAYS:
                if isinstance(node, always):
                    return reason
            if isinstance(node, exp.Command):
                return _judge_command(node, allow)
        why = _judge_node(node, allow)
        if why is not None:
            return why
    return None


def _judge_kind(statement: exp.Expr, allow: frozenset[str]) -> str | None:
    for always, reason in _ALWAYS:
        if isinstance(statement, always):
            return reason
    if isinstance(statement, exp.Command):
        return _judge_command(statement, allow)
    if isinstance(statement, exp.Kill | exp.Attach | exp.Detach):
        return _category(statement.key.upper(), "server", allow)
    if isinstance(statement, exp.Grant | exp.Revoke):
        return _category(statement.key.upper(), "privileges", allow)
    if not isinstance(statement, _HARMLESS):
        return f"{type(statement).__name__}: not a statement the guard knows to be harmless"
    if isinstance(statement, exp.Delete | exp.Update):
        if statement.args.get("where") is None:
            return f"{statement.key.upper()} without WHERE"
    elif isinstance(statement, exp.Create):
        kind = str(statement.args.get("kind") or "").upper()
        if kind in _ROUTINE_KINDS:
            return _category(f"CREATE {kind}", "routines", allow)
        if kind not in _CREATE_KINDS:
            return f"CREATE {kind or '?'}: not a statement the guard knows to be harmless"
        if statement.args.get("replace"):
            return f"CREATE OR REPLACE {kind} (it replaces an existing one)"
    elif isinstance(statement, exp.Alter):
        extra = set(_set_args(statement)) - _ALTER_ARGS
        if extra:  # table options (ENGINE=BLACKHOLE discards every row), partitioning, ...
            return f"ALTER with {', '.join(sorted(extra))} (only adding is allowed)"
        for action in statement.args.get("actions") or ():
            if isinstance(action, exp.ColumnDef | exp.AddConstraint):
                continue
            if isinstance(action, exp.AlterColumn) and set(_set_args(action)) == {"this", "default"}:
                continue
            return f"ALTER {type(action).__name__} (only adding is allowed)"
    elif isinstance(statement, exp.Set):
        for item in statement.expressions:
            if _sets_client_charset(item):
                return _CHARSET
            scopes = {str(item.args.get("kind") or "").upper()}
            scopes.update(str(p.args.get("kind") or "").upper() for p in item.find_all(exp.SessionParameter))
            if scopes & _SERVER_SETS:
                return _category("SET GLOBAL", "server", allow)
    elif isinstance(statement, exp.Pragma):
        target = statement.this
        if isinstance(target, exp.EQ) and target.this.name.lower() not in _READ_PRAGMAS:
            return _category(f"PRAGMA {target.this.name} with a value", "server", allow)
    return None


def _sets_client_charset(item: exp.Expr) -> bool:
    """Whether a SET item changes the character set the server reads later text in."""
    if str(item.args.get("kind") or "").upper() in ("NAMES", "CHARACTER SET"):
        return True
    target = item.this.this if isinstance(item.this, exp.EQ) else None
    name = target.name.lower() if isinstance(target, exp.Expr) else ""
    return name in _CHARSET_VARIABLES


def _judge_node(node: exp.Expr, allow: frozenset[str]) -> str | None:
    if isinstance(node, exp.Insert):
        conflict = node.args.get("conflict")
        action = str(conflict.args.get("action") or "").upper() if conflict is not None else ""
        upsert = conflict is not None and (conflict.args.get("duplicate") or "UPDATE" in action)
        replace = str(node.args.get("alternative") or "").upper() == "REPLACE"
        if (upsert or replace) and not isinstance(node.expression, exp.Values):
            return "INSERT that updates or replaces rows from a query (it can rewrite every row)"
    elif isinstance(node, exp.Func):
        name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
        category = FUNCTIONS.get(name)
        if category is not None and category not in allow:
            return f"{name}() ({CATEGORY_WORDS[category]}, not allowed)"
    return None


def _judge_command(command: exp.Expr, allow: frozenset[str]) -> str | None:
    name = str(command.this).upper()
    arg = command.args.get("expression")
    rest = arg.name if isinstance(arg, exp.Expr) else str(arg or "")
    first = rest.split(None, 1)[0].upper() if rest.strip() else ""
    if name == "CREATE" and first in _ROUTINE_KINDS:
        return _category(f"CREATE {first}", "routines", allow)
    category = _COMMANDS.get(name)
    if category is None:
        return f"{name} {first}: SQL the parser does not read"
    return _category(name, category, allow)


def _category(what: str, category: str, allow: frozenset[str]) -> str | None:
    return None if category in allow else f"{what} ({CATEGORY_WORDS[category]}, not allowed)"


def _set_args(node: exp.Expr) -> dict[str, Any]:
    return {k: v for k, v in node.args.items() if v is not None and v is not False and v != []}


_WRITES: Final = (
    exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.Command,
    exp.TruncateTable, exp.Into, exp.Lock, exp.Set, exp.Pragma, exp.Transaction, exp.Commit,
    exp.Rollback, exp.Use,
)  # fmt: skip


def reads_sqlglot(text: str, dialect: str) -> list[bool]:
    """For each statement of ``text`` as sqlglot reads ``dialect``, whether it only reads: a
    query (SELECT, a set operation, VALUES) with no writing node inside and no function of
    :data:`FUNCTIONS`. Raises sqlglot's errors for text it does not read, and ValueError for
    an unknown dialect."""
    reader = Dialect.get_or_raise(dialect)
    _quiet.on = True
    try:
        statements = reader.parse(text)
    finally:
        _quiet.on = False
    found = []
    for statement in statements:
        if statement is None:
            continue
        query = isinstance(statement, exp.Select | exp.SetOperation | exp.Values)
        found.append(query and not any(_writes(node) for node in statement.walk()))
    return found


def _writes(node: exp.Expr) -> bool:
    if isinstance(node, _WRITES):
        return True
    if isinstance(node, exp.Func):
        name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
        return name in FUNCTIONS or name in WRITING_FUNCTIONS
    return isinstance(node, exp.Select) and bool(node.args.get("locks"))


# What sqlglot reads when text is not a statement: a bare expression (a column name, a literal,
# an operation), or its fallback for a statement it does not parse (a Command): real SQL
# ("PREPARE s FROM ...") as often as free text ("Show me ...", "Drop the report"), so it is not
# taken for a statement here; the statements servers run that sqlglot falls back on are known
# by the words they start with (``sql_content``).
_NOT_STATEMENTS: Final = (exp.Command, exp.Condition, exp.Alias, exp.Identifier, exp.Tuple)


def _is_statement(statement: Any) -> bool:
    if isinstance(statement, _NOT_STATEMENTS):
        return False
    # sqlglot reads "Update the dashboard" as an UPDATE of table "the"; without SET it is none.
    return not isinstance(statement, exp.Update) or bool(statement.args.get("expressions"))


def sqlglot_parses(dialect: str) -> Callable[[str], bool] | None:
    """Whether ``dialect``'s reading (MySQL: the default ``sql_mode``) makes ``text`` one or
    more statements, none of them a bare expression or a Command; None when sqlglot does not
    know the dialect."""
    try:
        reader = MySQL() if dialect == "mysql" else Dialect.get_or_raise(dialect)
    except ValueError:
        return None

    def parses(text: str) -> bool:
        _quiet.on = True
        try:
            statements = reader.parse(text)
        except (ParseError, TokenError):
            return False
        finally:
            _quiet.on = False
        found = [s for s in statements if s is not None]
        return bool(found) and all(_is_statement(s) for s in found)

    return parses
