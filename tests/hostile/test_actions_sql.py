"""sql.query on SQLite against hostile text: stacked statements, comments hiding statements,
unicode, injection through args, writes by a read-only agent, and DROP under
``no_destructive_sql``. Nothing the decision denies reaches the database, and the table is
intact afterwards."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import VIOLATION_EVENTS, KernelSpace, Policy
from agent_os.control_plane.actions import Sql


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO items (name) VALUES (?)", [("a",), ("b",), ("c",)])
    conn.close()
    return path


def _rows(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, name FROM items ORDER BY id").fetchall()
    finally:
        conn.close()


def _kernel(db: Path, *guards: Policy) -> KernelSpace:
    kernel = KernelSpace("permissive", policies=list(guards))
    Sql({"app": db}).register(kernel.actions)
    return kernel


async def _as(kernel: KernelSpace, permissions: list[str], *requests: ActionRequest) -> list[ActionResult]:
    @kernel.register(name="dba", permissions=permissions)
    async def agent() -> list[ActionResult]:
        return [await kernel.submit(r) for r in requests]

    results: list[ActionResult] = await kernel.execute(agent)
    return results


async def test_a_read_agent_selects_and_cannot_insert(db: Path) -> None:
    async with _kernel(db) as kernel:
        select, insert = await _as(
            kernel,
            ["read"],
            ActionRequest("sql.query", "SELECT name FROM items WHERE id = ?", {"args": [2]}),
            ActionRequest("sql.query", "INSERT INTO items (name) VALUES ('x')"),
        )
        assert select.ok, select.error
        assert select.output == {"columns": ["name"], "rows": [["b"]], "truncated": False, "rowcount": -1}
        assert not insert.allowed
        assert insert.error is not None
        assert "lacks permission for write" in insert.error
        decision = (await kernel.recorder.query(event_type="policy_decision"))[0]
        assert decision.data["operation"] == "sql"
        assert decision.data["permission"] == "read"
        assert decision.data["resource"] == "SELECT name FROM items WHERE id = ?"
        assert len(await kernel.recorder.query(event_type=VIOLATION_EVENTS)) == 1
    assert len(_rows(db)) == 3


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; DROP TABLE items",
        "SELECT 1;DROP TABLE items;",
        "SELECT 1 -- \n; DROP TABLE items",
        "SELECT 1 /* x */; /* y */ DELETE FROM items",
        "WITH d AS (DELETE FROM items RETURNING *) SELECT * FROM d",
        "SELECT * FROM items; UPDATE items SET name = 'gone'",
        "SELECT 1\u037e DROP TABLE items",  # Greek question mark looks like ';'
        "SELECT 1 \uff1b DROP TABLE items",  # fullwidth semicolon
        "ＤＲＯＰ TABLE items",
        "DROP/**/TABLE items",
        "PRAGMA writable_schema = ON",
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "SELECT load_extension('/tmp/evil')",
        "\0DROP TABLE items",
    ],
)
async def test_hostile_text_from_a_read_agent_never_writes(db: Path, sql: str) -> None:
    async with _kernel(db, Policy.no_destructive_sql("sqlite")) as kernel:
        [result] = await _as(kernel, ["read"], ActionRequest("sql.query", sql))
        assert not result.allowed, sql
        assert result.error
        assert await kernel.recorder.query(event_type="action_outcome") == []
    assert _rows(db) == [(1, "a"), (2, "b"), (3, "c")]


async def test_a_statement_hidden_in_a_literal_stays_a_literal(db: Path) -> None:
    async with _kernel(db, Policy.no_destructive_sql("sqlite")) as kernel:
        [result] = await _as(kernel, ["read"], ActionRequest("sql.query", "SELECT '1'';DROP TABLE items;--'"))
        assert result.ok, result.error
        assert result.output["rows"] == [["1';DROP TABLE items;--"]]
    assert len(_rows(db)) == 3


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE items",
        "DELETE FROM items",
        "SELECT 1; DROP TABLE items",
        "UPDATE items SET name = 'x'",
        "/*!DROP*/ DROP TABLE items",
    ],
)
async def test_destructive_sql_is_denied_for_a_writer_by_the_guard(db: Path, sql: str) -> None:
    async with _kernel(db, Policy.no_destructive_sql("sqlite")) as kernel:
        [result] = await _as(kernel, ["read", "write"], ActionRequest("sql.query", sql))
        assert not result.allowed, sql
        assert await kernel.recorder.query(event_type="action_outcome") == []
        assert len(await kernel.recorder.query(event_type=VIOLATION_EVENTS)) == 1
    assert _rows(db) == [(1, "a"), (2, "b"), (3, "c")]


async def test_bound_args_stay_values(db: Path) -> None:
    hostile = "x'); DROP TABLE items; --"
    async with _kernel(db, Policy.no_destructive_sql("sqlite")) as kernel:
        insert, select, named = await _as(
            kernel,
            ["read", "write"],
            ActionRequest("sql.query", "INSERT INTO items (name) VALUES (?)", {"args": [hostile]}),
            ActionRequest("sql.query", "SELECT count(*) FROM items WHERE name = ?", {"args": [hostile]}),
            ActionRequest("sql.query", "SELECT name FROM items WHERE name = :n", {"args": {"n": hostile}}),
        )
        assert insert.ok, insert.error
        assert insert.output["rowcount"] == 1
        assert select.output["rows"] == [[1]]
        assert named.output["rows"] == [[hostile]]
    assert _rows(db)[-1] == (4, hostile)


async def test_the_database_refuses_a_write_the_reading_missed(db: Path) -> None:
    """A read runs on a read-only connection: even a statement classified as a read cannot
    write (here the permission is forced to read by a subclass that trusts everything)."""

    class Trusting(Sql):
        def permission(self, request: ActionRequest) -> str:
            return "read"

        def _reads(self, request: ActionRequest) -> bool:
            return True

    async with KernelSpace("permissive") as kernel:
        Trusting({"app": db}).register(kernel.actions)
        [result] = await _as(kernel, ["read"], ActionRequest("sql.query", "DELETE FROM items WHERE id > 0"))
        assert result.allowed
        assert result.error is not None
        assert "readonly" in result.error.replace("-", "").replace(" ", "")
        [outcome] = await kernel.recorder.query(event_type="action_outcome")
        assert outcome.data["status"] == "error"
    assert len(_rows(db)) == 3


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"database": "other"}, "unknown database"),
        ({"args": "1"}, "must be a list"),
        ({"args": [object()]}, "an arg must be"),
        ({"args": {1: "x"}}, "str keys"),
    ],
)
async def test_malformed_requests_are_refused(db: Path, params: dict[str, Any], why: str) -> None:
    async with _kernel(db) as kernel:
        [result] = await _as(kernel, ["read", "write"], ActionRequest("sql.query", "SELECT 1", params))
        assert not result.allowed
        assert result.error is not None
        assert why in result.error


async def test_rows_are_capped_and_a_runaway_statement_times_out(db: Path) -> None:
    async with KernelSpace("permissive") as kernel:
        Sql({"app": db}, max_rows=2, timeout=0.5).register(kernel.actions)
        many, forever = await _as(
            kernel,
            ["read"],
            ActionRequest("sql.query", "SELECT id FROM items ORDER BY id"),
            ActionRequest(
                "sql.query",
                "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r",
            ),
        )
        assert many.output == {"columns": ["id"], "rows": [[1], [2]], "truncated": True, "rowcount": -1}
        assert forever.allowed
        assert forever.error is not None
        assert "timeout" in forever.error


async def test_attach_cannot_reach_another_file_even_without_the_guard(db: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.db"
    async with _kernel(db) as kernel:
        [result] = await _as(
            kernel, ["read", "write"], ActionRequest("sql.query", f"ATTACH DATABASE '{other}' AS x")
        )
        assert result.allowed
        assert result.error is not None
        assert "not authorized" in result.error
    assert not other.exists()
