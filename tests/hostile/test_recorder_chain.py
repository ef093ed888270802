"""Issue 14, class 6: rewriting the flight recorder's chain is detected against a kept head.

Whoever can write the recorder's file or table can edit records and re-hash the chain after the
edit, so the chain alone proves nothing; what proves it is a head kept elsewhere (``verify``
checks that the record at the head's seq still has the head's hash) or the signed heads the
recorder writes into its chain (a writer without the key can neither forge them nor remove them
without leaving an unsigned stretch). Every member of the class is run against real SQLite
files and the real PostgreSQL server: edit + re-hash + append, truncate then append, delete and
renumber, reorder, a forged signed head, a head from another recorder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nacl.signing import SigningKey

from agent_os.control_plane import FlightRecorder, KernelSpace
from agent_os.control_plane.admin import AdminAPI
from agent_os.control_plane.errors import HeadError, RecorderConfigError
from agent_os.control_plane.recorder import HEAD_EVENT, Head
from agent_os.control_plane.recorder.codec import DataCodec
from agent_os.control_plane.recorder.heads import sign_head
from agent_os.control_plane.recorder.records import GENESIS, canonical_data, record_hash
from tests.support.closing import Closing
from tests.support.servers import PG_DSN

psycopg = pytest.importorskip("psycopg")

Row = dict[str, Any]
Rewrite = Callable[[list[Row]], list[Row]]
COLS = ("seq", "id", "ts", "event_type", "agent_id", "execution_id", "severity", "data", "prev_hash", "hash")
TOKEN = "hostile-recorder-token-0123456789"


# -- a place the recorder writes, and an attacker who can write it too ---------------------------


class Place:
    """Where a recorder keeps its chain, and the raw access of someone who can write it."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind, self.where = kind, where

    def recorder(self, **options: Any) -> FlightRecorder:
        options.setdefault("retention_days", None)
        if self.kind == "sqlite":
            return FlightRecorder("sqlite", self.where, **options)
        return FlightRecorder("postgresql", PG_DSN, schema=self.where, **options)

    async def rows(self) -> list[Row]:
        sql = f"SELECT {', '.join(COLS)} FROM {self._table()} ORDER BY seq"
        if self.kind == "sqlite":
            with sqlite3.connect(self.where) as db:
                raw = db.execute(sql).fetchall()
        else:
            async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
                raw = await (await conn.execute(sql)).fetchall()
        codec = DataCodec()
        return [dict(zip(COLS, r, strict=True)) | {"data": codec.decode(r[0], r[7])} for r in raw]

    async def replace(self, rows: list[Row]) -> None:
        """Store ``rows`` as the whole table (data as plain JSON, which the recorder reads)."""
        values = [tuple(r[c] for c in COLS) for r in rows]
        insert = f"INSERT INTO {self._table()} ({', '.join(COLS)}) VALUES ({', '.join(['?'] * 10)})"
        if self.kind == "sqlite":
            with sqlite3.connect(self.where) as db:
                db.execute(f"DELETE FROM {self._table()}")
                db.executemany(insert, values)
            return
        async with (
            await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            await cur.execute(f"DELETE FROM {self._table()}")
            await cur.executemany(
                insert.replace("?", "%s"), [(*v[:7], v[7].encode(), *v[8:]) for v in values]
            )

    async def rewrite(self, change: Rewrite) -> None:
        """Apply ``change`` to the rows, then renumber and re-hash the whole chain, as a forger
        who can write the storage (but holds no signing key) would."""
        rows = change(await self.rows())
        prev = GENESIS
        for seq, row in enumerate(rows, start=1):
            row.update(seq=seq, prev_hash=prev)
            row["hash"] = prev = rehash(row, prev)
        await self.replace(rows)

    def _table(self) -> str:
        return "flight_records" if self.kind == "sqlite" else f'"{self.where}".flight_records'


def rehash(row: Row, prev: str) -> str:
    r = row
    return record_hash(
        r["seq"],
        r["id"],
        r["ts"],
        r["event_type"],
        r["agent_id"],
        r["execution_id"],
        r["severity"],
        r["data"],
        prev,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def place(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Place]:
    if request.param == "sqlite":
        yield Place("sqlite", str(tmp_path / "audit.db"))
        return
    schema = f"h14_chain_{uuid.uuid4().hex[:12]}"
    try:
        yield Place("postgresql", schema)
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def fill(place: Place, n: int = 50, **options: Any) -> tuple[int, str]:
    """``n`` records by a recorder that then closes; returns the head it had."""
    rec = place.recorder(**options)
    try:
        for i in range(n):
            await rec.log("event", f"agent_{i % 3}", {"i": i})
        return await rec.head()
    finally:
        await rec.close()


async def verify(place: Place, head: tuple[int, str] | Head | None = None, **options: Any) -> Any:
    trusted = options.pop("trusted_keys", None)
    rec = place.recorder(**options)
    try:
        return await rec.verify(head, trusted_keys=trusted)
    finally:
        await rec.close()


async def append(place: Place, n: int = 1, **options: Any) -> None:
    rec = place.recorder(**options)
    try:
        for i in range(n):
            await rec.log("event", "forger", {"appended": i})
    finally:
        await rec.close()


def edit(seq: int) -> Rewrite:
    def change(rows: list[Row]) -> list[Row]:
        rows[seq - 1]["data"] = canonical_data({"i": "forged"})
        return rows

    return change


def truncate(keep: int) -> Rewrite:
    return lambda rows: rows[:keep]


def delete(seq: int) -> Rewrite:
    return lambda rows: rows[: seq - 1] + rows[seq:]


def swap(a: int, b: int) -> Rewrite:
    def change(rows: list[Row]) -> list[Row]:
        rows[a - 1], rows[b - 1] = rows[b - 1], rows[a - 1]
        return rows

    return change


# -- a kept (seq, hash) head ----------------------------------------------------------------------

REWRITES = {
    "edit and re-hash": (edit(10), 1),
    "truncate then append": (truncate(30), 25),
    "delete a record and renumber": (delete(10), 1),
    "reorder": (swap(10, 20), 1),
    "edit the head's own record": (edit(50), 0),
    "edit and re-hash, appending many": (edit(10), 200),
}


@pytest.mark.parametrize("rewrite", list(REWRITES))
async def test_a_rewrite_is_detected_against_a_kept_head(place: Place, rewrite: str) -> None:
    change, appended = REWRITES[rewrite]
    head = await fill(place)
    assert (await verify(place, head)).ok
    await place.rewrite(change)
    await append(place, appended)
    assert (await verify(place)).ok  # the forger's chain is consistent in itself ...
    result = await verify(place, head)  # ... but not with the head kept elsewhere
    assert not result.ok
    assert result.first_bad_seq is not None
    assert result.first_bad_seq <= 50
    assert "known head" in result.reason or "missing" in result.reason


async def test_a_head_from_another_recorder_is_refused(place: Place, tmp_path: Path) -> None:
    await fill(place)
    other = Place("sqlite", str(tmp_path / "other.db"))
    for n in (50, 20, 80):  # the same length, shorter, longer
        other = Place("sqlite", str(tmp_path / f"other{n}.db"))
        foreign = await fill(other, n)
        result = await verify(place, foreign)
        assert not result.ok, n
    assert (await verify(place, await fill(place, 0))).ok  # its own head still verifies


async def test_an_honest_chain_verifies_against_its_heads(place: Place) -> None:
    first = await fill(place, 10)
    second = await fill(place, 10)
    assert first[0] == 10
    assert second[0] == 20
    assert (await verify(place, first)).ok
    assert (await verify(place, second)).ok
    assert (await verify(place, (0, GENESIS))).ok
    assert not (await verify(place, (20, "0" * 64))).ok
    assert not (await verify(place, (21, second[1]))).ok


# -- exported heads ------------------------------------------------------------------------------


async def test_an_exported_signed_head_detects_a_rewrite(place: Place, tmp_path: Path) -> None:
    key = SigningKey.generate()
    rec = place.recorder(signing_key=key)
    for i in range(30):
        await rec.log("event", "a", {"i": i})
    exported = await rec.export_head(tmp_path / "head.json")
    await rec.close()
    kept = Head.load(tmp_path / "head.json")
    assert kept == exported
    assert kept.signed
    assert kept.seq == 30
    assert json.loads((tmp_path / "head.json").read_text())["format"] == "agent-os.flight-recorder.head.v1"
    public = bytes(key.verify_key)
    assert (await verify(place, kept, trusted_keys=[public])).ok
    assert (await verify(place, kept, trusted_keys=[public.hex()])).ok

    await place.rewrite(edit(5))
    await append(place, 3)
    result = await verify(place, kept, trusted_keys=[public])
    assert not result.ok
    assert "known head" in result.reason


async def test_a_forged_exported_head_is_refused(place: Place, tmp_path: Path) -> None:
    key, forger = SigningKey.generate(), SigningKey.generate()
    rec = place.recorder(signing_key=key)
    for i in range(20):
        await rec.log("event", "a", {"i": i})
    honest = await rec.export_head()
    await rec.close()
    trusted = [bytes(key.verify_key)]
    # the forger rewrites, then signs the new head with a key of its own
    await place.rewrite(edit(3))
    forged_tail = (await place.rows())[-1]
    by_forger = sign_head(forger, forged_tail["seq"], forged_tail["hash"], honest.ts, honest.every)
    assert not (await verify(place, by_forger, trusted_keys=trusted)).ok
    # ... or keeps the honest signature over its own seq and hash
    relabelled = Head(
        honest.seq, forged_tail["hash"], honest.ts, honest.every, honest.public_key, honest.signature
    )
    result = await verify(place, relabelled, trusted_keys=trusted)
    assert not result.ok
    assert "signature does not verify" in result.reason
    # a signed head checked without any trusted key is refused, not taken on its own word
    result = await verify(place, by_forger)
    assert not result.ok
    assert "no trusted key" in result.reason


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"format": "agent-os.flight-recorder.head.v1"}',
        '{"format": "other", "seq": 1, "hash": "' + "a" * 64 + '"}',
        '{"format": "agent-os.flight-recorder.head.v1", "seq": -1, "hash": "' + "a" * 64 + '"}',
        '{"format": "agent-os.flight-recorder.head.v1", "seq": 1.5, "hash": "' + "a" * 64 + '"}',
        '{"format": "agent-os.flight-recorder.head.v1", "seq": true, "hash": "' + "a" * 64 + '"}',
        '{"format": "agent-os.flight-recorder.head.v1", "seq": 1, "hash": "xyz"}',
        '{"format": "agent-os.flight-recorder.head.v1", "seq": 1' + "0" * 5000 + ', "hash": "x"}',
        '{"format": "agent-os.flight-recorder.head.v1", "seq": 1, "hash": "'
        + "a" * 64
        + '", "public_key": "'
        + "b" * 64
        + '"}',
        "[" * 100_000,
        "x" * 10_000_000,
    ],
)
def test_what_is_not_a_head_raises_head_error(text: str) -> None:
    with pytest.raises(HeadError):
        Head.from_json(text)


def test_bad_keys_are_configuration_errors() -> None:
    with pytest.raises(RecorderConfigError):
        FlightRecorder("memory", signing_key=b"short")
    with pytest.raises(RecorderConfigError):
        FlightRecorder("memory", head_every=0)


# -- signed heads in the chain --------------------------------------------------------------------


async def test_signed_heads_cover_an_honest_chain(place: Place) -> None:
    key = SigningKey.generate()
    await fill(place, 95, signing_key=key, head_every=10)
    await fill(place, 7, signing_key=key, head_every=10)  # a restart continues the cadence
    result = await verify(place, trusted_keys=[bytes(key.verify_key)])
    assert result.ok, result.reason
    heads = [r for r in await place.rows() if r["event_type"] == HEAD_EVENT]
    assert result.signed_heads == len(heads) >= 10
    assert heads[-1]["seq"] == (await place.rows())[-1]["seq"]  # close signed the tail
    # the recorder's own key is trusted without being named
    assert (await verify(place, signing_key=key, head_every=10)).ok


FORGERIES: dict[str, Rewrite] = {
    "edit, re-hash and drop the signed heads": lambda rows: [
        r for r in edit(15)(rows) if r["event_type"] != HEAD_EVENT
    ],
    "edit and re-hash, keeping the signed heads": edit(15),
    "truncate and append without heads": lambda rows: (
        truncate(40)(rows) + [dict(rows[30], id=f"forged{i}", event_type="event") for i in range(30)]
    ),
    "delete a record and renumber": delete(15),
    "reorder": swap(12, 25),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_a_rewrite_breaks_the_signed_heads(place: Place, forgery: str) -> None:
    key = SigningKey.generate()
    await fill(place, 60, signing_key=key, head_every=10)
    trusted = [bytes(key.verify_key)]
    assert (await verify(place, trusted_keys=trusted)).ok
    await place.rewrite(FORGERIES[forgery])
    result = await verify(place, trusted_keys=trusted, head_every=10)
    assert not result.ok, forgery
    # and the recorder that reopens the file and signs on top does not make it whole again
    await append(place, 25, signing_key=key, head_every=10)
    result = await verify(place, trusted_keys=trusted, head_every=10)
    assert not result.ok, forgery


async def test_a_forged_signed_head_record_is_refused(place: Place) -> None:
    key, forger = SigningKey.generate(), SigningKey.generate()
    await fill(place, 40, signing_key=key, head_every=10)
    trusted = [bytes(key.verify_key)]

    def resign(rows: list[Row]) -> list[Row]:
        """Edit record 5, then write every signed head again with the forger's key."""
        rows = edit(5)(rows)
        prev = GENESIS
        for seq, row in enumerate(rows, start=1):
            if row["event_type"] == HEAD_EVENT:
                row["data"] = canonical_data(sign_head(forger, seq - 1, prev, 1, 10).as_dict())
            row.update(seq=seq, prev_hash=prev)
            prev = rehash(row, prev)
        return rows

    await place.rewrite(resign)
    result = await verify(place, trusted_keys=trusted)
    assert not result.ok
    assert "not trusted" in result.reason
    # without a trusted key the forger's heads are consistent, which is why a key is needed
    assert (await verify(place)).ok


async def test_a_head_record_that_does_not_verify_is_refused_even_untrusted(place: Place) -> None:
    key = SigningKey.generate()
    await fill(place, 25, signing_key=key, head_every=10)

    def corrupt(rows: list[Row]) -> list[Row]:
        for row in rows:
            if row["event_type"] == HEAD_EVENT:
                data = json.loads(row["data"])
                data["signature"] = "00" * 64
                row["data"] = canonical_data(data)
        return rows

    await place.rewrite(corrupt)
    result = await verify(place)
    assert not result.ok
    assert "forged" in result.reason


async def test_a_caller_cannot_log_a_signed_head(place: Place) -> None:
    rec = place.recorder()
    try:
        with pytest.raises(Exception, match="signed heads"):
            await rec.log(HEAD_EVENT, "someone", {"seq": 1})
    finally:
        await rec.close()


# -- the admin API's verify takes a head ---------------------------------------------------------


async def test_the_admin_verify_takes_a_head(tmp_path: Path, closing: Closing) -> None:
    place = Place("sqlite", str(tmp_path / "audit.db"))
    key = SigningKey.generate()
    head = await fill(place, 30)
    await place.rewrite(edit(7))
    recorder = place.recorder(signing_key=key)
    kernel = closing(KernelSpace(flight_recorder=recorder))
    admin = closing(AdminAPI(kernel, TOKEN))
    port = await admin.start()
    url = f"http://127.0.0.1:{port}/verify"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=auth) as http:

            async def get(params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
                async with http.get(url, params=params) as resp:
                    return resp.status, await resp.json()

            async def post(body: str) -> tuple[int, dict[str, Any]]:
                async with http.post(url, data=body) as resp:
                    return resp.status, await resp.json()

            status, plain = await get()
            assert status == 200
            assert plain["ok"] is True
            status, checked = await get({"seq": str(head[0]), "hash": head[1]})
            assert status == 200
            assert checked["ok"] is False
            assert "known head" in checked["reason"]
            status, checked = await post(Head(*head).to_json())
            assert status == 200
            assert checked["ok"] is False
            own = await recorder.export_head()
            status, checked = await post(own.to_json())
            assert status == 200
            assert checked["ok"] is True
            for bad in ({"seq": "x", "hash": head[1]}, {"seq": "5"}, {"seq": "1" * 30, "hash": head[1]}):
                status, body = await get(bad)
                assert (status, "error" in body) == (400, True), bad
            for text in ("{", "[]", '{"format": "x"}', "x" * 100_000):
                status, body = await post(text)
                assert (status, "error" in body) == (400, True), text
    finally:
        await admin.stop()
        await kernel.close()


async def test_the_control_plane_service_signs_heads_with_its_iatp_key(tmp_path: Path) -> None:
    from agent_os.control_plane import Policy
    from agent_os.iatp import IATP
    from agent_os.services.control_plane_service._serve import serve

    iatp = IATP("memory")
    identity = await iatp.register_agent("control-plane")
    place = Place("sqlite", str(tmp_path / "audit.db"))
    await fill(place, 5)  # records the service's recorder signs a head over when it closes
    recorder = place.recorder()
    stop = asyncio.Event()
    stop.set()  # start, then stop at once: the recorder opens and closes with the service
    await serve(
        broker=f"memory://h14-{uuid.uuid4().hex[:8]}",
        policy=Policy.builtin("strict"),
        recorder=recorder,
        admin_token=TOKEN,
        iatp=iatp,
        admin_port=0,
        stop=stop,
    )
    assert recorder.public_key == base64.b64decode(identity.public_key).hex()
    result = await verify(place, trusted_keys=[identity.public_key])  # IATP's base64 form
    assert result.ok, result.reason
    heads = [r for r in await place.rows() if r["event_type"] == HEAD_EVENT]
    assert result.signed_heads == len(heads) >= 1


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("retention_anchor", "{}"),
        ("retention_anchor", '{"pruned_through_seq": "1' + "0" * 5000 + '", "pruned_through_hash": "x"}'),
        ("retention_anchor", '{"pruned_through_seq": 10000000000, "pruned_through_hash": "x"}'),
        ("retention_anchor", "[" * 50_000 + "]" * 50_000),
        (HEAD_EVENT, "[" * 50_000 + "]" * 50_000),
        (HEAD_EVENT, '{"format": "agent-os.flight-recorder.head.v1"}'),
        (HEAD_EVENT, "not json"),
    ],
)
async def test_a_forged_bookkeeping_record_fails_verify_without_crashing_it(
    tmp_path: Path, event_type: str, data: str
) -> None:
    place = Place("sqlite", str(tmp_path / "audit.db"))
    await fill(place, 10)

    def insert(rows: list[Row]) -> list[Row]:
        return [*rows, dict(rows[-1], id="forged", event_type=event_type, data=data)]

    await place.rewrite(insert)
    result = await verify(place)
    assert not result.ok
    assert result.reason
