"""What ``Policy.no_destructive_sql`` allows, run on the real PostgreSQL and MariaDB of this
machine: after every statement it lets through, every table of the test is still there with
every row unchanged.

Each test works in a schema (PostgreSQL) or database (MariaDB) of its own, dropped afterwards.
The statements are run with multi-statement text enabled (the worst case for a guard).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent_os import Policy
from tests.support.servers import MARIADB_URL, PG_DSN

ROWS = 5

# Each scenario is a list of steps run in one session; {t} and {u} are the test's tables.
COMMON = [
    ["DROP TABLE {t}"],
    ["SELECT 1; DROP TABLE {t}"],
    ["DELETE FROM {t}"],
    ["DELETE FROM {t} -- WHERE id < 0"],
    ["UPDATE {t} SET v = 'gone'"],
    ["TRUNCATE {t}"],
    ["WITH d AS (SELECT 1) DELETE FROM {t}"],
    ["ALTER TABLE {t} RENAME TO {t}_old"],
    ["ALTER TABLE {t} DROP COLUMN v"],
    ["INSERT INTO {u} SELECT * FROM {t}"],  # allowed, harmless: fills the scratch table
]
POSTGRESQL = [
    ["SELECT $$'$$; DROP TABLE {t}; --'"],  # dollar quoting
    ["SELECT $q$'$q$; DROP TABLE {t}; --'"],  # tagged dollar quotes
    ["DO $$ BEGIN EXECUTE 'DR' || 'OP TABLE {t}'; END $$"],  # DO ... EXECUTE
    ["DO $q$ BEGIN EXECUTE 'TRUNC' || 'ATE {t}'; END $q$"],
    ["WITH d AS (DELETE FROM {t} RETURNING *) SELECT count(*) FROM d"],
    ["COPY (DELETE FROM {t} RETURNING *) TO STDOUT"],
    ["PREPARE p AS DELETE FROM {t}; EXECUTE p"],
    ["SET standard_conforming_strings = off", "SELECT 'x\\'';  DROP TABLE {t}; --'"],
    ["SELECT E'\\''; DROP TABLE {t}; --'"],
    ["INSERT INTO {t} SELECT * FROM {t} ON CONFLICT (id) DO UPDATE SET v = 'gone'"],
    ["ALTER TABLE {t} ALTER COLUMN v TYPE int USING 0"],
    ["CREATE FUNCTION {t}_f() RETURNS void LANGUAGE sql AS 'DELETE FROM {t}'", "SELECT {t}_f()"],
    ["CREATE RULE {t}_r AS ON INSERT TO {u} DO ALSO DELETE FROM {t}", "INSERT INTO {u} VALUES (-1, 'x')"],
    [
        "INSERT INTO {u} SELECT * FROM {t}",
        "MERGE INTO {t} USING {u} ON {t}.id = {u}.id WHEN MATCHED THEN DELETE",
    ],
    ["SELECT query_to_xml('DELETE FROM {t} RETURNING 1', true, true, '')"],
]
MYSQL = [
    ["DELETE FROM {t} # WHERE id < 0"],  # '#' comments
    ["SELECT 1 --1; DROP TABLE {t}"],  # '--' without a space is code
    ["SELECT 1 AS `'`; DROP TABLE {t}; SELECT 1 AS `'`"],  # backticks hide a quote
    ["PREPARE s FROM 'DROP TABLE {t}'; EXECUTE s"],  # PREPARE ... FROM '...'; EXECUTE
    ["SET @q = CONCAT('DR', 'OP TABLE {t}'); PREPARE s FROM @q; EXECUTE s"],
    ["EXECUTE IMMEDIATE 'DROP TABLE {t}'"],
    ["/*! DROP TABLE {t} */"],
    ["/*M!100000 DROP TABLE {t} */"],
    ["/* /* */ DROP TABLE {t}; */"],
    ["SET SESSION sql_mode = 'NO_BACKSLASH_ESCAPES'", "SELECT 'a\\'; DROP TABLE {t}; -- '"],
    ["SET SESSION sql_mode = 'ANSI_QUOTES'", 'SELECT "a\\"; DROP TABLE {t}; -- "'],
    ["SET NAMES gbk", "SELECT 1 AS `中`, '`; DROP TABLE {t}; -- '"],  # GBK swallows the backtick
    ["DELETE FROM {t} -- \r WHERE id < 0"],
    ["REPLACE INTO {t} SELECT id, 'gone' FROM {t}"],
    ["INSERT INTO {t} SELECT * FROM {t} ON DUPLICATE KEY UPDATE v = 'gone'"],
    ["RENAME TABLE {t} TO {t}_old"],
    ["CREATE OR REPLACE TABLE {t} (id int)"],
    ["ALTER TABLE {t} ENGINE = BLACKHOLE"],
    ["ALTER TABLE {t} MODIFY v INT"],
    ["DELETE {t} FROM {t} JOIN {u} ON 1 = 1"],
    ["BEGIN NOT ATOMIC DELETE FROM {t}; END"],
    [
        "CREATE TRIGGER {t}_tr AFTER INSERT ON {u} FOR EACH ROW DELETE FROM {t}",
        "INSERT INTO {u} VALUES (-1, 'x')",
    ],
]
# Allowed in both dialects and run without error: the guard is not a wall that denies everything.
HARMLESS = [
    "SELECT * FROM {t} WHERE id = 1",
    "SELECT count(*) FROM {t}",
    "UPDATE {t} SET v = v WHERE id = 1",
    "DELETE FROM {t} WHERE id = -1",
    "INSERT INTO {u} (id, v) VALUES (100, 'it''s'), (101, 'b')",
    "DELETE FROM {u} WHERE id >= 100",
    "CREATE INDEX {t}_v ON {t} (v)",
    "ALTER TABLE {u} ADD COLUMN extra INT",
    "SELECT 'DROP TABLE {t}' AS text -- DROP TABLE {t}",
]
# Tricks and payloads for generated text: quotes, comments and dollar quotes around a DROP or
# an unbounded DELETE.
FRAGMENTS = [
    "'", '"', "`", "$$", "$q$", "-- ", "--", "#", "/*", "*/", "/*!", "\\", "\n", ";", "E'",
    "SELECT 1", "DROP TABLE {t}", "DELETE FROM {t}", "WHERE id < 0", "AS", "x", "DO", "PREPARE s FROM",
]  # fmt: skip


@dataclass
class Server:
    """One session on a server, in a namespace of the test's own, and the test's tables."""

    dialect: str
    run: Callable[[str], None]
    snapshot: Callable[[], dict[str, list[tuple[Any, ...]]]]
    tables: dict[str, str] = field(default_factory=dict)


def _check(server: Server, before: dict[str, list[tuple[Any, ...]]], what: str) -> None:
    table = server.tables["t"]
    assert server.snapshot().get(table) == before[table], f"rows of {table} lost: {what!r}"


def _guards(dialect: str) -> list[Policy]:
    return [Policy.no_destructive_sql(dialect), Policy.no_destructive_sql()]


def _allowed(policies: list[Policy], text: str) -> bool:
    return any(p.evaluate("sql", text).allowed for p in policies)


def _play(server: Server, scenario: list[str]) -> list[str]:
    """Run each step of ``scenario`` that a guard allows; return the steps run."""
    ran = []
    for step in scenario:
        text = step.format(**server.tables)
        if _allowed(_guards(server.dialect), text):
            server.run(text)
            ran.append(text)
    return ran


@pytest.fixture
def postgresql() -> Iterator[Server]:
    psycopg = pytest.importorskip("psycopg")
    schema = f"h14sql_{uuid.uuid4().hex[:12]}"
    conn = psycopg.connect(PG_DSN, autocommit=True)
    admin = psycopg.connect(PG_DSN, autocommit=True)
    try:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"SET search_path = {schema}")
        conn.execute("SET statement_timeout = '5s'; SET lock_timeout = '2s'")
        tables = {"t": f"{schema}_t", "u": f"{schema}_u"}
        for name in tables.values():
            conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO {tables['t']} SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g")

        def run(text: str) -> None:
            with suppress(psycopg.Error):
                conn.execute(text)

        def snapshot() -> dict[str, list[tuple[Any, ...]]]:
            out = {}
            names = admin.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
            ).fetchall()
            for (name,) in names:
                if name in tables.values():
                    query = f"SELECT * FROM {schema}.{name} ORDER BY id"
                    out[name] = admin.execute(query, prepare=False).fetchall()
            return out

        yield Server("postgresql", run, snapshot, tables)
    finally:
        conn.close()
        with suppress(Exception):
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


@pytest.fixture
def mariadb() -> Iterator[Server]:
    pymysql = pytest.importorskip("pymysql")
    from pymysql.constants import CLIENT

    url = urlsplit(MARIADB_URL)
    database = f"h14sql_{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "password": url.password or "",
        "autocommit": True,
        "connect_timeout": 5,
        "read_timeout": 15,
    }
    admin = pymysql.connect(**options)
    session: dict[str, Any] = {}

    def connect() -> Any:
        conn = pymysql.connect(database=database, client_flag=CLIENT.MULTI_STATEMENTS, **options)
        with conn.cursor() as cur:
            cur.execute("SET SESSION max_statement_time = 5, lock_wait_timeout = 2")
        return conn

    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {database}")
        session["conn"] = connect()
        tables = {"t": f"{database}_t", "u": f"{database}_u"}
        with session["conn"].cursor() as cur:
            for name in tables.values():
                cur.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
            rows = ", ".join(f"({i}, 'row {i}')" for i in range(1, ROWS + 1))
            cur.execute(f"INSERT INTO {tables['t']} VALUES {rows}")

        def run(text: str) -> None:
            try:
                with session["conn"].cursor() as cur:
                    cur.execute(text)
                    while cur.nextset():
                        pass
            except pymysql.MySQLError:
                session["conn"].close()  # a fresh session after an error: nothing half-read
                session["conn"] = connect()

        def snapshot() -> dict[str, list[tuple[Any, ...]]]:
            out = {}
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (database,)
                )
                names = [row[0] for row in cur.fetchall()]
                for name in names:
                    if name in tables.values():
                        cur.execute(f"SELECT * FROM {database}.{name} ORDER BY id")
                        out[name] = list(cur.fetchall())
            return out

        yield Server("mysql", run, snapshot, tables)
    finally:
        if "conn" in session:
            session["conn"].close()
        with suppress(Exception), admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database}")
        admin.close()


def _server(request: pytest.FixtureRequest, name: str) -> Server:
    server = request.getfixturevalue(name)
    assert isinstance(server, Server)
    return server


@pytest.mark.parametrize("name", ["postgresql", "mariadb"])
def test_every_bypass_is_denied_and_no_row_is_lost(request: pytest.FixtureRequest, name: str) -> None:
    server = _server(request, name)
    before = server.snapshot()
    assert len(before[server.tables["t"]]) == ROWS
    own = POSTGRESQL if server.dialect == "postgresql" else MYSQL
    other = MYSQL if server.dialect == "postgresql" else POSTGRESQL
    for scenario in COMMON + own + other:
        ran = _play(server, scenario)
        _check(server, before, f"{scenario} (ran {ran})")
    for scenario in own:  # the server's own bypasses: a step of each is refused
        steps = [step.format(**server.tables) for step in scenario]
        assert not all(_allowed(_guards(server.dialect), step) for step in steps), steps


@pytest.mark.parametrize("name", ["postgresql", "mariadb"])
def test_what_the_guard_allows_runs_and_keeps_every_row(request: pytest.FixtureRequest, name: str) -> None:
    server = _server(request, name)
    before = server.snapshot()
    for statement in HARMLESS:
        text = statement.format(**server.tables)
        for policy in _guards(server.dialect):
            assert policy.evaluate("sql", text).allowed, (policy.name, text)
        server.run(text)
        _check(server, before, text)


@pytest.mark.parametrize("name", ["postgresql", "mariadb"])
def test_generated_tricks_never_lose_a_row(request: pytest.FixtureRequest, name: str) -> None:
    server = _server(request, name)
    before = server.snapshot()
    rng = random.Random(f"h14-sql-{name}")
    allowed = 0
    for _ in range(400):
        text = " ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 9))).format(**server.tables)
        if _allowed(_guards(server.dialect), text):
            allowed += 1
            server.run(text)
            _check(server, before, text)
    assert allowed < 400  # the tricks are mostly refused; what got through was run above


# Free text with SQL words in it, as an agent's arguments carry it: not SQL to any parser, and
# to the servers a syntax error that runs nothing.
FREE_TEXT = [
    "Please DROP TABLE {t} when the report is done",
    "delete everything old in {t}, thanks",
    "Truncate {t} tomorrow morning",
    "Show me revenue by region from {t}",
    "update me on {t} by Friday",
]


def _run_allowed(dialect: str, text: str) -> bool:
    """Whether a run whose argument is ``text`` is allowed by either guard (the worst case)."""
    ctx = {"agent_id": "agent", "content": (text,), "content_complete": True}
    return any(p.evaluate("run", "agent", ctx, default="allow").allowed for p in _guards(dialect))


@pytest.mark.parametrize("name", ["postgresql", "mariadb"])
def test_arguments_a_run_lets_through_lose_no_row_on_the_server(
    request: pytest.FixtureRequest, name: str
) -> None:
    """What ``no_destructive_sql`` lets through as a run's arguments (free text is not judged),
    run on the server as if the agent passed it on: every table keeps every row."""
    server = _server(request, name)
    before = server.snapshot()
    passed = []
    for scenario in [*COMMON, *POSTGRESQL, *MYSQL, *([text] for text in FREE_TEXT)]:
        for step in scenario:
            text = step.format(**server.tables)
            if _run_allowed(server.dialect, text):
                passed.append(text)
                server.run(text)
                _check(server, before, text)
    free = [text.format(**server.tables) for text in FREE_TEXT]
    assert set(free) <= set(passed)  # free text runs
    destructive = [s[0].format(**server.tables) for s in COMMON[:9]]
    assert not set(destructive) & set(passed)
