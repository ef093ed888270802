"""The flight recorder: logging, queries, replay, export, retention and tamper detection."""

from __future__ import annotations

import asyncio
import csv
import enum
import gc
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent_os.control_plane import FlightRecorder, RecorderError
from agent_os.control_plane.errors import RecorderInUse
from agent_os.control_plane.recorder import sqlite as sqlite_storage
from agent_os.control_plane.recorder.records import FREQUENT_EVENTS, Record
from agent_os.control_plane.recorder.sqlite import (
    _SCHEMA,
    PAGE_SIZE,
    RARE_EVENTS_SQL,
    SqliteStorage,
    _plan,
    where_sql,
)
from agent_os.control_plane.recorder.storage import Where
from tests.support import wait_until
from tests.support.closing import Closing


@pytest.fixture(params=["memory", "sqlite"])
async def recorder(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FlightRecorder]:
    rec = FlightRecorder(storage=request.param, connection_string=str(tmp_path / "audit.db"), batch_size=7)
    await rec.open()
    yield rec
    await rec.close()


async def test_log_query_and_filters(recorder: FlightRecorder) -> None:
    await recorder.log(
        "action_blocked", "agent_123", {"action": "write", "resource": "data/phi/p1.json"}, severity="warning"
    )
    await recorder.log("action_allowed", "agent_123", {"action": "read", "resource": "data/x"})
    await recorder.log(
        "action_blocked", "agent_9", {"action": "write", "resource": "data/pii/p2"}, severity="error"
    )
    await recorder.log(
        "policy_violation", "agent_9", {"action": "write", "resource": "data/phi/p3"}, severity="critical"
    )
    hour_ago = datetime.now() - timedelta(hours=1)
    violations = await recorder.query(
        event_type="policy_violation", start_time=hour_ago, end_time=datetime.now(), limit=100
    )
    assert [r.data["resource"] for r in violations] == ["data/phi/p3"]
    activity = await recorder.query(agent_id="agent_123", severity=["warning", "error", "critical"], limit=50)
    assert [r.event_type for r in activity] == ["action_blocked"]
    phi = await recorder.query(filters={"data.resource": {"$regex": "data/phi/*"}, "data.action": "write"})
    assert [r.agent_id for r in phi] == ["agent_123", "agent_9"]
    newest = await recorder.query(order="desc", limit=2)
    assert [r.seq for r in newest] == [4, 3]
    assert await recorder.query(start_time=datetime.now() + timedelta(hours=1)) == []
    assert len(await recorder.query(filters={"agent_id": ["agent_9"]}, limit=1)) == 1
    with pytest.raises(RecorderError):
        await recorder.log("x", "a", {}, severity="loud")


async def test_records_are_chained_and_verify(recorder: FlightRecorder) -> None:
    for i in range(30):
        await recorder.log(
            "event", f"agent_{i % 3}", {"i": i, "blob": b"\x00\x01", "when": datetime(2024, 1, 1)}
        )
    result = await recorder.verify()
    assert result.ok
    assert result.checked == 30
    seq, head = await recorder.head()
    assert seq == 30
    assert (await recorder.verify(expected_head=(seq, head))).ok
    records = await recorder.query()
    assert records[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert records[0].data["blob"] == {"$b64": "AAE="}


async def test_log_state_dump_records_one_state_dump(recorder: FlightRecorder) -> None:
    state = {"id": "agent_123", "state": "stopped", "data": {"step": 4}, "at": datetime(2024, 1, 2)}
    record = await recorder.log_state_dump("agent_123", state)
    assert (record.event_type, record.agent_id, record.execution_id, record.severity) == (
        "state_dump",
        "agent_123",
        None,
        "info",
    )
    expected = {"state": {**state, "at": "2024-01-02T00:00:00"}}  # stored as JSON
    assert record.data == expected
    (stored,) = await recorder.query(event_type="state_dump")
    assert (stored.id, stored.hash, stored.data) == (record.id, record.hash, expected)
    assert (await recorder.replay("agent_123"))["state"] == expected["state"]
    assert (await recorder.verify()).ok


async def test_timeline_and_replay(recorder: FlightRecorder) -> None:
    await recorder.log("agent_started", "agent_123", {"status": "running"}, execution_id="exec_456")
    await recorder.log_state_dump("agent_123", {"step": 1})
    mid = await recorder.log(
        "state_dump", "agent_123", {"state": {"step": 2, "x": "a"}}, execution_id="exec_456"
    )
    await recorder.log("state_dump", "agent_123", {"state": {"step": 3}}, execution_id="exec_456")
    await recorder.log("agent_completed", "agent_123", {"status": "completed"}, execution_id="exec_456")
    await recorder.log("agent_started", "agent_123", {"status": "running"}, execution_id="exec_other")
    timeline = await recorder.get_timeline(agent_id="agent_123", execution_id="exec_456")
    assert [r.event_type for r in timeline] == [
        "agent_started",
        "state_dump",
        "state_dump",
        "agent_completed",
    ]
    state = await recorder.replay(agent_id="agent_123", execution_id="exec_456", to_event_id=mid.id)
    assert state["state"] == {"step": 2, "x": "a"}
    assert state["status"] == "running"
    assert state["events"] == 2
    final = await recorder.replay(agent_id="agent_123", execution_id="exec_456")
    assert final["status"] == "completed"
    assert final["state"]["step"] == 3
    with pytest.raises(RecorderError):
        await recorder.replay("agent_123", "exec_456", to_event_id="evt_nope")


async def test_export_json_and_csv(recorder: FlightRecorder, tmp_path: Path) -> None:
    for i in range(5):
        await recorder.log("event", "a", {"i": i}, severity="warning" if i % 2 else "info")
    n = await recorder.export(
        format="json",
        output_path=tmp_path / "r.json",
        start_time=datetime.now() - timedelta(days=1),
        end_time=datetime.now(),
        include_metadata=True,
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert n == 5
    assert [d["data"]["i"] for d in data] == [0, 1, 2, 3, 4]
    assert all(len(d["hash"]) == 64 for d in data)
    await recorder.export(
        format="csv",
        output_path=tmp_path / "r.csv",
        fields=["timestamp", "agent_id", "event_type", "severity"],
    )
    with (tmp_path / "r.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["severity"] for r in rows] == ["info", "warning", "info", "warning", "info"]
    assert set(rows[0]) == {"timestamp", "agent_id", "event_type", "severity"}
    with pytest.raises(RecorderError):
        await recorder.export(format="xml", output_path=tmp_path / "r.xml")  # type: ignore[arg-type]


async def test_retention_keeps_the_chain_verifiable(recorder: FlightRecorder) -> None:
    recorder.retention_days = 1
    for i in range(10):
        await recorder.log("event", "a", {"i": i})
    # Everything logged so far is "older than a day" when seen from two days ahead.
    pruned = await recorder.apply_retention(now=datetime.now().astimezone() + timedelta(days=2))
    assert pruned == 10
    await recorder.log("event", "a", {"i": 10})
    remaining = await recorder.query()
    assert [r.event_type for r in remaining] == ["retention_anchor", "event"]
    assert remaining[0].data["pruned_through_seq"] == 10
    assert (await recorder.verify()).ok
    assert await recorder.apply_retention() == 0  # nothing is older than a day now


async def test_batches_are_written_on_size_and_interval(tmp_path: Path, closing: Closing) -> None:
    rec = closing(FlightRecorder("sqlite", str(tmp_path / "b.db"), batch_size=5, flush_interval=0.05))
    await rec.open()
    for i in range(4):
        await rec.log("e", "a", {"i": i})
    assert rec.flushed == 0  # a partial batch waits
    await rec.log("e", "a", {"i": 4})
    await wait_until(lambda: rec.flushed == 5, what="the full batch written in the background")
    await rec.log("e", "a", {"i": 5})
    assert rec.flushed == 5
    await wait_until(lambda: rec.flushed == 6, what="the interval to write the rest")
    await rec.close()
    reopened = closing(FlightRecorder("sqlite", str(tmp_path / "b.db")))
    await reopened.log("e", "a", {"i": 6})  # continues the chain on disk
    assert (await reopened.verify()).checked == 7
    await reopened.close()


async def test_a_failed_flush_keeps_the_batch() -> None:
    async with FlightRecorder("memory", batch_size=100) as rec:
        await rec.log("e", "a", {"i": 1})
        storage = rec.storage
        original = storage.append

        async def failing(rows: object) -> None:
            raise RecorderError("disk full")

        storage.append = failing  # type: ignore[method-assign]
        with pytest.raises(RecorderError):
            await rec.flush()
        storage.append = original  # type: ignore[method-assign]
        assert await rec.flush() == 1
        assert (await rec.verify()).checked == 1


def gate_writes(storage: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold ``storage``'s writes until the second event is set; the first is set when one
    starts."""
    original = storage.append
    writing, gate = asyncio.Event(), asyncio.Event()

    async def slow(rows: Any) -> None:
        writing.set()
        await gate.wait()
        await original(rows)

    storage.append = slow
    return writing, gate


async def test_a_cancelled_waiter_does_not_cancel_the_write_others_wait_for() -> None:
    # Loggers past the pending limit wait for the batch being written. One of them cancelled (a
    # killed agent's handler) must leave that write alone: the others wait for it too.
    async with FlightRecorder("memory", batch_size=2) as rec:
        storage: Any = rec.storage
        writing, gate = gate_writes(storage)

        for i in range(2):
            await rec.log("e", "a", {"i": i})  # the second fills the batch: written in the background
        for i in range(2, 2 + rec.max_pending):  # the batches that may fill beside the write
            rec.append("e", "a", {"i": i})  # ... and now they have: their loggers wait
        cancelled = asyncio.create_task(rec.backpressure())
        other = asyncio.create_task(rec.backpressure())
        await asyncio.wait_for(writing.wait(), 5)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        gate.set()
        await asyncio.wait_for(other, 5)  # not a CancelledError
        assert cancelled.cancelled()
        await rec.flush()
        assert rec.flushed == 2 + rec.max_pending
        assert (await rec.verify()).checked == 2 + rec.max_pending


@pytest.mark.parametrize("started_by", ["a full batch", "the timer"])
async def test_batch_full_waits_for_the_write_under_way_then_for_a_batch_again(started_by: str) -> None:
    # While a background write runs, batch_full is False below max_pending (no backpressure call
    # per record); once the write ends, a full batch is full again, whoever started the write.
    interval = 0.01 if started_by == "the timer" else 60.0
    async with FlightRecorder("memory", retention_days=None, batch_size=2, flush_interval=interval) as rec:
        storage: Any = rec.storage
        writing, gate = gate_writes(storage)
        rec.append("e", "a", {"i": 0})
        if started_by == "a full batch":
            await rec.log("e", "a", {"i": 1})
        await asyncio.wait_for(writing.wait(), 5)
        rec.flush_interval = 60.0  # no other write starts by itself from here on
        write = rec._flush_task
        assert write is not None
        assert not rec._batch  # the write took every record
        for i in range(2, 4):
            rec.append("e", "a", {"i": i})
        assert rec.batch_full  # a full batch meets the write under way ...
        await rec.backpressure()  # ... and goes on batching
        while len(rec._batch) < rec.max_pending - 1:
            rec.append("e", "a", {"i": len(rec._batch)})
            assert not rec.batch_full
        rec.append("e", "a", {"i": -1})
        assert rec.batch_full  # the pending limit: backpressure would wait for the write
        gate.set()
        await asyncio.wait_for(asyncio.shield(write), 5)
        assert len(rec._batch) == rec.max_pending
        assert rec.batch_full  # the write ended: backpressure starts the next one at once
        await rec.flush()
        rec.append("e", "a", {"i": -2})
        rec.append("e", "a", {"i": -3})
        assert rec.batch_full  # and two records make a full batch again
        await rec.flush()
        assert rec.flushed == rec.appended


async def test_records_logged_during_a_write_are_written_without_more_logging() -> None:
    # The flush timer may fire while a write runs: the records that came meanwhile must still
    # be written when it ends, with no further log call and no read to prompt it.
    # (no retention: its own flush would write them too)
    async with FlightRecorder("memory", retention_days=None, batch_size=1000, flush_interval=0.02) as rec:
        storage: Any = rec.storage
        writing, gate = gate_writes(storage)

        await rec.log("e", "a", {"i": 0})
        await asyncio.wait_for(writing.wait(), 5)  # the timer's write of record 1 runs
        for i in range(1, 4):
            await rec.log("e", "a", {"i": i})
        await wait_until(lambda: rec._timer is None, what="the timer fired during the write")
        gate.set()
        await wait_until(lambda: rec.flushed == 4, what="the records of the write's time written")
        assert [json.loads(r[7])["i"] for r in await storage.select(Where())] == [0, 1, 2, 3]


@pytest.mark.parametrize("per_statement", [1, 8, 2048])
async def test_sqlite_writes_alike_in_one_statement_or_several(tmp_path: Path, per_statement: int) -> None:
    # A write is INSERTs of powers of two rows, none longer than the largest allowed (32 rows:
    # one statement of 32, or several); they store the same rows, and they refuse a batch that
    # does not continue the stored chain, writing nothing.
    async with FlightRecorder("sqlite", str(tmp_path / "a.db"), batch_size=10_000) as rec:
        rec.storage._max_rows = per_statement  # type: ignore[attr-defined]
        for i in range(32):
            rec.append("e", f"agent_{i % 3}", {"i": i, "text": "é\u2028\x00" * (i % 4)}, "info", None, True)
        assert await rec.flush() == 32
        stored = await rec.storage.select(Where())
        assert [tuple(r) for r in stored] == [tuple(r) for r in await rec.query()]
        assert [json.loads(r[7])["i"] for r in stored] == list(range(32))
        assert (await rec.verify()).checked == 32
        stale = [tuple(r) for r in stored[10:]]  # seq 11.. again: does not continue seq 32
        with pytest.raises(RecorderInUse):
            await rec.storage.append(stale)
        assert len(await rec.storage.select(Where())) == 32


def test_sqlite_write_plan_is_powers_of_two_largest_first() -> None:
    for rows in [*range(1, 300), 511, 512, 513, 4095, 4096, 5000, 9000]:
        plan = _plan(rows, 2048)
        assert sum(plan) == rows
        assert all(n & (n - 1) == 0 and n <= 2048 for n in plan)
        assert plan == sorted(plan, reverse=True)
        assert len(plan) == rows // 2048 + bin(rows % 2048).count("1")


async def test_sqlite_writes_of_any_size_share_a_dozen_statement_sizes(tmp_path: Path) -> None:
    # A statement per size of write would be prepared again for most writes and each kept by
    # the connection (about 1.4 KB a row): the sizes stay powers of two, whatever the writes.
    async with FlightRecorder("sqlite", str(tmp_path / "a.db"), batch_size=10_000) as rec:
        storage: Any = rec.storage
        sizes: list[int] = []
        values_sql = storage._values_sql

        def recording(n: int) -> str:
            sizes.append(n)
            return values_sql(n)  # type: ignore[no-any-return]

        storage._values_sql = recording
        written = 0
        for n in [1, 3, 37, 100, 255, 300, 511, 700, 1000, 1500, 2047, 2500, 3100]:
            for i in range(n):
                rec.append("e", "a", {"i": written + i}, "info", None, True)
            assert await rec.flush() == n
            written += n
        assert set(sizes) <= {1 << k for k in range(12)}
        assert len(set(sizes)) <= 12
        assert [json.loads(r[7])["i"] for r in await storage.select(Where())] == list(range(written))
        assert (await rec.verify()).checked == written


def _page_size(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        size: int = con.execute("PRAGMA page_size").fetchone()[0]
        return size
    finally:
        con.close()


async def test_a_new_sqlite_file_gets_large_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    async with FlightRecorder("sqlite", str(new)) as rec:
        await rec.log("e", "a", {"i": 1})
    assert PAGE_SIZE == 16384
    assert _page_size(new) == PAGE_SIZE
    con = sqlite3.connect(old)  # a file made before: SQLite's default 4 KiB pages, WAL
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE other (x)")
    con.close()
    async with FlightRecorder("sqlite", str(old)) as rec:
        for i in range(3):
            await rec.log("e", "a", {"i": i})
    assert _page_size(old) == 4096
    async with FlightRecorder("sqlite", str(old)) as rec:
        assert [r.data["i"] for r in await rec.query()] == [0, 1, 2]
        assert (await rec.verify()).ok


def _plan_of(db: Path, where: Where) -> str:
    cond, args = where_sql(where)
    con = sqlite3.connect(db)
    try:
        rows = con.execute(f"EXPLAIN QUERY PLAN SELECT * FROM flight_records{cond}", args).fetchall()
        return " | ".join(str(row[-1]) for row in rows)
    finally:
        con.close()


_MIXED = [
    ("policy_decision", "a"),
    ("action_outcome", "a"),
    ("policy_violation", "b"),
    ("policy_decision", "b"),
    ("agent_started", "a"),
    ("policy_violation", "a"),
    ("action_outcome", "b"),
]


@pytest.mark.parametrize("made", ["now", "before the partial index"])
async def test_sqlite_event_type_index_holds_the_rare_events_and_every_query_is_right(
    tmp_path: Path, made: str
) -> None:
    # The event types of every message and action stay out of the (event_type, seq) index; a
    # query for rarer types uses it. A file made before keeps its full index and answers alike.
    assert FREQUENT_EVENTS == ("policy_decision",)
    db = tmp_path / "audit.db"
    if made != "now":
        con = sqlite3.connect(db)
        con.executescript(_SCHEMA.replace(f" WHERE {RARE_EVENTS_SQL}", "").format(t="flight_records"))
        con.close()
    async with FlightRecorder("sqlite", str(db), batch_size=3) as rec:
        for round_ in range(3):
            for event, agent in _MIXED:
                await rec.log(event, agent, {"round": round_})
        await rec.flush()
        for types in (
            ["policy_violation"],
            ["agent_started", "policy_violation"],
            ["policy_decision"],
            ["policy_decision", "policy_violation"],
            [],
        ):
            for who in (None, "a"):
                for order in ("asc", "desc"):
                    got = await rec.query(event_type=types, agent_id=who, order=order, limit=4)
                    want = [
                        (i, e, a) for i, (e, a) in enumerate(_MIXED * 3, 1) if e in types and who in (None, a)
                    ]
                    want = (want if order == "asc" else want[::-1])[:4]
                    assert [(r.seq, r.event_type, r.agent_id) for r in got] == want, (types, who, order)
        assert (await rec.verify()).ok
    con = sqlite3.connect(db)
    index_sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'flight_records_type'").fetchone()[0]
    entries = con.execute(
        f"SELECT count(*) FROM flight_records INDEXED BY flight_records_type WHERE {RARE_EVENTS_SQL}"
    ).fetchone()[0]
    con.close()
    assert (RARE_EVENTS_SQL in index_sql) == (made == "now")
    assert entries == 15  # the outcomes, violations and starts
    for rare in (["policy_violation"], ["action_outcome", "agent_started"]):
        assert "flight_records_type" in _plan_of(db, Where(event_types=rare, descending=True, limit=1))
    frequent = _plan_of(db, Where(event_types=["policy_decision"]))
    assert ("flight_records_type" in frequent) == (made != "now")


async def _fill_and_watch_the_wal(
    db: Path,
    records: int,
    prepare: Callable[[sqlite_storage.Checkpoints], None] | None = None,
    write_each: bool = False,
) -> tuple[int, int, int]:
    """Log ``records`` records of about 250 bytes as fast as the recorder takes them (its writer
    busy throughout; ``write_each``: one write per record instead, as a quiet recorder's timer
    makes them), then verify the chain: the largest size the WAL reached, and the checkpoints
    done and failed. ``prepare`` gets the storage's checkpoints first."""
    async with FlightRecorder("sqlite", str(db)) as rec:
        checkpoints = getattr(rec.storage, "checkpoints", None)
        assert isinstance(checkpoints, sqlite_storage.Checkpoints)
        if prepare is not None:
            prepare(checkpoints)
        wal, largest = f"{db}-wal", 0
        for i in range(records):
            await rec.log("policy_decision", f"agent-{i % 7}", {"i": i, "pad": "x" * 160}, plain=True)
            if write_each:
                await rec.flush()
            if write_each or i % 1000 == 0:
                largest = max(largest, _file_size(wal))
        await rec.flush()
        largest = max(largest, _file_size(wal))
        assert (await rec.verify()).ok
        return largest, checkpoints.done, checkpoints.failed


def _file_size(path: str) -> int:
    return os.stat(path).st_size if os.path.exists(path) else 0


async def test_sqlite_checkpoints_run_beside_the_writer_and_the_wal_stays_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite's own checkpoints are off on the writer's connection; the checkpoint thread's,
    # with the writer copying what was committed since each began (without that, the WAL
    # passes 35 MB here), keep the WAL small. The writer's own checkpoint when the thread's
    # falls behind is off: the WAL must stay small without it.
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_BEHIND", 1 << 30)
    largest, done, failed = await _fill_and_watch_the_wal(tmp_path / "a.db", 100_000)
    assert failed == 0
    assert done >= 4
    assert largest < 3 * sqlite_storage.CHECKPOINT_BYTES, largest
    async with FlightRecorder("sqlite", str(tmp_path / "a.db")) as again:
        assert len(await again.query(event_type="policy_decision")) == 100_000
        assert (await again.verify()).ok


async def test_sqlite_checkpoints_follow_the_wal_not_the_records_in_small_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write of one record adds several pages to the WAL (about 50 KB here): what starts a
    # checkpoint is the WAL's size (it grew past 100 MB over these writes when the records'
    # bytes were counted instead).
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_BYTES", 256 << 10)
    largest, done, failed = await _fill_and_watch_the_wal(tmp_path / "a.db", 2_000, write_each=True)
    assert failed == 0
    assert done >= 10
    assert largest < 4 << 20, largest


class _SlowConnection:
    """A connection whose statements each take ``delay`` seconds more (a slow disk)."""

    def __init__(self, db: sqlite3.Connection, delay: float) -> None:
        self.db, self.delay = db, delay

    def execute(self, sql: str) -> sqlite3.Cursor:
        time.sleep(self.delay)
        return self.db.execute(sql)

    def close(self) -> None:
        self.db.close()


async def test_sqlite_writer_waits_for_a_checkpoint_that_falls_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpoints on their thread take 0.2 s each: past CHECKPOINT_BEHIND times the threshold
    # the writer waits for the running one and checkpoints itself, so the WAL stays bounded
    # (it grew past 20 MB when the writer only tried, and found the WAL busy).
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_BYTES", 256 << 10)

    def slow(checkpoints: sqlite_storage.Checkpoints) -> None:
        db = checkpoints._db
        assert db is not None
        checkpoints._db = _SlowConnection(db, 0.2)  # type: ignore[assignment]

    largest, done, failed = await _fill_and_watch_the_wal(tmp_path / "a.db", 60_000, slow)
    assert done >= 1
    assert failed == 0
    assert largest < sqlite_storage.CHECKPOINT_BEHIND * (256 << 10) + (4 << 20), largest


async def test_sqlite_checkpoints_that_fail_are_counted_and_made_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After each failed checkpoint on the thread, the writer checkpoints itself (its checkpoint
    # when the thread's falls behind is off here: that is not what keeps the WAL small).
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_BYTES", 256 << 10)
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_BEHIND", 1 << 30)

    def broken(checkpoints: sqlite_storage.Checkpoints) -> None:
        db = checkpoints._db
        assert db is not None
        db.close()  # every checkpoint on the thread now raises ProgrammingError

    largest, done, failed = await _fill_and_watch_the_wal(tmp_path / "a.db", 60_000, broken)
    assert done == 0
    assert failed >= 5
    assert largest < 8 << 20, largest


class Held:
    """A job that holds the storage thread it runs on until ``release`` is set (``started`` is
    set once it runs), then returns ``then(db)``, if given."""

    def __init__(self, then: Callable[[sqlite3.Connection], Any] | None = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.then = then

    def __call__(self, db: sqlite3.Connection) -> Any:
        self.started.set()
        self.release.wait(10)
        return None if self.then is None else self.then(db)


async def unlocked(db: str) -> bool:
    """True when a storage of its own can open (and so lock) the file ``db``."""
    again = SqliteStorage(db)
    try:
        await again.open()
    except RecorderInUse:
        return False
    await again.close()
    return True


async def test_a_cancelled_sqlite_open_leaves_the_file_unlocked(tmp_path: Path) -> None:
    db = str(tmp_path / "a.db")
    threads_before = threading.active_count()
    storage = SqliteStorage(db)
    opening = asyncio.create_task(storage.open())
    await asyncio.sleep(0)  # the connect has started on the storage's thread
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    await storage.close()
    await wait_until(lambda: unlocked(db), what="the file unlocked after the cancelled open")
    await wait_until(lambda: threading.active_count() == threads_before, what="its threads gone")


async def test_sqlite_reads_run_beside_the_writer_and_see_the_writes_before_them(tmp_path: Path) -> None:
    """A file's reads have a connection and thread of their own: a write asked for while a long
    read runs is not held up by it, and a read asked for while a write runs sees that write.
    (Without retention: its reads after a flush would wait for the long read.)"""
    path = str(tmp_path / "a.db")
    async with FlightRecorder("sqlite", path, batch_size=10_000, retention_days=None) as rec:
        storage: Any = rec.storage
        long_read = Held(lambda db: db.execute("SELECT count(*) FROM flight_records").fetchone()[0])
        read = asyncio.ensure_future(storage._read(long_read))
        try:
            await wait_until(long_read.started.is_set, what="the long read under way")
            rec.append("e", "a", {"i": 0}, "info", None, True)
            assert await asyncio.wait_for(rec.flush(), 5) == 1  # not behind the read
        finally:
            long_read.release.set()
        assert await read == 1  # its statement ran after the write

        held = Held()
        hold = asyncio.ensure_future(storage._run(held))
        try:
            await wait_until(held.started.is_set, what="the writer's thread held")
            rec.append("e", "a", {"i": 1}, "info", None, True)
            flushing = asyncio.ensure_future(rec.flush())
            await asyncio.sleep(0)  # the flush has asked for its write
            selected = asyncio.ensure_future(storage.select(Where()))
            await asyncio.sleep(0.05)
            assert not selected.done(), "the read waits for the write asked for before it"
        finally:
            held.release.set()
        await hold
        assert await flushing == 1
        assert [json.loads(r[7])["i"] for r in await selected] == [0, 1]


async def test_sqlite_reads_wait_for_a_write_whose_caller_was_cancelled(tmp_path: Path) -> None:
    """A write whose caller was cancelled runs on: a read asked for after it waits for its end
    (a retention's DELETE cut short by a timeout must not show verify() a half-pruned chain).
    One cancelled before it ran (and so never runs) does not hide the one running before it."""
    storage = SqliteStorage(str(tmp_path / "a.db"))
    held = Held()
    try:
        await storage.open()
        hold = asyncio.ensure_future(storage._run(held))
        await wait_until(held.started.is_set, what="the writer's thread held")
        hold.cancel()  # its job runs on
        queued = asyncio.ensure_future(storage._run(lambda db: None))
        await asyncio.sleep(0)
        queued.cancel()  # never runs
        selected = asyncio.ensure_future(storage.select(Where()))
        await asyncio.sleep(0.05)
        assert not selected.done(), "the read waits for the write still running"
        held.release.set()
        assert await selected == []
    finally:
        held.release.set()
        await storage.close()


async def test_sqlite_reads_go_on_after_the_file_is_renamed(tmp_path: Path) -> None:
    """Renamed (with its WAL) after open, before any read: the open connections still reach it."""
    path = tmp_path / "a.db"
    async with FlightRecorder("sqlite", str(path), retention_days=None) as rec:
        await rec.log("note", "a", {"i": 1})
        await rec.flush()
        for suffix in ("", "-wal", "-shm"):
            if (tmp_path / f"a.db{suffix}").exists():
                (tmp_path / f"a.db{suffix}").rename(tmp_path / f"moved.db{suffix}")
        await rec.log("note", "a", {"i": 2})
        assert [r.data["i"] for r in await rec.query(event_type="note")] == [1, 2]
        assert (await rec.verify()).ok


async def test_a_cancelled_sqlite_close_neither_blocks_the_loop_nor_leaves_the_file_locked(
    tmp_path: Path,
) -> None:
    """close() cancelled while a long read runs: it returns at once, and the close goes on
    once the read ends (the file unlocked, the threads gone)."""
    db = str(tmp_path / "a.db")
    threads_before = threading.active_count()
    storage = SqliteStorage(db)
    long_read = Held()
    try:
        await storage.open()
        read = asyncio.ensure_future(storage._read(long_read))
        await wait_until(long_read.started.is_set, what="the long read under way")
        closing = asyncio.ensure_future(storage.close())
        await asyncio.sleep(0)
        started = time.monotonic()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert time.monotonic() - started < 1.0, "the event loop was not held"
        long_read.release.set()
        await read
        await wait_until(lambda: unlocked(db), what="the file unlocked after the cancelled close")
        await wait_until(lambda: threading.active_count() == threads_before, what="its threads gone")
    finally:
        long_read.release.set()
        await storage.close()


async def test_sqlite_open_and_close_wait_for_a_close_under_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """open() or close() during a close (its caller cancelled, say) waits for it to end: the
    reopened storage holds the file's lock, and a second close returns once the file is free.
    A close that fails after its caller was cancelled is logged."""
    db = str(tmp_path / "a.db")
    storage = SqliteStorage(db)
    held, again = Held(), Held()
    try:
        await storage.open()
        hold = asyncio.ensure_future(storage._run(held))
        await wait_until(held.started.is_set, what="the writer's thread held")
        closing = asyncio.ensure_future(storage.close())
        await asyncio.sleep(0)
        opening = asyncio.ensure_future(storage.open())
        await asyncio.sleep(0.05)
        assert not opening.done(), "open waits for the close under way"
        held.release.set()
        await hold
        await closing
        await opening
        assert not await unlocked(db), "the reopened storage holds the lock"

        original = storage._close_opened

        def failing(*args: Any) -> None:
            original(*args)  # closed and unlocked, then
            raise OSError("disk gone")

        storage._close_opened = failing  # type: ignore[method-assign,assignment]
        hold = asyncio.ensure_future(storage._run(again))
        await wait_until(again.started.is_set, what="the writer's thread held again")
        closing = asyncio.ensure_future(storage.close())
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        second = asyncio.ensure_future(storage.close())
        await asyncio.sleep(0.05)
        assert not second.done(), "a second close waits for the first"
        again.release.set()
        await second
        await wait_until(
            lambda: any("closing sqlite storage" in r.getMessage() for r in caplog.records),
            what="the failed close logged",
        )
        assert await unlocked(db)
    finally:
        held.release.set()
        again.release.set()
        await storage.close()


async def test_sqlite_query_with_an_unhashable_event_type_is_a_recorder_error(tmp_path: Path) -> None:
    async with FlightRecorder("sqlite", str(tmp_path / "a.db")) as rec:
        await rec.log("note", "a", {})
        with pytest.raises(RecorderError):
            await rec.query(event_type=[{"not": "a type"}])  # type: ignore[list-item]


async def test_sqlite_write_that_does_not_continue_the_stored_tail_stores_nothing(tmp_path: Path) -> None:
    # Seq 5 stored by something else (the lock bypassed): the write of seqs 1-5 (statements of 4
    # and 1 rows) is refused whole, and the recorder appends nothing more.
    db = tmp_path / "a.db"
    async with FlightRecorder("sqlite", str(db)) as rec:
        for i in range(5):
            rec.append("e", "a", {"i": i}, "info", None, True)
        with sqlite3.connect(db) as other:
            row = "(5, 'x', 0, 'e', 'b', NULL, 'info', '{}', 'p', 'h')"
            other.execute(f"INSERT INTO flight_records VALUES {row}")
        other.close()
        with pytest.raises(RecorderInUse, match="another writer"):
            await rec.flush()
        with pytest.raises(RecorderInUse):
            rec.append("e", "a", {}, "info", None, True)
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT seq, agent_id FROM flight_records").fetchall() == [(5, "b")]
        con.close()
        with pytest.raises(RecorderInUse):
            await rec.close()


async def test_a_flush_started_by_a_full_batch_writes_multiples_of_the_write_unit(tmp_path: Path) -> None:
    # It writes a multiple of 512 records when more wait and leaves the newest rest to the next
    # write; the timer and flush() write everything (a record waits flush_interval at most).
    path = str(tmp_path / "a.db")
    # (no retention: its own flush would write the rest at once)
    async with FlightRecorder(
        "sqlite", path, retention_days=None, batch_size=10_000, flush_interval=0.05
    ) as rec:
        storage: Any = rec.storage
        writes: list[int] = []
        append = storage.append

        async def recording(rows: Any) -> None:
            writes.append(len(rows))
            await append(rows)

        storage.append = recording
        for i in range(1300):
            rec.append("e", "a", {"i": i}, "info", None, True)
        assert await rec._flush(whole=False) == 1024
        assert len(rec._batch) == 276
        await wait_until(lambda: rec.flushed == 1300, what="the timer's write of the rest")
        for i in range(700):
            rec.append("e", "a", {"i": 1300 + i}, "info", None, True)
        await wait_until(lambda: rec.flushed == 2000, what="the timer's write of all 700")
        assert writes == [1024, 276, 700]
        assert [json.loads(r[7])["i"] for r in await storage.select(Where())] == list(range(2000))
        assert (await rec.verify()).checked == 2000


async def test_a_cancelled_flush_counts_its_write_once(tmp_path: Path) -> None:
    # The writer thread cannot be stopped: a caller cancelled mid-write (a read with a timeout
    # flushes first) must neither keep the written records batched (the next write would take
    # the recorder's own seqs for another writer's) nor lose them.
    path = str(tmp_path / "a.db")
    async with FlightRecorder("sqlite", path, retention_days=None, batch_size=100_000) as rec:
        for i in range(20_000):
            rec.append("e", "a", {"i": i, "pad": "x" * 200}, "info", None, True)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rec.query(limit=1), timeout=0.001)
        assert rec.flushed == 20_000
        assert not rec._batch
        await rec.log("e", "a", {"i": 20_000})
        assert await rec.flush() == 1
        assert (await rec.verify()).checked == 20_001


async def test_close_writes_what_is_logged_during_its_last_write() -> None:
    async with FlightRecorder("memory", retention_days=None) as rec:
        storage: Any = rec.storage
        writing, gate = gate_writes(storage)
        await rec.log("e", "a", {"i": 0})
        closing = asyncio.create_task(rec.close())
        await asyncio.wait_for(writing.wait(), 5)
        late = await rec.log("e", "a", {"i": 1})  # accepted: the recorder is not closed yet
        gate.set()
        await asyncio.wait_for(closing, 5)
        assert [json.loads(r[7])["i"] for r in await storage.select(Where())] == [0, 1]
        assert late.seq == 2


async def test_str_subclasses_are_recorded_as_their_text(recorder: FlightRecorder) -> None:
    class Kind(enum.StrEnum):
        CALL = "tool_call"

    record = await recorder.log(Kind.CALL, Kind.CALL, {"i": 0}, execution_id=Kind.CALL)
    assert type(record.event_type) is str
    assert record.event_type == "tool_call"
    [stored] = await recorder.query(event_type="tool_call")
    assert (stored.event_type, stored.agent_id, stored.execution_id) == ("tool_call",) * 3
    assert (await recorder.verify()).ok


@pytest.mark.parametrize(
    ("event_type", "agent_id", "execution_id"),
    [("e", None, None), (7, "a", None), ("e", "a", 3), ("e", b"a", None)],
)
async def test_a_record_the_storage_cannot_take_is_refused_at_once(
    recorder: FlightRecorder, event_type: Any, agent_id: Any, execution_id: Any
) -> None:
    # Taken into the batch, it would fail every later write of the batch (SQLite: NOT NULL,
    # or a type the file cannot hold) and every record after it with it.
    with pytest.raises(RecorderError, match="must be str"):
        await recorder.log(event_type, agent_id, {"i": 0}, execution_id=execution_id)
    for event, agent, data in [("e\ud800", "a", {}), ("e", "a\udfff", {}), ("e", "a", {"t": "\ud800"})]:
        with pytest.raises(RecorderError, match="not valid Unicode"):
            await recorder.log(event, agent, data)
    await recorder.log("e", "a", {"i": 1})
    await recorder.flush()
    assert [r.data["i"] for r in await recorder.query()] == [1]
    assert (await recorder.verify()).ok


async def test_sqlite_refuses_a_row_it_cannot_store_without_fencing_the_recorder(tmp_path: Path) -> None:
    # Only a taken seq means another writer: any other constraint is a plain RecorderError.
    async with FlightRecorder("sqlite", str(tmp_path / "a.db")) as rec:
        bad = (1, "x", 0, "e", None, None, "info", "{}", "0" * 64, "h")
        with pytest.raises(RecorderError, match="NOT NULL") as caught:
            await rec.storage.append([bad])
        assert not isinstance(caught.value, RecorderInUse)
        await rec.log("e", "a", {"i": 1})
        await rec.flush()
        assert (await rec.verify()).checked == 1


class _FailingCommit:
    """A connection whose next COMMIT fails as SQLITE_BUSY or an I/O error can, leaving the
    transaction open."""

    def __init__(self, db: sqlite3.Connection, rollback_fails: bool = False) -> None:
        self.db = db
        self.failures = {"COMMIT": 1, "ROLLBACK": int(rollback_fails)}

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.failures.get(sql):
            self.failures[sql] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize("rollback_fails", [False, True])
async def test_sqlite_write_whose_commit_fails_is_rolled_back_and_written_by_the_next(
    tmp_path: Path, rollback_fails: bool
) -> None:
    # The transaction is ended at once, or (its ROLLBACK failing too) by the next write.
    async with FlightRecorder("sqlite", str(tmp_path / "a.db"), batch_size=10_000) as rec:
        storage: Any = rec.storage
        real = storage._db
        storage._db = _FailingCommit(real, rollback_fails)
        try:
            for i in range(5):
                rec.append("e", "agent", {"i": i}, "info", None, True)
            with pytest.raises(RecorderError, match="disk I/O error"):
                await rec.flush()
            assert real.in_transaction is rollback_fails
            assert await rec.flush() == 5
        finally:
            storage._db = real
        assert [json.loads(r[7])["i"] for r in await storage.select(Where())] == list(range(5))
        assert (await rec.verify()).ok


def _tamper(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    with con:
        for sql in statements:
            con.execute(sql)
    con.close()


async def _recorded(path: Path, n: int = 10) -> FlightRecorder:
    async with FlightRecorder("sqlite", str(path)) as rec:
        for i in range(n):
            await rec.log("event", f"agent_{i}", {"i": i})
    return FlightRecorder("sqlite", str(path))


COPY_ROW = (
    "INSERT INTO flight_records SELECT {seq}, id, ts, event_type, agent_id, execution_id, severity, "
    "data, prev_hash, hash FROM flight_records WHERE seq = {src}"
)


@pytest.mark.parametrize(
    ("statements", "first_bad"),
    [
        (["UPDATE flight_records SET data = '{\"i\":99}' WHERE seq = 4"], 4),
        (["UPDATE flight_records SET agent_id = 'someone_else' WHERE seq = 6"], 6),
        (["UPDATE flight_records SET severity = 'debug' WHERE seq = 2"], 2),
        (["UPDATE flight_records SET ts = ts + 1 WHERE seq = 9"], 9),
        (["DELETE FROM flight_records WHERE seq = 5"], 5),
        (["DELETE FROM flight_records WHERE seq = 1"], 1),
        (
            [
                "UPDATE flight_records SET seq = seq + 1000 WHERE seq >= 7",
                COPY_ROW.format(seq=7, src=1003),
                "UPDATE flight_records SET seq = seq - 999 WHERE seq >= 1007",
            ],
            7,
        ),
        (
            [
                "UPDATE flight_records SET seq = 100 WHERE seq = 3",
                "UPDATE flight_records SET seq = 3 WHERE seq = 4",
                "UPDATE flight_records SET seq = 4 WHERE seq = 100",
            ],
            3,
        ),
    ],
    ids=[
        "edit-data",
        "edit-agent",
        "edit-severity",
        "edit-time",
        "delete-middle",
        "delete-first",
        "insert",
        "reorder",
    ],
)
async def test_sqlite_tampering_is_detected(
    tmp_path: Path, statements: list[str], first_bad: int, closing: Closing
) -> None:
    db = tmp_path / "t.db"
    rec = closing(await _recorded(db))
    assert (await rec.verify()).ok
    await rec.close()
    _tamper(db, *statements)
    rec = closing(FlightRecorder("sqlite", str(db)))
    result = await rec.verify()
    await rec.close()
    assert not result.ok
    assert result.first_bad_seq == first_bad, result.reason


async def test_a_cut_tail_is_detected_against_a_known_head(tmp_path: Path, closing: Closing) -> None:
    db = tmp_path / "t.db"
    rec = closing(await _recorded(db))
    head = await rec.head()
    await rec.close()
    _tamper(db, "DELETE FROM flight_records WHERE seq >= 9")
    rec = closing(FlightRecorder("sqlite", str(db)))
    assert (await rec.verify()).ok  # the chain alone cannot see a cut tail
    result = await rec.verify(expected_head=head)
    await rec.close()
    assert not result.ok
    assert result.first_bad_seq == 9


async def test_pruning_without_an_anchor_is_detected(tmp_path: Path, closing: Closing) -> None:
    db = tmp_path / "t.db"
    rec = closing(await _recorded(db))
    rec.retention_days = 1e-9  # everything logged so far is older than that
    assert await rec.apply_retention(now=datetime.now().astimezone() + timedelta(seconds=1)) > 0
    await rec.log("event", "a", {"after": True})
    assert (await rec.verify()).ok
    anchor = (await rec.query(event_type="retention_anchor"))[-1]
    await rec.close()
    _tamper(db, f"DELETE FROM flight_records WHERE seq = {anchor.seq}")
    rec = closing(FlightRecorder("sqlite", str(db)))
    result = await rec.verify()
    await rec.close()
    assert not result.ok


WRITER = textwrap.dedent("""
    import asyncio, sys
    from agent_os.control_plane import FlightRecorder

    async def main() -> None:
        rec = FlightRecorder("sqlite", sys.argv[1], batch_size=50, flush_interval=60)
        i = 0
        while True:
            await rec.log("event", "writer", {"i": i})
            i += 1
            if i % 50 == 0:
                await rec.flush()
                print(i, flush=True)
                if i == 500:
                    await rec.log("event", "writer", {"i": "unflushed"})
                    await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_records_up_to_the_last_flush_survive_a_killed_writer(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    last = 0
    with subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            last = int(line)
            if last == 500:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert last == 500

    async def check() -> None:
        rec = FlightRecorder("sqlite", str(db))
        result = await rec.verify()
        records = await rec.query()
        await rec.close()
        assert result.ok
        assert result.checked == 500
        assert [r.data["i"] for r in records] == list(range(500))

    asyncio.run(check())


# -- the canonical encoding -----------------------------------------------------------------------


def _old_record_hash(
    seq: int, rid: str, ts: int, et: str, agent: str, exe: str | None, sev: str, data_json: str, prev: str
) -> str:
    """The hash as the first version of the recorder computed it (stdlib JSON, an f-string):
    records already on disk must keep verifying."""
    import hashlib

    text = json.encoder.encode_basestring
    exe_text = "null" if exe is None else text(exe)
    head = f"[{seq:d},{text(rid)},{ts:d},{text(et)},{text(agent)},{exe_text},{text(sev)},{text(prev)}]"
    body = head + str(data_json)
    return hashlib.sha256(body.encode()).hexdigest()


_TRICKY = [
    "",
    "plain",
    'quote " back \\ slash /',
    "\x00\x01\x1f\x7f\b\f\n\r\t",
    "é ü \u2028 \U0001f600",
    "a" * 300,
]


def test_record_hash_is_the_hash_records_on_disk_were_made_with() -> None:
    from agent_os.control_plane.recorder.records import canonical_data, record_hash

    for rid, agent, exe in itertools.product(_TRICKY, _TRICKY, [None, *_TRICKY]):
        data = canonical_data({"text": agent, "n": 1})
        fields = (7, rid, 1_700_000_000_000_000_000, "policy_decision", agent, exe, "info", data, "ab" * 32)
        assert record_hash(*fields) == _old_record_hash(*fields)


def test_canonical_data_is_sorted_compact_json_and_normalizes_the_rest() -> None:
    import enum

    from agent_os.control_plane.recorder.records import canonical_bytes, canonical_data

    class Color(enum.Enum):
        RED = 1

    for text in _TRICKY:
        plain = {"z": text, "a": 1, "m": [1.5, None, True], "n": {"y": 2, "x": text}}
        expected = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert canonical_data(plain) == expected
        assert canonical_bytes(plain, plain=True) == expected.encode()
    # Any keys: the int key is deliberate (canonical_data turns a non-str key into its text).
    odd: dict[Any, object] = {
        "blob": b"\x00\x01",
        "when": datetime(2024, 1, 1),
        "tags": {"b", "a"},
        "nan": float("nan"),
        "big": 2**70,
        "color": Color.RED,
        3: "int key",
        "obj": object,
    }
    data = json.loads(canonical_data(odd))
    assert data["blob"] == {"$b64": "AAE="}
    assert data["when"] == "2024-01-01T00:00:00"
    assert data["tags"] == ["a", "b"]
    assert data["nan"] == "nan"
    assert data["big"] == 2**70
    assert data["color"] == "RED"
    assert data["3"] == "int key"
    assert data["obj"] == repr(object)
    assert canonical_data(odd) == canonical_data(dict(reversed(odd.items())))  # deterministic


async def test_appended_records_carry_the_documented_hash() -> None:
    from agent_os.control_plane.recorder.records import record_hash

    async with FlightRecorder("memory") as rec:
        records = [
            rec.append(
                "policy_decision", "a1", {"decision": "allow", "trust_level": 0.5}, "info", None, True
            ),
            rec.append("policy_decision", "a1", {"big": 2**70}, "warning", None, True),  # not plain after all
            rec.append("execute", "a1", {"blob": b"\x00"}, "info", "exe-1"),
            rec.append("execute", "a1", None),
        ]
        for r in records:
            assert r.hash == record_hash(
                r.seq,
                r.id,
                r.ts,
                r.event_type,
                r.agent_id,
                r.execution_id,
                r.severity,
                r.data_json,
                r.prev_hash,
            )
        assert records[1].data == {"big": 2**70}
        assert (await rec.verify()).ok


async def test_records_waiting_for_the_writer_or_kept_in_memory_are_not_tracked_by_the_collector() -> None:
    # A Record is a tuple subclass, which the garbage collector tracks for as long as it lives:
    # thousands waiting for the writer made every collection longer (and a memory store's
    # records, for ever). Waiting and stored rows are plain tuples, which it stops tracking.
    agent = f"gc-{os.getpid()}-{time.monotonic_ns()}"

    def tracked_records() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Record and o.agent_id == agent)

    async with FlightRecorder("memory", batch_size=10_000) as rec:
        returned = [rec.append("policy_decision", agent, {"i": i}, plain=True) for i in range(300)]
        assert tracked_records() == 300  # the caller's own Records
        del returned
        assert tracked_records() == 0  # none for the 300 waiting
        assert rec.unwritten_since_ns is not None
        await rec.flush()
        assert tracked_records() == 0  # nor in the memory store
        records = await rec.query(agent_id=agent)
        assert [r.data["i"] for r in records] == list(range(300))
        assert (await rec.verify()).ok


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_a_flush_cancelled_after_its_write_counts_the_records_once(turns: int) -> None:
    # Cancelled once the storage has written the batch: putting the batch back would write it
    # twice, and the second write (a tail that moved) would fence the recorder for good.
    async with FlightRecorder("memory", retention_days=None, batch_size=100, flush_interval=60) as rec:
        storage: Any = rec.storage
        original, written = storage.append, asyncio.Event()

        async def append(rows: Any) -> None:
            await original(rows)
            written.set()

        storage.append = append
        rec.append("e", "a", {"i": 1})
        flush = asyncio.create_task(rec.flush())
        await written.wait()  # not wait_for: its own task would let the flush end first
        for _ in range(turns):
            await asyncio.sleep(0)
        flush.cancel()
        await asyncio.gather(flush, return_exceptions=True)
        assert len(storage.rows) == 1
        assert not rec._batch
        rec.append("e", "a", {"i": 2})
        assert await rec.flush() == 1  # not RecorderInUse
        assert rec.flushed == 2
        assert (await rec.verify()).checked == 2


async def test_a_failed_flush_leaves_its_records_to_the_timer() -> None:
    # The timer fired (finding the batch taken) while an explicit flush wrote; the flush then
    # failed: the records must still be written without more logging.
    async with FlightRecorder("memory", retention_days=None, batch_size=100, flush_interval=0.01) as rec:
        storage: Any = rec.storage
        original, writing, gate = storage.append, asyncio.Event(), asyncio.Event()
        failures = [1]

        async def append(rows: Any) -> None:
            writing.set()
            await gate.wait()
            if failures[0]:
                failures[0] -= 1
                raise RecorderError("storage down")
            await original(rows)

        storage.append = append
        rec.append("e", "a", {"i": 1})
        flush = asyncio.create_task(rec.flush())
        await asyncio.wait_for(writing.wait(), 5)
        await wait_until(lambda: rec._timer is None)  # it fired during the write
        gate.set()
        with pytest.raises(RecorderError):
            await flush
        await wait_until(lambda: rec.flushed == 1)
