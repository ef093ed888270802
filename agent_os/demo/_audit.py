"""Part 6: the flight recorder's hash chain, verified, then broken by an edit in the SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

from agent_os.control_plane.policy.decision import VIOLATION_EVENTS
from agent_os.control_plane.recorder.records import canonical_data
from agent_os.demo._scene import Scene


def _forge(path: Path, seq: int, data_json: str) -> None:
    """What an intruder with write access to the file does: rewrite one record's data."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE flight_records SET data = ? WHERE seq = ?", (data_json, seq))
    db.close()


async def flight_recorder(scene: Scene) -> None:
    say, recorder, result = scene.say, scene.kernel.recorder, scene.result
    say.section("8. The flight recorder: one hash-chained record per decision")
    records = await recorder.query()
    result.records = Counter(r.event_type for r in records)
    top = ", ".join(f"{n} {kind}" for kind, n in result.records.most_common())
    say.note(f"{len(records)} records in {scene.recorder_path.name}: {top}")
    denials = [r for r in records if r.event_type in VIOLATION_EVENTS and r.data["decision"] == "deny"]
    for r in denials:
        d = r.data
        say.note(f"  #{r.seq:<4} deny {d['operation']} {d['resource']} by {r.agent_id}: {d['reason']}")
    check = await recorder.verify()
    result.verified_chain, result.checked = check.ok, check.checked
    say.note(f"verify(): ok={check.ok}, {check.checked} records checked")

    target = denials[0]
    forged = {**target.data, "decision": "allow", "reason": "allowed"}
    await asyncio.to_thread(_forge, scene.recorder_path, target.seq, canonical_data(forged))
    result.tampered_seq = target.seq
    say.note(f"someone edits record #{target.seq} in the SQLite file: decision deny -> allow")
    check = await recorder.verify()
    result.first_bad_seq, result.tamper_reason = check.first_bad_seq, check.reason
    say.note(f"verify(): ok={check.ok}, first bad record #{check.first_bad_seq}: {check.reason}")
