"""Reversible actions: fs.write and fs.delete keep a snapshot; kernel.rollback restores it as a
governed, recorded action; snapshots expire, are bounded, and a failure to take one blocks the
action or lets it go on, as the store says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import KernelSpace
from agent_os.control_plane.actions import SnapshotStore
from agent_os.control_plane.errors import KernelError


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _write(kernel: KernelSpace, agent: str, target: str, content: str) -> ActionResult:
    return await kernel.submit(ActionRequest("fs.write", target, {"content": content}, agent))


async def _agent(kernel: KernelSpace, name: str, permissions: list[str]) -> str:
    """A running agent outside agent code (a bus agent) holding ``permissions``; its id."""
    proc = kernel.external(name)
    proc.permissions = frozenset(permissions)
    return proc.id


async def test_write_then_rollback_restores_content_and_mode(tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("before")
    note.chmod(0o640)
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:

        @kernel.register(permissions=["read", "write"])
        async def editor() -> tuple[ActionResult, ActionResult, ActionResult]:
            wrote = await kernel.submit(ActionRequest("fs.write", "note.txt", {"content": "after"}))
            assert note.read_text() == "after"
            assert wrote.record_id is not None
            undone = await kernel.rollback(wrote.record_id)
            return wrote, undone, await kernel.rollback(wrote.record_id)

        wrote, undone, again = await kernel.execute(editor)
        assert wrote.ok
        assert undone.ok, undone.error
        assert undone.output == {"path": str(note), "record_id": wrote.record_id, "restored": "restored"}
        assert note.read_text() == "before"
        assert note.stat().st_mode & 0o777 == 0o640
        outcomes = await kernel.recorder.query(event_type="action_outcome")
        assert [(r.data["action"], r.data.get("snapshot")) for r in outcomes] == [
            ("fs.write", True),
            ("fs.rollback", None),
        ]
        assert outcomes[1].data["target"] == wrote.record_id  # the rollback names the original
        decision = (await kernel.recorder.query(event_type="policy_decision"))[1]
        assert (decision.data["operation"], decision.data["resource"]) == ("write", str(note))
        assert not again.allowed
        assert again.error is not None
        assert "no snapshot" in again.error
        assert (await kernel.recorder.verify()).ok


async def test_delete_then_rollback_restores_the_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    kept = tmp_path / "d" / "kept.bin"
    kept.write_bytes(b"\x00\x01data")
    kept.chmod(0o600)
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        agent = await _agent(kernel, "cleaner", ["read", "write"])
        deleted = await kernel.submit(ActionRequest("fs.delete", "d/kept.bin", agent_id=agent))
        assert deleted.ok
        assert not kept.exists()
        assert deleted.record_id is not None
        undone = await kernel.rollback(deleted.record_id, agent_id=agent)
        assert undone.ok, undone.error
        assert kept.read_bytes() == b"\x00\x01data"
        assert kept.stat().st_mode & 0o777 == 0o600


async def test_rollback_of_a_new_file_removes_it(tmp_path: Path) -> None:
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        agent = await _agent(kernel, "maker", ["read", "write"])
        made = await kernel.submit(
            ActionRequest("fs.write", "new/made.txt", {"content": "x", "parents": True}, agent)
        )
        assert made.ok
        assert made.record_id is not None
        undone = await kernel.rollback(made.record_id, agent_id=agent)
        assert undone.ok, undone.error
        assert undone.output["restored"] == "removed"
        assert not (tmp_path / "new" / "made.txt").exists()


async def test_a_changed_file_is_not_rolled_back_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    target.write_text("v1")
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        agent = await _agent(kernel, "editor", ["read", "write"])
        wrote = await _write(kernel, agent, "shared.txt", "v2")
        assert wrote.record_id is not None
        target.write_text("v3 by someone else")
        refused = await kernel.rollback(wrote.record_id, agent_id=agent)
        assert refused.allowed
        assert not refused.ok
        assert refused.error is not None
        assert "changed after the action" in refused.error
        assert target.read_text() == "v3 by someone else"
        forced = await kernel.rollback(wrote.record_id, agent_id=agent, force=True)
        assert forced.ok, forced.error
        assert target.read_text() == "v1"


async def test_expired_and_unknown_records_are_denied(tmp_path: Path) -> None:
    clock = Clock()
    async with KernelSpace(
        "permissive", workspace=tmp_path, snapshots=SnapshotStore(ttl=60, clock=clock)
    ) as kernel:
        agent = await _agent(kernel, "editor", ["read", "write"])
        wrote = await _write(kernel, agent, "a.txt", "x")
        assert wrote.record_id is not None
        clock.now += 61
        expired = await kernel.rollback(wrote.record_id, agent_id=agent)
        assert not expired.allowed
        assert expired.error == f"the snapshot of record {wrote.record_id!r} expired (ttl 60s)"
        assert (tmp_path / "a.txt").read_text() == "x"
        unknown = await kernel.rollback("evt_nothing", agent_id=agent)
        assert not unknown.allowed
        assert unknown.error is not None
        assert unknown.error.startswith("no snapshot for record 'evt_nothing'")
        read = await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id=agent))
        assert read.record_id is not None
        not_reversible = await kernel.rollback(read.record_id, agent_id=agent)
        assert not not_reversible.allowed
        violations = await kernel.recorder.query(event_type="action_blocked")
        assert [v.data["action"] for v in violations] == ["fs.rollback"] * 3


async def test_without_write_permission_rollback_is_one_denial(tmp_path: Path) -> None:
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        writer = await _agent(kernel, "writer", ["read", "write"])
        reader = await _agent(kernel, "reader", ["read"])
        wrote = await _write(kernel, writer, "w.txt", "x")
        assert wrote.record_id is not None
        before = len(await kernel.recorder.query())
        denied = await kernel.rollback(wrote.record_id, agent_id=reader)
        assert not denied.allowed
        assert denied.error == "agent reader lacks permission for write"
        after = await kernel.recorder.query()
        assert len(after) == before + 1
        assert after[-1].event_type == "permission_denied"
        assert (tmp_path / "w.txt").read_text() == "x"


async def test_inside_agent_code_only_the_agent_that_made_the_change_rolls_it_back(tmp_path: Path) -> None:
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        writer = await _agent(kernel, "writer", ["read", "write"])
        wrote = await _write(kernel, writer, "w.txt", "x")
        assert wrote.record_id is not None
        record_id = wrote.record_id

        @kernel.register(permissions=["read", "write"])
        async def other() -> ActionResult:
            return await kernel.rollback(record_id)

        denied = await kernel.execute(other)
        assert not denied.allowed
        assert denied.error == f"agent other cannot roll back record {record_id!r}: agent writer made it"
        assert (tmp_path / "w.txt").read_text() == "x"


@pytest.mark.parametrize("on_failure", ["block", "proceed"])
async def test_a_failure_to_snapshot_blocks_or_proceeds(tmp_path: Path, on_failure: str) -> None:
    big = tmp_path / "big.txt"
    big.write_text("0123456789" * 10)
    store = SnapshotStore(max_snapshot=50, on_failure=on_failure)  # type: ignore[arg-type]
    async with KernelSpace("permissive", workspace=tmp_path, snapshots=store) as kernel:
        agent = await _agent(kernel, "editor", ["read", "write"])
        result = await _write(kernel, agent, "big.txt", "small now")
        outcome = (await kernel.recorder.query(event_type="action_outcome"))[-1]
        assert outcome.id == result.record_id
        assert outcome.data["snapshot_error"] == f"{'big.txt'!r}: larger than 50 bytes (max_snapshot)"
        if on_failure == "block":
            assert result.allowed
            assert not result.ok
            assert result.error is not None
            assert result.error.startswith("not done: no snapshot")
            assert outcome.data["status"] == "error"
            assert big.read_text() == "0123456789" * 10
        else:
            assert result.ok
            assert outcome.data["status"] == "ok"
            assert "snapshot" not in outcome.data
            assert big.read_text() == "small now"
            assert result.record_id is not None
            undo = await kernel.rollback(result.record_id, agent_id=agent)
            assert not undo.allowed
        assert len(store) == 0


async def test_a_symlink_is_replaced_not_followed_and_rolled_back_as_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(outside, work / "link")
    os.mkfifo(work / "fifo")
    async with KernelSpace("permissive", workspace=work) as kernel:
        agent = await _agent(kernel, "editor", ["read", "write"])
        result = await _write(kernel, agent, "link", "over")
        assert result.ok, result.error
        assert not (work / "link").is_symlink()
        assert outside.read_text() == "secret"
        assert result.record_id is not None
        undone = await kernel.rollback(result.record_id, agent_id=agent)
        assert undone.ok, undone.error
        assert os.readlink(work / "link") == str(outside)
        assert outside.read_text() == "secret"
        fifo = await _write(kernel, agent, "fifo", "x")
        assert not fifo.ok
        assert fifo.error is not None
        assert "not a regular file or a symlink" in fifo.error


async def test_store_bounds_drop_the_oldest_and_options_are_checked(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a" * 40)
    (tmp_path / "b").write_text("b" * 40)
    store = SnapshotStore(max_snapshot=50, max_total=60)
    async with KernelSpace("permissive", workspace=tmp_path, snapshots=store) as kernel:
        agent = await _agent(kernel, "editor", ["read", "write"])
        first = await _write(kernel, agent, "a", "1")
        second = await _write(kernel, agent, "b", "2")
        assert len(store) == 1
        assert first.record_id is not None
        assert second.record_id is not None
        assert not (await kernel.rollback(first.record_id, agent_id=agent)).allowed
        assert (await kernel.rollback(second.record_id, agent_id=agent)).ok
    with pytest.raises(KernelError):
        SnapshotStore(ttl=0)
    with pytest.raises(KernelError):
        SnapshotStore(on_failure="maybe")  # type: ignore[arg-type]


async def test_snapshots_false_keeps_nothing_and_has_no_rollback(tmp_path: Path) -> None:
    async with KernelSpace("permissive", workspace=tmp_path, snapshots=False) as kernel:
        assert kernel.snapshots is None
        agent = await _agent(kernel, "editor", ["read", "write"])
        wrote = await _write(kernel, agent, "a", "1")
        assert wrote.ok
        assert wrote.record_id is not None
        denied = await kernel.rollback(wrote.record_id, agent_id=agent)
        assert denied.error == "unknown action 'fs.rollback'"


async def test_rollback_does_not_follow_a_symlink_swapped_into_the_path(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    (work / "d" / "f.txt").write_text("old")
    outside = tmp_path / "outside"
    outside.mkdir()
    async with KernelSpace("permissive", workspace=work) as kernel:
        agent = await _agent(kernel, "editor", ["read", "write"])
        wrote = await _write(kernel, agent, "d/f.txt", "new")
        assert wrote.record_id is not None
        (work / "d" / "f.txt").rename(outside / "f.txt")  # the same content, now outside
        (work / "d").rmdir()
        os.symlink(outside, work / "d")
        undone = await kernel.rollback(wrote.record_id, agent_id=agent, force=True)
        assert not undone.ok
        target = str(work / "d" / "f.txt")
        assert undone.error == f"{target!r}: a symlink or a file where a directory is expected"
        assert (outside / "f.txt").read_text() == "new"
