"""Issue 14, class 7: two writers of one recorder never acknowledge a record that is not stored.

Two processes writing one SQLite recorder used to number records from the same tail: ``log()``
returned records the other writer's rows then refused. A recorder is now the only writer of its
file (an exclusive lock file) or table (a PostgreSQL advisory lock) while it is open; a second
one gets RecorderInUse at open, naming the holder. Proved with real processes: whichever writer
wins, every record ``log()`` returned is in the storage, and the chain verifies.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent_os.control_plane import FlightRecorder
from agent_os.control_plane.errors import RecorderInUse
from tests.support.closing import Closing
from tests.support.servers import PG_DSN

psycopg = pytest.importorskip("psycopg")

# A writer process: opens the recorder (printing "open" or "refused <error>"), waits for "go" on
# stdin, logs N records printing each returned (seq, hash), closes, prints "closed".
WRITER = textwrap.dedent("""
    import asyncio, json, sys
    from agent_os.control_plane import FlightRecorder
    from agent_os.control_plane.errors import RecorderInUse

    async def main() -> None:
        kind, where, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        if kind == "sqlite":
            rec = FlightRecorder("sqlite", where, retention_days=None, batch_size=20)
        else:
            rec = FlightRecorder("postgresql", sys.argv[4], schema=where, retention_days=None, batch_size=20)
        try:
            await rec.open()
        except RecorderInUse as exc:
            print("refused", json.dumps(str(exc)), flush=True)
            return
        print("open", flush=True)
        sys.stdin.readline()
        for i in range(n):
            r = await rec.log("event", "writer", {"i": i})
            print("logged", r.seq, r.hash, flush=True)
        await rec.close()
        print("closed", flush=True)

    asyncio.run(main())
""")


class Writer:
    def __init__(self, kind: str, where: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, kind, where, str(n), PG_DSN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> list[tuple[int, str]]:
        """What log() returned, once the writer closed."""
        logged: list[tuple[int, str]] = []
        while (line := self.line()) and line != "closed":
            _, seq, digest = line.split()
            logged.append((int(seq), digest))
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read() if self.proc.stderr else ""
        assert line == "closed"
        return logged

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def where(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "audit.db")
        return
    schema = f"h14_writers_{uuid.uuid4().hex[:12]}"
    try:
        yield "postgresql", schema
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def recorder(kind: str, where: str) -> FlightRecorder:
    if kind == "sqlite":
        return FlightRecorder("sqlite", where, retention_days=None)
    return FlightRecorder("postgresql", PG_DSN, schema=where, retention_days=None)


async def stored(kind: str, where: str) -> set[tuple[int, str]]:
    rec = recorder(kind, where)
    try:
        assert (await rec.verify()).ok
        return {(r.seq, r.hash) for r in await rec.query()}
    finally:
        await rec.close()


async def test_a_second_writer_process_is_refused_and_nothing_acknowledged_is_lost(
    where: tuple[str, str],
) -> None:
    kind, place = where
    first, second = Writer(kind, place, 500), None
    try:
        assert first.line() == "open"
        second = Writer(kind, place, 500)
        verdict = second.line()
        assert verdict.startswith("refused "), verdict
        message = json.loads(verdict.removeprefix("refused "))
        assert f"pid {first.proc.pid}" in message  # the holder is named
        assert place in message  # and the file or table
        assert second.proc.wait(timeout=30) == 0
        first.go()
        logged = first.finish()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert len(logged) == 500
    assert set(logged) <= await stored(kind, place)


async def test_writers_started_together_never_acknowledge_a_lost_record(where: tuple[str, str]) -> None:
    """Three processes race to open one recorder; whichever win, each in turn, every record
    any of them was handed by log() is stored and the chain verifies."""
    kind, place = where
    acknowledged: list[tuple[int, str]] = []
    for _round in range(2):
        writers = [Writer(kind, place, 300) for _ in range(3)]
        try:
            verdicts = [w.line() for w in writers]
            assert verdicts.count("open") == 1, verdicts
            assert all(v == "open" or v.startswith("refused ") for v in verdicts), verdicts
            winner = writers[verdicts.index("open")]
            winner.go()
            acknowledged += winner.finish()
        finally:
            for w in writers:
                w.stop()
    assert len(acknowledged) == 600
    assert len({seq for seq, _ in acknowledged}) == 600
    assert set(acknowledged) == await stored(kind, place)


async def test_a_second_recorder_in_the_same_process_is_refused(
    where: tuple[str, str], closing: Closing
) -> None:
    kind, place = where
    first = closing(recorder(kind, place))
    await first.log("event", "a", {"n": 1})
    second = recorder(kind, place)
    try:
        with pytest.raises(RecorderInUse, match=f"pid {os.getpid()}"):
            await second.log("event", "b", {"n": 2})
    finally:
        await second.close()
        await first.close()
    reopened = recorder(kind, place)  # closing released the lock
    try:
        await reopened.log("event", "c", {"n": 3})
        assert [r.data["n"] for r in await reopened.query()] == [1, 3]
    finally:
        await reopened.close()


async def test_a_killed_writer_leaves_no_stale_lock(where: tuple[str, str]) -> None:
    kind, place = where
    writer = Writer(kind, place, 10)
    try:
        assert writer.line() == "open"
        os.kill(writer.proc.pid, signal.SIGKILL)
        writer.proc.wait(timeout=10)
    finally:
        writer.stop()
    rec = recorder(kind, place)
    try:
        await rec.log("event", "after", {})
        assert (await rec.verify()).ok
    finally:
        await rec.close()


async def test_a_writer_that_bypasses_the_lock_is_fenced_off(tmp_path: Path, closing: Closing) -> None:
    """Deleting the lock file of a running recorder lets a second one open: the tail check in
    each batch's transaction then refuses the batch that does not continue the stored chain,
    stores none of it, and that recorder appends nothing more."""
    db = str(tmp_path / "audit.db")
    first = closing(recorder("sqlite", db))
    await first.log("event", "first", {"n": 0})
    await first.flush()
    os.unlink(db + ".lock")  # the lock file of a running recorder, deleted
    second = recorder("sqlite", db)
    try:
        await second.log("event", "second", {"n": 1})
        await second.flush()
        await first.log("event", "first", {"n": 2})  # numbered from the tail it read: seq 2 again
        with pytest.raises(RecorderInUse, match="another writer"):
            await first.flush()
        with pytest.raises(RecorderInUse):
            await first.log("event", "first", {"n": 3})
    finally:
        with pytest.raises(RecorderInUse):
            await first.close()  # its last batch cannot be written; the storage closes anyway
        await second.close()
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT seq, agent_id FROM flight_records ORDER BY seq").fetchall()
    assert rows == [(1, "first"), (2, "second")]
    assert sorted(seq for seq, _ in await stored("sqlite", db)) == [1, 2]  # and it verifies


async def test_the_lock_names_the_holder_process(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    writer = Writer("sqlite", db, 1)
    try:
        assert writer.line() == "open"
        rec = recorder("sqlite", db)
        with pytest.raises(RecorderInUse) as caught:
            await rec.open()
        text = str(caught.value)
        assert f"pid {writer.proc.pid}" in text
        assert db + ".lock" in text
        await rec.close()
        writer.go()
        assert len(writer.finish()) == 1
    finally:
        writer.stop()


async def test_a_writer_whose_seqs_retention_pruned_is_fenced_off(tmp_path: Path, closing: Closing) -> None:
    """The lock bypassed, and the first recorder's retention has deleted the seqs the second
    one continues: nothing of the second one's batch may land under the retention anchor
    (where the next pruning would delete it without a trace)."""
    db = str(tmp_path / "audit.db")
    first = closing(FlightRecorder("sqlite", db, retention_days=1))
    for i in range(10):
        await first.log("event", "first", {"i": i})
    await first.flush()
    os.unlink(db + ".lock")
    second = FlightRecorder("sqlite", db, retention_days=None)
    try:
        for j in range(3):
            await second.log("event", "second", {"j": j})  # seqs 11-13, batched
        for i in range(10, 20):
            await first.log("event", "first", {"i": i})  # seqs 11-20
        await first.flush()
        later = datetime.now().astimezone() + timedelta(days=30)
        assert await first.apply_retention(now=later) == 20  # seqs 1-20 pruned, an anchor at 21
        with pytest.raises(RecorderInUse, match="another writer"):
            await second.flush()
    finally:
        with pytest.raises(RecorderInUse):
            await second.close()
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT seq, agent_id FROM flight_records ORDER BY seq").fetchall()
    con.close()
    assert [agent for _, agent in rows] == ["flight_recorder"]  # the anchor alone
    assert (await first.verify()).ok
