"""The SQL guard's PostgreSQL reading: PostgreSQL's own parser (pglast, libpg_query).

The text is parsed as the server parses it, then once more with backslash escapes in every
plain literal (what a server with ``standard_conforming_strings = off`` reads); the statement
trees are judged by the rules of ``docs/control-plane.md`` (Guards).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Final

from pglast import parser

from agent_os.control_plane.policy.sql_guard import CATEGORY_WORDS, FUNCTIONS, WRITING_FUNCTIONS

_READINGS_MAX: Final = 4

# Statement kinds that cannot lose data by themselves (DELETE, UPDATE, INSERT, ALTER TABLE,
# CREATE VIEW, COPY and VACUUM are judged further below).
_HARMLESS: Final = frozenset({
    "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "CreateStmt", "CreateTableAsStmt",
    "IndexStmt", "ViewStmt", "CreateSchemaStmt", "CreateSeqStmt", "CompositeTypeStmt",
    "CreateEnumStmt", "CreateDomainStmt", "CommentStmt", "AlterTableStmt", "ExplainStmt",
    "VariableSetStmt", "VariableShowStmt", "TransactionStmt", "DeallocateStmt", "ListenStmt",
    "UnlistenStmt", "NotifyStmt", "DeclareCursorStmt", "FetchStmt", "ClosePortalStmt",
    "PrepareStmt", "CopyStmt", "VacuumStmt", "DiscardStmt", "ConstraintsSetStmt",
})  # fmt: skip

_CATEGORY: Final = {
    **dict.fromkeys(("DoStmt", "ExecuteStmt"), "dynamic"),
    **dict.fromkeys((
        "CallStmt", "CreateFunctionStmt", "AlterFunctionStmt", "CreateTrigStmt", "RuleStmt",
        "CreateEventTrigStmt", "DefineStmt", "CreateCastStmt", "CreateOpClassStmt",
        "CreateTransformStmt", "CreatePLangStmt",
    ), "routines"),
    **dict.fromkeys((
        "AlterSystemStmt", "LoadStmt", "CreateExtensionStmt", "AlterExtensionStmt",
        "AlterExtensionContentsStmt", "CreateFdwStmt", "CreateForeignServerStmt",
        "CreateUserMappingStmt", "ImportForeignSchemaStmt", "CreateTableSpaceStmt",
        "CreatedbStmt", "AlterDatabaseStmt", "AlterDatabaseSetStmt", "CreateSubscriptionStmt",
        "CreatePublicationStmt",
    ), "server"),
    **dict.fromkeys((
        "GrantStmt", "GrantRoleStmt", "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt",
        "AlterDefaultPrivilegesStmt", "AlterOwnerStmt", "CreatePolicyStmt", "AlterPolicyStmt",
        "SecLabelStmt",
    ), "privileges"),
    **dict.fromkeys(
        ("LockStmt", "ClusterStmt", "ReindexStmt", "RefreshMatViewStmt", "CheckPointStmt"), "maintenance"
    ),
}  # fmt: skip

_ALWAYS: Final = {
    "DropStmt": "DROP statement",
    "DropOwnedStmt": "DROP OWNED statement",
    "DropRoleStmt": "DROP ROLE statement",
    "DropdbStmt": "DROP DATABASE statement",
    "DropTableSpaceStmt": "DROP TABLESPACE statement",
    "DropSubscriptionStmt": "DROP SUBSCRIPTION statement",
    "DropUserMappingStmt": "DROP USER MAPPING statement",
    "TruncateStmt": "TRUNCATE statement",
    "RenameStmt": "RENAME (the old name is gone)",
    "MergeStmt": "MERGE (it can update or delete every matched row)",
    "ReassignOwnedStmt": "REASSIGN OWNED statement",
}

# ALTER TABLE subcommands that only add: anything else (DROP, TYPE, RENAME, DETACH, OWNER, ...)
# can lose data or hand it away.
_ALTER_ADDS: Final = frozenset({"AT_AddColumn", "AT_AddConstraint", "AT_AddIndex", "AT_ValidateConstraint"})


def judge_postgres(text: str, allow: frozenset[str]) -> str | None:
    """Why ``text`` is destructive on PostgreSQL, or None. Raises whatever the parser raises on
    input it cannot take (the caller denies)."""
    reading = text
    for _ in range(_READINGS_MAX):
        try:
            tree = json.loads(parser.parse_sql_json(reading))
        except parser.ParseError as exc:
            return f"SQL that PostgreSQL does not parse: {exc} (postgresql)"
        why = _judge_tree(tree, allow)
        if why is not None:
            return f"{why} (postgresql)"
        escaped = _with_backslash_escapes(reading)
        if escaped == reading:
            return None
        reading = escaped
    return "SQL whose literals read differently with every setting of backslash escapes (postgresql)"


def _with_backslash_escapes(text: str) -> str:
    """``text`` with ``E`` before every plain literal holding a backslash: how a server with
    ``standard_conforming_strings = off`` reads it. ``text`` itself when there is none."""
    if "\\" not in text:
        return text
    starts = [
        tok.start
        for tok in parser.scan(text)
        if tok.name == "SCONST" and text[tok.start] == "'" and "\\" in text[tok.start : tok.end + 1]
    ]
    for start in reversed(starts):
        text = text[:start] + "E" + text[start:]
    return text


def _judge_tree(tree: dict[str, Any], allow: frozenset[str]) -> str | None:
    for raw in tree.get("stmts", ()):
        [(kind, body)] = raw["stmt"].items()
        for node_kind, node, top in _nodes(kind, body):
            why = _judge_node(node_kind, node, top, allow)
            if why is not None:
                return why
    return None


def _nodes(kind: str, body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Every node of a statement's tree (its kind and fields), the statement first; iterative,
    so no depth of nesting exhausts the stack."""
    yield kind, body, True
    stack: list[Any] = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                if isinstance(child, dict) and key[:1].isupper() and len(value) == 1:
                    yield key, child, False
                if isinstance(child, dict | list):
                    stack.append(child)
        elif isinstance(value, list):
            stack.extend(v for v in value if isinstance(v, dict | list))


def _judge_node(kind: str, node: dict[str, Any], top: bool, allow: frozenset[str]) -> str | None:
    if kind == "FuncCall":
        name = _last_name(node.get("funcname", ()))
        category = FUNCTIONS.get(name)
        if category is not None and category not in allow:
            return f"{name}() ({CATEGORY_WORDS[category]}, not allowed)"
        return None
    if not kind.endswith("Stmt"):
        return None
    if kind in _ALWAYS:
        return _ALWAYS[kind]
    category = _CATEGORY.get(kind)
    if category is not None:
        return None if category in allow else f"{kind} ({CATEGORY_WORDS[category]}, not allowed)"
    if kind not in _HARMLESS:
        return f"{kind}: not a statement the guard knows to be harmless"
    return _judge_harmless(kind, node, top, allow)


def _judge_harmless(kind: str, node: dict[str, Any], top: bool, allow: frozenset[str]) -> str | None:
    if kind in ("DeleteStmt", "UpdateStmt"):
        word = kind[:6].upper()
        if not top:
            return f"{word} inside another statement"
        if "whereClause" not in node:
            return f"{word} without WHERE"
    elif kind == "InsertStmt":
        conflict = node.get("onConflictClause") or {}
        if conflict.get("action") == "ONCONFLICT_UPDATE" and not _values_only(node.get("selectStmt")):
            return "INSERT ... ON CONFLICT DO UPDATE from a query (it can rewrite every row)"
    elif kind == "AlterTableStmt":
        for cmd in node.get("cmds", ()):
            sub = cmd.get("AlterTableCmd", {})
            subtype = sub.get("subtype", "?")
            if subtype == "AT_ColumnDefault" and "def" in sub:
                continue
            if subtype not in _ALTER_ADDS:
                return f"ALTER TABLE {subtype.removeprefix('AT_')} (only adding is allowed)"
    elif kind == "ViewStmt" and node.get("replace"):
        return "CREATE OR REPLACE VIEW (it replaces an existing view)"
    elif kind == "CopyStmt" and (node.get("is_program") or "filename" in node):
        if "server" not in allow:
            what = "a program" if node.get("is_program") else "a server file"
            return f"COPY to or from {what} ({CATEGORY_WORDS['server']}, not allowed)"
    elif (
        kind == "VariableSetStmt"
        and node.get("name") == "client_encoding"
        and node.get("kind") != "VAR_RESET"
    ):
        return "SET client_encoding (the server would read later text in another encoding)"
    elif kind == "VacuumStmt" and node.get("is_vacuumcmd") and "maintenance" not in allow:
        return f"VACUUM ({CATEGORY_WORDS['maintenance']}, not allowed)"
    return None


def _values_only(select: Any) -> bool:
    """Whether an INSERT's source is absent (DEFAULT VALUES) or a plain VALUES list."""
    if select is None:
        return True
    body = select.get("SelectStmt", {})
    return "valuesLists" in body and body.get("op") == "SETOP_NONE" and "withClause" not in body


def _last_name(names: Any) -> str:
    for item in reversed(list(names)):
        value = item.get("String", {}).get("sval")
        if isinstance(value, str):
            return value.lower()
    return ""


_READ_TOPS: Final = frozenset({"SelectStmt", "ExplainStmt", "VariableShowStmt"})


def reads_postgres(text: str) -> list[bool]:
    """For each statement of ``text`` as PostgreSQL parses it, whether it only reads: a
    SELECT (or EXPLAIN, SHOW) with no other statement inside, no ``INTO``, no ``FOR UPDATE``
    and no function of :data:`FUNCTIONS`. Raises ``pglast.parser.ParseError`` for text the
    parser does not take."""
    tree = json.loads(parser.parse_sql_json(text))
    found = []
    for raw in tree.get("stmts", ()):
        [(kind, body)] = raw["stmt"].items()
        found.append(kind in _READ_TOPS and all(_only_reads(k, n, top) for k, n, top in _nodes(kind, body)))
    return found


def _only_reads(kind: str, node: dict[str, Any], top: bool) -> bool:
    if kind == "FuncCall":
        name = _last_name(node.get("funcname", ()))
        return name not in FUNCTIONS and name not in WRITING_FUNCTIONS
    if kind == "SelectStmt":
        return "intoClause" not in node and "lockingClause" not in node
    return top or not kind.endswith("Stmt")


def parses_postgres(text: str) -> bool:
    """Whether PostgreSQL's parser reads ``text`` as one or more statements."""
    try:
        tree = json.loads(parser.parse_sql_json(text))
    except parser.ParseError:
        return False
    return bool(tree.get("stmts"))
