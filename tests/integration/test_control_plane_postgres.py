"""The flight recorder on the real PostgreSQL server: chain, queries and tamper detection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from agent_os.control_plane import FlightRecorder
from tests.support.closing import Closing
from tests.support.servers import PG_DSN

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"cp_recorder_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def recorded(schema: str, n: int = 10) -> FlightRecorder:
    async with FlightRecorder("postgresql", PG_DSN, schema=schema, batch_size=4) as rec:
        for i in range(n):
            await rec.log(
                "event", f"agent_{i % 2}", {"i": i, "resource": f"data/{'phi' if i % 3 == 0 else 'x'}/{i}"}
            )
    return FlightRecorder("postgresql", PG_DSN, schema=schema)


async def tamper(schema: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        for sql in statements:
            await conn.execute(sql.format(t=f'"{schema}".flight_records'))


async def test_postgres_recorder_logs_queries_and_verifies(schema: str, closing: Closing) -> None:
    rec = closing(await recorded(schema))
    assert (await rec.verify()).checked == 10
    phi = await rec.query(filters={"data.resource": {"$regex": "^data/phi/"}})
    assert [r.data["i"] for r in phi] == [0, 3, 6, 9]
    assert [r.seq for r in await rec.query(agent_id="agent_1", order="desc", limit=2)] == [10, 8]
    await rec.log("event", "agent_0", {"i": 10})  # continues the stored chain
    assert (await rec.verify()).checked == 11
    await rec.close()


@pytest.mark.parametrize(
    ("statements", "first_bad"),
    [
        (["UPDATE {t} SET data = '{{\"i\":42}}' WHERE seq = 5"], 5),
        (["UPDATE {t} SET event_type = 'nothing' WHERE seq = 2"], 2),
        (["DELETE FROM {t} WHERE seq = 7"], 7),
        (
            [
                "INSERT INTO {t} SELECT 11, id, ts, event_type, agent_id, execution_id, severity, data, "
                "prev_hash, hash FROM {t} WHERE seq = 3"
            ],
            11,
        ),
        (
            [
                "UPDATE {t} SET seq = -seq WHERE seq IN (4, 5)",
                "UPDATE {t} SET seq = 5 WHERE seq = -4",
                "UPDATE {t} SET seq = 4 WHERE seq = -5",
            ],
            4,
        ),
    ],
    ids=["edit-data", "edit-type", "delete", "insert", "reorder"],
)
async def test_postgres_tampering_is_detected(
    schema: str, statements: list[str], first_bad: int, closing: Closing
) -> None:
    rec = closing(await recorded(schema))
    assert (await rec.verify()).ok
    await rec.close()
    await tamper(schema, *statements)
    rec = closing(FlightRecorder("postgresql", PG_DSN, schema=schema))
    result = await rec.verify()
    await rec.close()
    assert not result.ok
    assert result.first_bad_seq == first_bad, result.reason


async def test_postgres_data_at_rest_is_encrypted_and_tampering_is_caught(
    schema: str, closing: Closing
) -> None:
    import nacl.utils

    from agent_os.control_plane.errors import RecorderKeyError

    key = nacl.utils.random(32)
    rec = closing(FlightRecorder("postgresql", PG_DSN, schema=schema, batch_size=3, encryption_key=key))
    for i in range(5):
        await rec.log("action_blocked", "agent_1", {"resource": "data/phi/patient_001.json", "i": i})
    await rec.close()
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        cur = await conn.execute(f'SELECT data FROM "{schema}".flight_records ORDER BY seq')
        stored = [bytes(r[0]) for r in await cur.fetchall()]
    assert len(stored) == 5
    assert all(b"patient_001" not in blob and blob[0] == 0x02 for blob in stored)

    rec = closing(FlightRecorder("postgresql", PG_DSN, schema=schema, encryption_key=key))
    assert [r.data["i"] for r in await rec.query()] == [0, 1, 2, 3, 4]
    assert (await rec.verify()).ok
    await rec.close()
    wrong = closing(FlightRecorder("postgresql", PG_DSN, schema=schema, encryption_key=nacl.utils.random(32)))
    with pytest.raises(RecorderKeyError):
        await wrong.verify()
    await wrong.close()

    flipped = bytearray(stored[2])
    flipped[-1] ^= 0x01
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        await conn.execute(f'UPDATE "{schema}".flight_records SET data = %s WHERE seq = 3', (bytes(flipped),))
    rec = closing(FlightRecorder("postgresql", PG_DSN, schema=schema, encryption_key=key))
    result = await rec.verify()
    await rec.close()
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_postgres_compressed_and_plain_records_read_back(schema: str, closing: Closing) -> None:
    rec = closing(FlightRecorder("postgresql", PG_DSN, schema=schema, compression=False))
    await rec.log("event", "a", {"text": 'quotes " and \\ backslashes', "n": 1})
    await rec.close()
    rec = closing(FlightRecorder("postgresql", PG_DSN, schema=schema, compression=True))
    await rec.log("event", "a", {"reason": "x" * 300, "n": 2})
    assert [r.data["n"] for r in await rec.query()] == [1, 2]
    assert (await rec.query())[0].data["text"] == 'quotes " and \\ backslashes'
    assert (await rec.verify()).ok
    await rec.close()
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        cur = await conn.execute(f'SELECT data FROM "{schema}".flight_records ORDER BY seq')
        first, second = [bytes(r[0]) for r in await cur.fetchall()]
    assert first.startswith(b"{")  # plain JSON as UTF-8
    assert second[0] == 0x01  # compressed
    assert len(second) < 100


async def test_a_read_only_reader_reads_beside_the_writer(schema: str) -> None:
    from agent_os.control_plane.recorder.postgres import PostgresStorage

    async with FlightRecorder("postgresql", PG_DSN, schema=schema) as writer:
        await writer.log("event", "a", {"i": 1})
        await writer.flush()
        storage = PostgresStorage(PG_DSN, schema=schema, read_only=True)
        async with FlightRecorder(storage, retention_days=None) as reader:
            assert [r.data["i"] for r in await reader.query()] == [1]
            await writer.log("event", "a", {"i": 2})
            await writer.flush()
            assert [r.data["i"] for r in await reader.query()] == [1, 2]
            assert (await reader.verify()).ok
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await storage._c().execute(f'DELETE FROM "{schema}".flight_records')
