"""The flight recorder at rest: compression, encryption, automatic retention, unsupported storages."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import nacl.utils
import pytest

from agent_os.control_plane import FlightRecorder, RecorderError
from agent_os.control_plane.errors import RecorderConfigError, RecorderKeyError, TamperDetected
from tests.support.closing import Closing

SECRET = "data/phi/patient_001.json"


def rows(db: Path) -> list[tuple[int, str, bytes]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT seq, typeof(data), data FROM flight_records ORDER BY seq"))
    finally:
        con.close()


def execute(db: Path, sql: str, *args: object) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute(sql, args)
    con.close()


async def write(db: Path, n: int = 6, **options: object) -> list[dict[str, object]]:
    rec = FlightRecorder("sqlite", str(db), **options)  # type: ignore[arg-type]
    written = []
    for i in range(n):
        data = {"action": "write", "resource": SECRET, "decision": "deny", "reason": "PHI", "i": i}
        await rec.log("action_blocked", f"agent_{i % 2}", data, severity="warning")
        written.append(data)
    await rec.close()
    return written


async def test_compressed_data_is_smaller_at_rest_and_transparent_on_read(
    tmp_path: Path, closing: Closing
) -> None:
    db = tmp_path / "c.db"
    written = await write(db, compression=True)
    stored = rows(db)
    assert {kind for _, kind, _ in stored} == {"blob"}
    rec = closing(FlightRecorder("sqlite", str(db)))
    records = await rec.query()
    assert [r.data for r in records] == written
    assert all(len(blob) < len(r.data_json) for (_, _, blob), r in zip(stored, records, strict=True))
    assert (await rec.verify()).ok
    hits = await rec.query(filters={"data.resource": {"$regex": "phi"}, "data.i": 3})
    assert [r.seq for r in hits] == [4]
    await rec.close()

    plain = tmp_path / "p.db"
    await write(plain)  # compression is off by default
    assert {kind for _, kind, _ in rows(plain)} == {"text"}


async def test_tampered_compressed_data_is_detected(tmp_path: Path, closing: Closing) -> None:
    db = tmp_path / "c.db"
    await write(db, compression=True)
    blob = bytearray(rows(db)[2][2])
    blob[-3] ^= 0x55
    execute(db, "UPDATE flight_records SET data = ? WHERE seq = 3", bytes(blob))
    rec = closing(FlightRecorder("sqlite", str(db)))
    result = await rec.verify()
    assert not result.ok
    assert result.first_bad_seq == 3, result.reason
    await rec.close()


async def test_encrypted_data_never_rests_in_clear(tmp_path: Path, closing: Closing) -> None:
    key = nacl.utils.random(32)
    db = tmp_path / "e.db"
    written = await write(db, encryption_key=key)
    wal = db.with_name("e.db-wal")
    raw = db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert SECRET.encode() not in raw
    assert all(kind == "blob" for _, kind, _ in rows(db))
    rec = closing(FlightRecorder("sqlite", str(db), encryption_key=key))
    assert [r.data for r in await rec.query()] == written
    assert (await rec.verify()).checked == 6
    await rec.log("after", "agent_0", {"resource": SECRET})  # continues the encrypted chain
    assert (await rec.verify()).checked == 7
    await rec.close()

    uncompressed = tmp_path / "u.db"
    await write(uncompressed, compression=False, encryption_key=key)
    rec = closing(FlightRecorder("sqlite", str(uncompressed), encryption_key=key))
    assert [r.data for r in await rec.query()] == written
    await rec.close()


@pytest.mark.parametrize("reader_key", ["wrong", "none"])
async def test_a_wrong_or_missing_key_is_a_specific_error(
    tmp_path: Path, reader_key: str, closing: Closing
) -> None:
    db = tmp_path / "e.db"
    await write(db, encryption_key=nacl.utils.random(32))
    key = nacl.utils.random(32) if reader_key == "wrong" else None
    rec = closing(FlightRecorder("sqlite", str(db), encryption_key=key))
    with pytest.raises(RecorderKeyError, match="another key" if key else "encrypted"):
        await rec.query()
    with pytest.raises(RecorderKeyError):
        await rec.verify()
    await rec.close()


async def test_tampered_or_moved_ciphertext_is_detected(tmp_path: Path, closing: Closing) -> None:
    key = nacl.utils.random(32)
    db = tmp_path / "e.db"
    await write(db, encryption_key=key)
    stored = rows(db)
    flipped = bytearray(stored[3][2])
    flipped[40] ^= 0x01
    execute(db, "UPDATE flight_records SET data = ? WHERE seq = 4", bytes(flipped))
    rec = closing(FlightRecorder("sqlite", str(db), encryption_key=key))
    result = await rec.verify()
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "authenticate" in result.reason
    with pytest.raises(TamperDetected) as caught:
        await rec.query(agent_id="agent_1")
    assert caught.value.sequence == 4
    await rec.close()

    # A valid ciphertext of record 2 copied onto record 5 does not decrypt there.
    execute(db, "UPDATE flight_records SET data = ? WHERE seq = 4", stored[3][2])
    execute(db, "UPDATE flight_records SET data = ? WHERE seq = 5", stored[1][2])
    rec = closing(FlightRecorder("sqlite", str(db), encryption_key=key))
    result = await rec.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    await rec.close()


def test_bad_keys_and_unsupported_storages_are_refused() -> None:
    with pytest.raises(RecorderConfigError, match="32 bytes"):
        FlightRecorder("sqlite", ":memory:", encryption_key=b"short")
    with pytest.raises(RecorderConfigError, match="sqlite"):
        FlightRecorder("memory", encryption_key=nacl.utils.random(32))
    with pytest.raises(RecorderConfigError, match="memory, sqlite and postgresql") as caught:
        FlightRecorder("s3", "s3://bucket/audit")
    assert "'s3' is not supported" in str(caught.value)
    assert isinstance(caught.value, RecorderError)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(RecorderConfigError, match="supported storages"):
        FlightRecorder("mongodb")
    with pytest.raises(RecorderConfigError, match="positive"):
        FlightRecorder("memory", retention_days=0)


async def test_retention_applies_on_open_and_then_periodically(tmp_path: Path, closing: Closing) -> None:
    db = tmp_path / "r.db"
    await write(db, n=5, retention_days=None)
    await asyncio.sleep(0.3)
    # 0.1 s of retention (in days): everything written above is older than that.
    rec = closing(FlightRecorder("sqlite", str(db), retention_days=0.1 / 86400, retention_interval=0.2))
    await rec.log("fresh", "agent_0", {"i": 5})
    assert rec.pruned == 5  # opening applied retention
    kept = await rec.query()
    assert [r.event_type for r in kept] == ["retention_anchor", "fresh"]
    assert kept[0].data["pruned_through_seq"] == 5
    assert (await rec.verify()).ok
    await rec.flush()
    assert rec.pruned == 5  # not due again before the interval
    await asyncio.sleep(0.3)
    await rec.log("later", "agent_0", {"i": 6})
    await rec.flush()
    assert rec.pruned == 7  # the anchor and "fresh" aged out; a new anchor records it
    assert [r.event_type for r in await rec.query()] == ["later", "retention_anchor"]
    assert (await rec.verify()).ok
    await rec.close()


async def test_no_retention_keeps_everything(tmp_path: Path, closing: Closing) -> None:
    db = tmp_path / "k.db"
    await write(db, n=3, retention_days=None)
    rec = closing(FlightRecorder("sqlite", str(db), retention_days=None))
    assert await rec.apply_retention() == 0
    assert len(await rec.query()) == 3
    await rec.close()
