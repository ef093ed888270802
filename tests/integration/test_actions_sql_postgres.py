"""sql.query on the real PostgreSQL: a read agent selects and cannot insert, DROP is denied by
``no_destructive_sql``, stacked and hidden statements are denied, bound args stay values, a
read runs in a read-only transaction, and the statement timeout holds. Each test has its own
table, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import VIOLATION_EVENTS, KernelSpace, Policy
from agent_os.control_plane.actions import Sql
from tests.support.servers import PG_DSN


@pytest.fixture
def table() -> Iterator[str]:
    name = f"acts_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, name text)")
        conn.execute(f"INSERT INTO {name} (name) VALUES ('a'), ('b'), ('c')")
    try:
        yield name
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")


def _rows(table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_DSN) as conn:
        return conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()


async def _as(kernel: KernelSpace, permissions: list[str], *requests: ActionRequest) -> list[ActionResult]:
    @kernel.register(name="dba", permissions=permissions)
    async def agent() -> list[ActionResult]:
        return [await kernel.submit(r) for r in requests]

    results: list[ActionResult] = await kernel.execute(agent)
    return results


def _sql(kernel: KernelSpace, **options: Any) -> None:
    Sql({"main": PG_DSN}, **options).register(kernel.actions)


async def test_a_read_agent_selects_and_cannot_insert(table: str) -> None:
    async with KernelSpace("permissive", policies=[Policy.no_destructive_sql("postgresql")]) as kernel:
        _sql(kernel)
        select, insert = await _as(
            kernel,
            ["read"],
            ActionRequest("sql.query", f"SELECT name FROM {table} WHERE id = $1", {"args": [2]}),
            ActionRequest("sql.query", f"INSERT INTO {table} (name) VALUES ('x')"),
        )
        assert select.ok, select.error
        assert select.output == {"columns": ["name"], "rows": [["b"]], "truncated": False, "rowcount": 1}
        assert not insert.allowed
        assert insert.error is not None
        assert "lacks permission for write" in insert.error
    assert len(_rows(table)) == 3


async def test_a_writer_inserts_with_bound_args_and_drop_is_denied(table: str) -> None:
    hostile = "x'); DROP TABLE " + table + "; --"
    async with KernelSpace("permissive", policies=[Policy.no_destructive_sql("postgresql")]) as kernel:
        _sql(kernel)
        insert, named, drop, stacked, hidden = await _as(
            kernel,
            ["read", "write"],
            ActionRequest("sql.query", f"INSERT INTO {table} (name) VALUES ($1)", {"args": [hostile]}),
            ActionRequest("sql.query", f"SELECT id FROM {table} WHERE name = $1", {"args": [hostile]}),
            ActionRequest("sql.query", f"DROP TABLE {table}"),
            ActionRequest("sql.query", f"SELECT 1; DROP TABLE {table}"),
            ActionRequest("sql.query", f"SELECT $$'$$; DROP TABLE {table}; --'"),
        )
        assert insert.ok, insert.error
        assert insert.output["rowcount"] == 1
        assert named.output["rows"] == [[4]]
        for denied in (drop, stacked, hidden):
            assert not denied.allowed
        violations = await kernel.recorder.query(event_type=VIOLATION_EVENTS)
        assert len(violations) == 3
        assert {v.data["operation"] for v in violations} == {"sql"}
    assert _rows(table)[-1] == (4, hostile)


async def test_a_read_runs_in_a_read_only_transaction(table: str) -> None:
    """nextval() writes though a SELECT calls it: the reading sees it, and a provider that
    trusted the text would still be stopped by the read-only transaction."""

    class Trusting(Sql):
        def permission(self, request: ActionRequest) -> str:
            return "read"

        def _reads(self, request: ActionRequest) -> bool:
            return True

    async with KernelSpace("permissive") as kernel:
        Trusting({"main": PG_DSN}).register(kernel.actions)
        [result] = await _as(
            kernel, ["read"], ActionRequest("sql.query", f"DELETE FROM {table} WHERE id > 0")
        )
        assert result.allowed
        assert result.error is not None
        assert "read-only transaction" in result.error
    assert len(_rows(table)) == 3
    async with KernelSpace("permissive") as kernel:
        _sql(kernel)
        [result] = await _as(
            kernel, ["read"], ActionRequest("sql.query", f"SELECT nextval('{table}_id_seq')")
        )
        assert not result.allowed


async def test_the_statement_timeout_and_row_cap_hold(table: str) -> None:
    async with KernelSpace("permissive") as kernel:
        _sql(kernel, timeout=0.3, max_rows=2)
        many, slow = await _as(
            kernel,
            ["read"],
            ActionRequest("sql.query", f"SELECT id FROM {table} ORDER BY id"),
            ActionRequest("sql.query", "SELECT pg_sleep(5)"),
        )
        assert many.output["rows"] == [[1], [2]]
        assert many.output["truncated"] is True
        assert slow.allowed
        assert slow.error is not None
        assert "timeout" in slow.error
        [_, outcome] = await kernel.recorder.query(event_type="action_outcome")
        assert outcome.data["status"] == "error"
