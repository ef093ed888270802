"""EMK semantics, one suite run against every storage: memory, PostgreSQL (the local server with
pgvector) and the embedded default (pgserver). Each test gets its own namespace (schema)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent_os.emk import (
    EMK,
    AlreadySuperseded,
    ConfigError,
    ContentTooLarge,
    DimensionMismatch,
    EmbedderMismatch,
    EmptyContent,
    ForeignSupersedes,
    HashingEmbedder,
    InvalidEmbedding,
    InvalidInput,
    InvalidMetadata,
    InvalidTag,
    Limits,
    MissingSession,
    NewMemory,
    RecordNotFound,
    UnknownSupersedes,
)
from tests.support.emk import APPEND_ONLY_VIOLATIONS
from tests.support.servers import PG_DSN

DIM = 64

Factory = Callable[..., Awaitable[EMK]]


@pytest.fixture(scope="module")
def embedded_dir() -> Iterator[Path]:
    """One embedded server for the module, deleted afterwards.

    Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as the user ``pgserver``,
    which must traverse the parent directories, and every pytest session resets
    /tmp/pytest-of-<user> to mode 0700.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from pgserver.postgres_server import get_server
    base = Path(tempfile.mkdtemp(prefix="emk-embedded-"))
    server = get_server(base / "pgdata", cleanup_mode="delete")
    yield base / "pgdata"
    server.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def embedded_uri(embedded_dir: Path) -> str:
    """The connection URI of the module's embedded server, for raw SQL beside EMK."""
    from pgserver.postgres_server import get_server  # imported, warning silenced, by embedded_dir

    # get_server returns the running server of that directory; it starts nothing new.
    return str(get_server(embedded_dir).get_uri("postgres"))


@pytest.fixture(params=["memory", "postgresql", "embedded"])
async def make_emk(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Opens EMKs on one storage; same namespace for every EMK of one test (so a test can
    reopen it), a fresh one per test; dropped afterwards."""
    storage = request.param
    namespace = f"emk_t_{uuid.uuid4().hex[:12]}"
    if storage == "memory":
        connection: str | None = f"memory://{namespace}"
    elif storage == "postgresql":
        connection = PG_DSN
    else:
        connection = str(request.getfixturevalue("embedded_dir"))
    opened: list[EMK] = []

    async def factory(
        isolation: str = "agent", embedder: Any = None, limits: Limits | None = None, **kw: Any
    ) -> EMK:
        emk = EMK(
            storage,
            connection,
            embedder or HashingEmbedder(DIM),
            isolation,
            namespace=namespace,
            limits=limits,
            **kw,
        )
        opened.append(emk)
        await emk.open()
        return emk

    try:
        yield factory
    finally:
        try:
            for emk in opened:
                await emk.close()
        finally:
            if storage == "postgresql":
                async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")


async def count_all(emk: EMK, agent_id: str, session_id: str | None = None) -> int:
    return len(await emk.query(agent_id, include_superseded=True, limit=1000, session_id=session_id))


# -- store, get, search --------------------------------------------------------------------------


async def test_store_returns_the_record_and_get_reads_it_back(make_emk: Factory) -> None:
    emk = await make_emk()
    before = datetime.now(UTC)
    record = await emk.store(
        agent_id="agent_123",
        content="User prefers dark mode and metric units.",
        metadata={"type": "preference", "confidence": 0.9, "big": 1e20},
        tags=["user_preference", "ui", "ui"],
    )
    assert uuid.UUID(record.id)
    assert len(record.content_hash) == 64
    assert before - timedelta(seconds=1) <= record.created_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert record.tags == ("ui", "user_preference")
    got = await emk.get(record.id, agent_id="agent_123")
    assert got.content == record.content
    assert got.metadata == {"type": "preference", "confidence": 0.9, "big": 1e20}
    assert got.content_hash == record.content_hash
    assert got.created_at == record.created_at
    assert got.superseded_by is None


async def test_search_ranks_by_meaning_best_first_with_relevance(make_emk: Factory) -> None:
    emk = await make_emk()
    texts = [
        "User prefers dark mode and metric units.",
        "The quarterly budget meeting moved to Thursday.",
        "Deploy the billing service after the database migration.",
    ]
    for text in texts:
        await emk.store("a1", text)
    hits = await emk.search("a1", "dark mode units preference", limit=3)
    assert hits[0].content == texts[0]
    scores = [h.relevance for h in hits]
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert len(await emk.search("a1", "dark mode units preference", limit=1)) == 1
    best = scores[0]
    assert best is not None
    strict = await emk.search("a1", "dark mode units preference", min_relevance=best - 1e-6)
    assert [h.content for h in strict] == [texts[0]]


async def test_search_with_a_precomputed_embedding(make_emk: Factory) -> None:
    emk = await make_emk()
    vec = [0.0] * DIM
    vec[3] = 1.0
    other = [0.0] * DIM
    other[5] = 1.0
    a = await emk.store("a1", "pointing at axis three", embedding=vec)
    await emk.store("a1", "pointing at axis five", embedding=other)
    hits = await emk.search("a1", embedding=vec, limit=2)
    assert hits[0].id == a.id
    assert hits[0].relevance == pytest.approx(1.0, abs=1e-6)
    assert hits[1].relevance == pytest.approx(0.5, abs=1e-6)  # orthogonal


# -- supersedes and history ----------------------------------------------------------------------


async def test_superseded_records_leave_default_search_but_stay_readable(make_emk: Factory) -> None:
    emk = await make_emk()
    v1 = await emk.store("a1", "User prefers dark mode.", {"type": "preference"})
    v2 = await emk.store("a1", "User now prefers light mode.", supersedes=v1.id)
    v3 = await emk.store("a1", "User now prefers high-contrast mode.", supersedes=v2.id)
    hits = await emk.search("a1", "which mode does the user prefer", limit=10)
    assert [h.id for h in hits] == [v3.id]
    everything = await emk.search("a1", "which mode does the user prefer", limit=10, include_superseded=True)
    assert {h.id for h in everything} == {v1.id, v2.id, v3.id}
    old = await emk.get(v1.id, agent_id="a1")
    assert old.superseded_by == v2.id
    assert old.content == "User prefers dark mode."
    history = await emk.history(v3.id, agent_id="a1")
    assert [r.id for r in history] == [v3.id, v2.id, v1.id]
    assert [r.supersedes for r in history] == [v2.id, v1.id, None]
    assert [r.id for r in await emk.query("a1")] == [v3.id]


async def test_a_record_is_superseded_at_most_once(make_emk: Factory) -> None:
    emk = await make_emk()
    v1 = await emk.store("a1", "first")
    await emk.store("a1", "second", supersedes=v1.id)
    with pytest.raises(AlreadySuperseded) as err:
        await emk.store("a1", "a fork", supersedes=v1.id)
    assert err.value.record_id == v1.id
    assert await count_all(emk, "a1") == 2
    assert emk.rejected["AlreadySuperseded"] == 1


async def test_unknown_supersedes_is_refused(make_emk: Factory) -> None:
    emk = await make_emk()
    ghost = str(uuid.uuid4())
    with pytest.raises(UnknownSupersedes) as err:
        await emk.store("a1", "new version of nothing", supersedes=ghost)
    assert err.value.record_id == ghost
    with pytest.raises(InvalidInput):
        await emk.store("a1", "not even an id", supersedes="memory_456'; DROP TABLE x; --")
    assert await count_all(emk, "a1") == 0


# -- isolation -----------------------------------------------------------------------------------


async def test_agent_isolation_one_agent_never_reads_another(make_emk: Factory) -> None:
    emk = await make_emk("agent")
    secret = await emk.store("alice", "Alice's password hint is the cat's name.", tags=["secret"])
    await emk.store("bob", "Bob likes tea.")
    assert await emk.search("bob", "Alice's password hint is the cat's name.", limit=10) != []
    for hit in await emk.search("bob", "Alice's password hint is the cat's name.", limit=10):
        assert hit.agent_id == "bob"
    assert await emk.search("bob", "password hint", tags=["secret"]) == []
    assert await emk.query("bob", tags=["secret"]) == []
    assert [r.agent_id for r in await emk.query("bob", include_superseded=True)] == ["bob"]
    with pytest.raises(RecordNotFound):
        await emk.get(secret.id, agent_id="bob")
    with pytest.raises(RecordNotFound):
        await emk.history(secret.id, agent_id="bob")
    assert (await emk.get(secret.id, agent_id="alice")).content.startswith("Alice")


async def test_an_agent_cannot_supersede_another_agents_record(make_emk: Factory) -> None:
    emk = await make_emk("agent")
    original = await emk.store("alice", "The meeting is at noon.")
    with pytest.raises(ForeignSupersedes) as err:
        await emk.store("mallory", "The meeting is cancelled.", supersedes=original.id)
    assert err.value.record_id == original.id
    assert (await emk.get(original.id, agent_id="alice")).superseded_by is None
    assert [h.id for h in await emk.search("alice", "meeting")] == [original.id]
    assert await count_all(emk, "mallory") == 0


async def test_session_isolation_separates_sessions_of_one_agent(make_emk: Factory) -> None:
    emk = await make_emk("session")
    with pytest.raises(MissingSession):
        await emk.store("a1", "no session")
    with pytest.raises(MissingSession):
        await emk.search("a1", "anything")
    first = await emk.store("a1", "Session one talked about invoices.", session_id="s1")
    await emk.store("a1", "Session two talked about holidays.", session_id="s2")
    assert [r.content for r in await emk.search("a1", "invoices", session_id="s2")] == [
        "Session two talked about holidays."
    ]
    with pytest.raises(RecordNotFound):
        await emk.get(first.id, agent_id="a1", session_id="s2")
    with pytest.raises(ForeignSupersedes):
        await emk.store("a1", "overwrite from s2", supersedes=first.id, session_id="s2")
    with pytest.raises(RecordNotFound):
        await emk.get(first.id, agent_id="a2", session_id="s1")
    assert (await emk.get(first.id, agent_id="a1", session_id="s1")).id == first.id


async def test_global_isolation_shares_reads_but_not_supersedes(make_emk: Factory) -> None:
    emk = await make_emk("global")
    fact = await emk.store("alice", "The office wifi password rotates monthly.")
    assert [h.id for h in await emk.search("bob", "wifi password")] == [fact.id]
    assert (await emk.get(fact.id, agent_id="bob")).agent_id == "alice"
    with pytest.raises(ForeignSupersedes):
        await emk.store("bob", "The office wifi password never rotates.", supersedes=fact.id)
    newer = await emk.store("alice", "The office wifi password rotates weekly.", supersedes=fact.id)
    assert [h.id for h in await emk.search("bob", "wifi password")] == [newer.id]


async def test_a_namespace_keeps_its_isolation_dimension_and_model(make_emk: Factory) -> None:
    emk = await make_emk("agent")
    await emk.store("a1", "hello")
    with pytest.raises(ConfigError):
        await make_emk("global")  # would expose agent-isolated memories to everyone
    with pytest.raises(ConfigError):
        await make_emk("agent", HashingEmbedder(DIM * 2))

    class OtherModel(HashingEmbedder):
        @property
        def model(self) -> str:
            return "another-model"

    with pytest.raises(EmbedderMismatch):
        await make_emk("agent", OtherModel(DIM))
    again = await make_emk("agent")  # the same configuration reopens it
    assert [r.content for r in await again.query("a1")] == ["hello"]


# -- filters ---------------------------------------------------------------------------------------

NASTY = ["x'; DROP TABLE memories; --", 'quote"s', "$$ dollar $$", "back\\slash", "{brace}", "%(name)s", "%s"]


async def test_sql_metacharacters_in_tags_and_metadata_are_plain_data(make_emk: Factory) -> None:
    emk = await make_emk()
    metadata = {key: key for key in NASTY}
    record = await emk.store("a1", "A memory with hostile tags.", metadata, tags=NASTY)
    await emk.store("a1", "An ordinary memory.", {"kind": "plain"}, tags=["plain"])
    for tag in NASTY:
        assert [r.id for r in await emk.query("a1", tags=[tag])] == [record.id]
        assert [r.id for r in await emk.search("a1", "hostile", tags=[tag])] == [record.id]
    for key in NASTY:
        assert [r.id for r in await emk.query("a1", metadata={key: key})] == [record.id]
        assert await emk.query("a1", metadata={key: "other"}) == []
    got = await emk.get(record.id, agent_id="a1")
    assert dict(got.metadata) == metadata
    assert set(got.tags) == set(NASTY)
    assert await count_all(emk, "a1") == 2


async def test_tag_metadata_and_time_filters(make_emk: Factory) -> None:
    emk = await make_emk()
    a = await emk.store("a1", "Prefers dark mode.", {"type": "preference", "n": 1}, ["ui", "pref"])
    await asyncio.sleep(0.01)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.01)
    b = await emk.store("a1", "Prefers metric units.", {"type": "preference", "n": 2}, ["pref"])
    c = await emk.store("a1", "Lives in Lisbon.", {"type": "fact"}, ["location"])
    assert [r.id for r in await emk.query("a1", tags=["pref"])] == [b.id, a.id]
    assert [r.id for r in await emk.query("a1", tags=["pref", "ui"])] == [a.id]
    assert [r.id for r in await emk.query("a1", metadata={"type": "preference", "n": 2})] == [b.id]
    assert [r.id for r in await emk.query("a1", since=middle)] == [c.id, b.id]
    assert [r.id for r in await emk.query("a1", until=middle)] == [a.id]
    assert [r.id for r in await emk.query("a1", since=middle, newest_first=False)] == [b.id, c.id]
    assert [r.id for r in await emk.search("a1", "prefers", since=middle, tags=["pref"])] == [b.id]
    # A naive datetime is local time, as datetime.now() gives it (the API reference's example).
    assert len(await emk.query("a1", since=datetime.now() - timedelta(hours=24))) == 3
    assert await emk.query("a1", since=datetime.now() + timedelta(hours=1)) == []


# -- batches ---------------------------------------------------------------------------------------


async def test_store_many_is_all_or_nothing(make_emk: Factory) -> None:
    emk = await make_emk()
    keep = await emk.store("a1", "already stored")
    batch = [NewMemory(agent_id="a1", content=f"memory {i}") for i in range(50)]
    with pytest.raises(UnknownSupersedes):
        await emk.store_many([*batch, NewMemory(agent_id="a1", content="bad", supersedes=str(uuid.uuid4()))])
    with pytest.raises(EmptyContent):
        await emk.store_many([*batch, NewMemory(agent_id="a1", content="   ")])
    assert [r.id for r in await emk.query("a1")] == [keep.id]
    stored = await emk.store_many(batch)
    assert len(stored) == 50
    assert await count_all(emk, "a1") == 51


async def test_store_many_can_chain_versions_within_the_batch(make_emk: Factory) -> None:
    emk = await make_emk()
    first = await emk.store("a1", "v1")
    # A record's id is only known once stored, so a batch can chain onto stored records.
    records = await emk.store_many(
        [
            NewMemory(agent_id="a1", content="v2", supersedes=first.id),
            NewMemory(agent_id="a1", content="unrelated"),
        ]
    )
    assert (await emk.get(first.id, agent_id="a1")).superseded_by == records[0].id
    with pytest.raises(AlreadySuperseded):
        await emk.store_many(
            [
                NewMemory(agent_id="a1", content="fork a", supersedes=records[1].id),
                NewMemory(agent_id="a1", content="fork b", supersedes=records[1].id),
            ]
        )
    assert await count_all(emk, "a1") == 3


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"content": ""}, EmptyContent),
        ({"content": " \n\t "}, EmptyContent),
        ({"content": "x" * 1025}, ContentTooLarge),
        ({"content": "é" * 513}, ContentTooLarge),  # 1026 bytes of UTF-8
        ({"content": "nul\x00byte"}, InvalidInput),
        ({"content": 42}, InvalidInput),
        ({"embedding": [1.0] * (DIM - 1)}, DimensionMismatch),
        ({"embedding": [1.0] * (DIM + 1)}, DimensionMismatch),
        ({"embedding": [float("nan")] + [1.0] * (DIM - 1)}, InvalidEmbedding),
        ({"embedding": [float("inf")] + [1.0] * (DIM - 1)}, InvalidEmbedding),
        ({"embedding": [1e39] + [1.0] * (DIM - 1)}, InvalidEmbedding),  # beyond float32
        ({"embedding": [0.0] * DIM}, InvalidEmbedding),
        ({"embedding": ["a"] * DIM}, InvalidEmbedding),
        ({"tags": "ui"}, InvalidTag),
        ({"tags": [""]}, InvalidTag),
        ({"tags": [7]}, InvalidTag),
        ({"tags": ["t" * 129]}, InvalidTag),
        ({"tags": [f"t{i}" for i in range(33)]}, InvalidTag),
        ({"tags": ["nul\x00"]}, InvalidTag),
        ({"metadata": ["not", "a", "dict"]}, InvalidMetadata),
        ({"metadata": {1: "int key"}}, InvalidMetadata),
        ({"metadata": {"x": float("nan")}}, InvalidMetadata),
        ({"metadata": {"x": object()}}, InvalidMetadata),
        ({"metadata": {"x": "y" * 2000}}, InvalidMetadata),
        ({"metadata": {"nul\x00key": 1}}, InvalidMetadata),
        ({"agent_id": ""}, InvalidInput),
        ({"agent_id": "a" * 300}, InvalidInput),
    ],
)
async def test_bad_input_gets_a_specific_error_is_counted_and_stores_nothing(
    make_emk: Factory, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    emk = await make_emk(limits=Limits(max_content_bytes=1024, max_metadata_bytes=1024))
    call: dict[str, Any] = {"agent_id": "a1", "content": "fine"} | kwargs
    with pytest.raises(error):
        await emk.store(**call)
    assert sum(emk.rejected.values()) == 1
    assert await count_all(emk, "a1") == 0
    assert emk.stored == 0


async def test_bad_search_arguments(make_emk: Factory) -> None:
    emk = await make_emk()
    await emk.store("a1", "something")
    with pytest.raises(InvalidInput):
        await emk.search("a1", "")
    with pytest.raises(InvalidInput):
        await emk.search("a1", "q", limit=0)
    with pytest.raises(InvalidInput):
        await emk.search("a1", "q", limit=100_000)
    with pytest.raises(InvalidInput):
        await emk.search("a1", "q", min_relevance=1.5)
    with pytest.raises(DimensionMismatch):
        await emk.search("a1", embedding=[1.0] * 3)
    with pytest.raises(InvalidInput):
        await emk.get("not-a-uuid", agent_id="a1")
    with pytest.raises(RecordNotFound):
        await emk.get(str(uuid.uuid4()), agent_id="a1")
    assert emk.rejected["DimensionMismatch"] == 1


# -- retention ---------------------------------------------------------------------------------------


async def test_retention_is_explicit_and_recorded(make_emk: Factory) -> None:
    emk = await make_emk()
    old_a = await emk.store("a1", "old memory of a1")
    old_b = await emk.store("a2", "old memory of a2")
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    new_a = await emk.store("a1", "new memory of a1")
    assert await emk.retention_log() == []
    run = await emk.apply_retention(cutoff, reason="30-day policy", agent_id="a1")
    assert run.deleted == 1
    assert run.agent_id == "a1"
    with pytest.raises(RecordNotFound):
        await emk.get(old_a.id, agent_id="a1")
    assert (await emk.get(old_b.id, agent_id="a2")).id == old_b.id
    assert (await emk.get(new_a.id, agent_id="a1")).id == new_a.id
    everyone = await emk.apply_retention(cutoff, reason="global policy")
    assert everyone.deleted == 1
    log = await emk.retention_log()
    assert [(r.reason, r.deleted, r.agent_id) for r in log] == [
        ("30-day policy", 1, "a1"),
        ("global policy", 1, None),
    ]
    with pytest.raises(InvalidInput):
        await emk.apply_retention(cutoff, reason=" ")


# -- append-only, enforced by the embedded database ---------------------------------------------------


@pytest.mark.parametrize("make_emk", ["embedded"], indirect=True)
@pytest.mark.parametrize("statement", APPEND_ONLY_VIOLATIONS)
async def test_embedded_refuses_update_delete_and_truncate_in_raw_sql(
    make_emk: Factory, embedded_uri: str, statement: str
) -> None:
    """The embedded default gets the same triggers as PostgreSQL: a superuser connection to the
    embedded server cannot rewrite or remove what EMK stored (test_emk_postgres.py holds the
    PostgreSQL side)."""
    emk = await make_emk()
    record = await emk.store("a1", "An immutable memory.")
    await emk.apply_retention(datetime(2000, 1, 1, tzinfo=UTC), reason="gives retention_log a row")
    async with await psycopg.AsyncConnection.connect(embedded_uri, autocommit=True) as sql:
        with pytest.raises(psycopg.Error) as err:
            await sql.execute(statement.format(s=emk.namespace))
        assert err.value.sqlstate == "EK001"
        assert "append-only" in str(err.value)
        rows = await (await sql.execute(f"SELECT count(*) FROM {emk.namespace}.memories")).fetchone()
    assert rows == (1,)
    got = await emk.get(record.id, agent_id="a1")
    assert got.content == "An immutable memory."
    assert [r.reason for r in await emk.retention_log()] == ["gives retention_log a row"]
