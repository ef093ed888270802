"""The flight recorder on the real PostgreSQL server: chain, queries and tamper detection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from control_plane import FlightRecorder

psycopg = pytest.importorskip("psycopg")

DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"cp_recorder_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def recorded(schema: str, n: int = 10) -> FlightRecorder:
    rec = FlightRecorder("postgresql", DSN, schema=schema, batch_size=4)
    for i in range(n):
        await rec.log(
            "event", f"agent_{i % 2}", {"i": i, "resource": f"data/{'phi' if i % 3 == 0 else 'x'}/{i}"}
        )
    await rec.close()
    return FlightRecorder("postgresql", DSN, schema=schema)


async def tamper(schema: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        for sql in statements:
            await conn.execute(sql.format(t=f'"{schema}".flight_records'))


async def test_postgres_recorder_logs_queries_and_verifies(schema: str) -> None:
    rec = await recorded(schema)
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
async def test_postgres_tampering_is_detected(schema: str, statements: list[str], first_bad: int) -> None:
    rec = await recorded(schema)
    assert (await rec.verify()).ok
    await rec.close()
    await tamper(schema, *statements)
    rec = FlightRecorder("postgresql", DSN, schema=schema)
    result = await rec.verify()
    await rec.close()
    assert not result.ok
    assert result.first_bad_seq == first_bad, result.reason
