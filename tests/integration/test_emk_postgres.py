"""EMK on the real PostgreSQL with pgvector: what the database itself enforces, tampering,
connection loss mid-batch, index use and recall of filtered searches, concurrency."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from agent_os.emk import (
    EMK,
    AlreadySuperseded,
    ConfigError,
    HashingEmbedder,
    IntegrityError,
    NewMemory,
    StorageUnavailable,
)
from tests.support import wait_until
from tests.support.closing import Closing
from tests.support.emk import APPEND_ONLY_VIOLATIONS
from tests.support.servers import PG_DSN

DIM = 32

Factory = Callable[..., Awaitable[EMK]]


@pytest.fixture
def namespace() -> str:
    return f"emk_pg_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sql(namespace: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A raw superuser connection beside EMK; drops the test's schema afterwards."""
    conn = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    try:
        yield conn
        await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def make_emk(namespace: str, sql: psycopg.AsyncConnection[Any]) -> AsyncIterator[Factory]:
    opened: list[EMK] = []

    async def factory(isolation: str = "agent", **kw: Any) -> EMK:
        emk = EMK(
            "postgresql",
            PG_DSN,
            kw.pop("embedder", HashingEmbedder(DIM)),
            isolation,
            namespace=namespace,
            **kw,
        )
        opened.append(emk)
        await emk.open()
        return emk

    try:
        yield factory
    finally:
        for emk in opened:
            await emk.close()


def random_vector(rng: random.Random, dim: int = DIM) -> list[float]:
    return [rng.gauss(0.0, 1.0) for _ in range(dim)]


# -- append-only, enforced by the database ----------------------------------------------------------


@pytest.mark.parametrize("statement", APPEND_ONLY_VIOLATIONS)
async def test_update_and_delete_in_raw_sql_are_refused_by_the_database(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str, statement: str
) -> None:
    emk = await make_emk()
    record = await emk.store("a1", "An immutable memory.")
    await emk.apply_retention(datetime(2000, 1, 1, tzinfo=UTC), reason="gives retention_log a row")
    with pytest.raises(psycopg.Error) as err:
        await sql.execute(statement.format(s=namespace))
    assert err.value.sqlstate == "EK001"
    assert "append-only" in str(err.value)
    got = await emk.get(record.id, agent_id="a1")
    assert got.content == "An immutable memory."


async def test_raw_inserts_cannot_supersede_across_agents(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str
) -> None:
    emk = await make_emk()
    alice = await emk.store("alice", "Alice's memory.")
    insert = (
        f"INSERT INTO {namespace}.memories (id, agent_id, content, metadata_json, tags, supersedes, "
        "created_at, embedding, content_hash) "
        "VALUES (%s, 'mallory', 'x', '{}', '{}', %s, now(), %s, 'h')"
    )
    vector = "[" + ",".join(["1"] * DIM) + "]"
    with pytest.raises(psycopg.Error) as err:
        await sql.execute(insert, (uuid.uuid4(), alice.id, vector))
    assert err.value.sqlstate == "EK003"
    with pytest.raises(psycopg.Error) as err:
        await sql.execute(insert, (uuid.uuid4(), uuid.uuid4(), vector))
    assert err.value.sqlstate == "EK002"


# -- content hash checked on read --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        "content = 'User prefers light mode.'",
        "agent_id = 'a1'",  # moving another agent's memory into a1's scope
        'metadata_json = \'{{"type":"forged"}}\'',
        "tags = ARRAY['forged']",
        "embedding = (SELECT embedding FROM {s}.memories WHERE content = 'Decoy.')",
        "created_at = created_at - interval '1 day'",
    ],
)
async def test_tampering_behind_the_triggers_is_detected_on_read(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str, tamper: str
) -> None:
    emk = await make_emk()
    victim = await emk.store(
        "a1" if "agent_id" not in tamper else "a2", "User prefers dark mode.", tags=["ui"]
    )
    await emk.store("a1", "Decoy.")
    # A superuser can switch the triggers off; the hash still catches the edit.
    await sql.execute(f"ALTER TABLE {namespace}.memories DISABLE TRIGGER USER")
    await sql.execute(
        f"UPDATE {namespace}.memories SET {tamper.format(s=namespace)} WHERE id = %s", (victim.id,)
    )
    await sql.execute(f"ALTER TABLE {namespace}.memories ENABLE TRIGGER USER")
    with pytest.raises(IntegrityError) as err:
        await emk.get(victim.id, agent_id="a1")
    assert err.value.record_id == victim.id
    with pytest.raises(IntegrityError):
        await emk.search("a1", "dark mode", limit=10, exact=True)
    with pytest.raises(IntegrityError):
        await emk.query("a1", include_superseded=True)
    assert emk.rejected["IntegrityError"] == 3


# -- the database goes away --------------------------------------------------------------------------


async def test_connection_killed_mid_batch_stores_nothing_and_emk_recovers(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str
) -> None:
    emk = await make_emk()
    kept = await emk.store("a1", "Stored before the batch.")
    rng = random.Random(7)
    batch = [
        NewMemory(agent_id="a1", content=f"bulk memory {i}", embedding=random_vector(rng))
        for i in range(30_000)
    ]
    task = asyncio.create_task(emk.store_many(batch))
    copying = (
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
        "AND query LIKE 'COPY%%'"
    )
    pids: list[int] = []

    async def copy_running_or_batch_done() -> bool:
        rows = await (await sql.execute(copying, (f"emk:{namespace}",))).fetchall()
        pids.extend(r[0] for r in rows)
        return bool(pids) or task.done()

    await wait_until(copy_running_or_batch_done, timeout=30, what="the batch's COPY in pg_stat_activity")
    assert pids, "the batch finished before its COPY showed up in pg_stat_activity"
    await sql.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
    with pytest.raises(StorageUnavailable):
        await task
    count = await (await sql.execute(f"SELECT count(*) FROM {namespace}.memories")).fetchone()
    assert count is not None
    assert count[0] == 1
    # The pool replaces the dead connection: EMK keeps working.
    after = await emk.store("a1", "Stored after the failure.")
    assert {r.id for r in await emk.query("a1")} == {kept.id, after.id}


async def test_an_unreachable_database_is_storage_unavailable(namespace: str, closing: Closing) -> None:
    emk = closing(
        EMK("postgresql", "postgresql://postgres@127.0.0.1:1/test", HashingEmbedder(DIM), namespace=namespace)
    )
    with pytest.raises(StorageUnavailable):
        await emk.open()


# -- index and recall --------------------------------------------------------------------------------


async def index_scans(sql: psycopg.AsyncConnection[Any], namespace: str) -> int:
    row = await (
        await sql.execute(
            "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes "
            "WHERE schemaname = %s AND indexrelname = 'memories_embedding'",
            (namespace,),
        )
    ).fetchone()
    return int(row[0]) if row else 0


async def test_filtered_searches_use_the_hnsw_index_and_keep_their_recall(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str
) -> None:
    # Planner settings make it take the HNSW index on this small table, as it does on large ones.
    emk = await make_emk(
        settings={"enable_seqscan": "off", "enable_bitmapscan": "off", "hnsw.ef_search": "40"}
    )
    assert not emk.exact_search
    rng = random.Random(11)
    items = [
        NewMemory(
            agent_id="a1",
            content=f"memory {i}",
            tags=["rare"] if i % 10 == 0 else ["common"],
            embedding=random_vector(rng),
        )
        for i in range(4000)
    ]
    await emk.store_many(items)
    await sql.execute(f"ANALYZE {namespace}.memories")
    before = await index_scans(sql, namespace)
    hits = total = 0
    for _ in range(20):
        q = random_vector(rng)
        approx = await emk.search("a1", embedding=q, limit=10, tags=["rare"])
        exact = await emk.search("a1", embedding=q, limit=10, tags=["rare"], exact=True)
        assert len(exact) == 10
        assert len(approx) == 10  # the iterative scan keeps going past filtered-out candidates
        assert all("rare" in r.tags for r in approx)
        hits += len({r.id for r in approx} & {r.id for r in exact})
        total += 10
    assert hits / total >= 0.9
    # Closing the pool ends its backends, which flushes their statistics.
    await emk.close()

    async def twenty_index_scans() -> bool:
        return await index_scans(sql, namespace) - before >= 20

    await wait_until(twenty_index_scans, what="20 scans of the HNSW index in pg_stat_user_indexes")


# -- concurrency and schema --------------------------------------------------------------------------


async def test_concurrent_supersedes_of_one_record_let_exactly_one_win(make_emk: Factory) -> None:
    emk = await make_emk()
    original = await emk.store("a1", "version 1")
    results = await asyncio.gather(
        *(emk.store("a1", f"version 2 by writer {i}", supersedes=original.id) for i in range(4)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert len(losers) == 3
    assert all(isinstance(e, AlreadySuperseded) for e in losers)
    assert (await emk.get(original.id, agent_id="a1")).superseded_by == winners[0].id


async def test_schema_creation_is_idempotent_and_safe_under_concurrent_opens(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str
) -> None:
    emks = await asyncio.gather(*(make_emk() for _ in range(3)))
    await emks[0].store("a1", "one")
    again = await make_emk()
    assert [r.content for r in await again.query("a1")] == ["one"]
    rows = await (await sql.execute(f"SELECT key, value FROM {namespace}.meta ORDER BY key")).fetchall()
    assert dict(rows) == {
        "dimension": str(DIM),
        "embedding_model": f"hashing-{DIM}",
        "isolation": "agent",
        "schema_version": "1",
    }


async def test_dimensions_beyond_the_index_limit_are_a_config_error(namespace: str, closing: Closing) -> None:
    emk = closing(EMK("postgresql", PG_DSN, HashingEmbedder(3072), namespace=namespace))
    with pytest.raises(ConfigError, match="2000"):
        await emk.open()


async def test_defer_index_then_build_index(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str
) -> None:
    async def has_hnsw() -> bool:
        row = await (
            await sql.execute(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = 'memories_embedding'",
                (namespace,),
            )
        ).fetchone()
        return bool(row and row[0])

    emk = await make_emk(defer_index=True)
    assert not await has_hnsw()
    rng = random.Random(3)
    await emk.store_many(
        [NewMemory(agent_id="a1", content=f"m{i}", embedding=random_vector(rng)) for i in range(200)]
    )
    q = random_vector(rng)
    before = await emk.search("a1", embedding=q, limit=5)  # no index yet: a scan, still right
    await emk.build_index()
    await emk.build_index()  # idempotent
    assert await has_hnsw()
    assert [r.id for r in await emk.search("a1", embedding=q, limit=5, exact=True)] == [r.id for r in before]


async def test_times_read_back_are_utc_whatever_the_sessions_zone(namespace: str, closing: Closing) -> None:
    """The connection asks for New York time; EMK's sessions read times in UTC all the same
    (datetime.UTC as the tzinfo), and the hash check still passes on every read path."""
    dsn = PG_DSN + ("&" if "?" in PG_DSN else "?") + "options=-c%20TimeZone%3DAmerica/New_York"
    emk = closing(EMK("postgresql", dsn, HashingEmbedder(DIM), namespace=namespace))
    try:
        stored = await emk.store("a1", "A memory with a time.")
        found = await emk.search("a1", "A memory with a time.", limit=1)
        got = await emk.get(stored.id, agent_id="a1")
        for record in (found[0], got):
            assert record.created_at.tzinfo is UTC
            assert record.created_at == stored.created_at
            assert record.content_hash == stored.content_hash
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")


@pytest.mark.parametrize("name", ["TimeZone", "timezone", "TIMEZONE"])
async def test_a_time_zone_in_the_settings_wins_in_any_spelling(
    namespace: str, closing: Closing, name: str
) -> None:
    emk = closing(
        EMK("postgresql", PG_DSN, HashingEmbedder(DIM), namespace=namespace, settings={name: "Asia/Tokyo"})
    )
    try:
        stored = await emk.store("a1", "A memory with a time.")
        got = await emk.get(stored.id, agent_id="a1")
        assert got.created_at.utcoffset() is not None
        assert got.created_at.utcoffset().total_seconds() == 9 * 3600  # type: ignore[union-attr]
        assert got.created_at == stored.created_at
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")


async def test_history_ends_on_a_chain_tampered_into_a_cycle(
    make_emk: Factory, sql: psycopg.AsyncConnection[Any], namespace: str
) -> None:
    """Behind the triggers a superuser can point a record at itself: history must end (the
    recursion stops where the chain comes back) and report the edit, not run for ever."""
    emk = await make_emk()
    first = await emk.store("a1", "v1")
    second = await emk.store("a1", "v2", supersedes=first.id)
    await sql.execute(f"ALTER TABLE {namespace}.memories DISABLE TRIGGER USER")
    await sql.execute(f"UPDATE {namespace}.memories SET supersedes = %s WHERE id = %s", (second.id, first.id))
    await sql.execute(f"ALTER TABLE {namespace}.memories ENABLE TRIGGER USER")
    with pytest.raises(IntegrityError):
        await asyncio.wait_for(emk.history(second.id, agent_id="a1"), 10)


@pytest.mark.parametrize(
    "settings",
    [{1: "x"}, {"": "x"}, {"timezone": 5}, {"hnsw.ef_search": None}, {b"timezone": "UTC"}],
)
def test_settings_that_are_not_names_and_text_are_a_config_error(settings: dict[Any, Any]) -> None:
    with pytest.raises(ConfigError):
        EMK("postgresql", PG_DSN, HashingEmbedder(DIM), namespace="emk_never_opened", settings=settings)


@pytest.mark.parametrize(
    ("settings", "name", "want"),
    [
        ({"HNSW.EF_SEARCH": "7"}, "hnsw.ef_search", "7"),
        ({"Hnsw.Iterative_Scan": "off"}, "hnsw.iterative_scan", "off"),
        ({}, "hnsw.ef_search", "40"),
    ],
)
async def test_a_setting_wins_over_the_defaults_in_any_spelling(
    make_emk: Factory, settings: dict[str, str], name: str, want: str
) -> None:
    emk = await make_emk(settings=settings)
    await emk.store("a1", "opened")
    async with emk._store._connection() as conn:  # type: ignore[union-attr]
        row = await (await conn.execute(f"SHOW {name}")).fetchone()
    assert row[0] == want
