"""The supervisor's own logic (agent_os.control_plane.kernel.supervisor), without a sandbox: the
reason recorded for an agent's end, exit statuses, what may be spawned, the output bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_os.control_plane import KernelError, KernelSpace
from agent_os.control_plane.kernel import supervisor
from agent_os.control_plane.kernel.supervisor import Entry, SandboxedRun, outcome_reason
from tests.support import sandboxed_agents


def test_the_reason_puts_the_kernels_observation_first_and_labels_the_sandboxs() -> None:
    reported = {"type": "PermissionError", "errno_name": "EACCES", "message": "no"}
    assert outcome_reason({"status": "failed", "reported": reported, "exit_status": 1}) == (
        "the sandbox reports PermissionError EACCES: no; exit status 1"
    )
    assert outcome_reason({"status": "killed", "exit_status": 137, "signal": "SIGKILL"}) == (
        "killed by SIGKILL; its process ended by SIGKILL"
    )
    assert outcome_reason({"status": "timeout", "timeout": 2.0}) == "ran past its timeout of 2.0s"
    assert outcome_reason({"status": "failed", "channel_error": "malformed frame"}) == (
        "broke its channel: malformed frame"
    )
    assert outcome_reason({"status": "failed", "stderr_tail": ["a", "Killed"]}) == "last output: Killed"
    assert outcome_reason({"status": "failed"}) == "ended without a result"


def test_exit_statuses_name_the_signal() -> None:
    assert supervisor._exit(None) == (None, None)
    assert supervisor._exit(0) == (0, None)
    assert supervisor._exit(1) == (1, None)
    assert supervisor._exit(137) == (137, "SIGKILL")
    assert supervisor._exit(-9) == (-9, "SIGKILL")
    assert supervisor._exit(152) == (152, "SIGXCPU")


def test_entries_are_scripts_or_module_level_async_functions(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text("async def main(agent): pass\n")
    assert Entry.of(str(script)) == Entry(script.resolve(), "main")
    assert Entry.of(f"{script}:other") == Entry(script.resolve(), "other")
    assert Entry.of(sandboxed_agents.echo) == Entry(Path(sandboxed_agents.__file__).resolve(), "echo")

    async def local(agent: object) -> None:
        return None

    for bad in (local, len, str(tmp_path / "missing.py"), f"{script}:not an entry"):
        with pytest.raises(KernelError):
            Entry.of(bad)


async def test_output_is_passed_on_at_a_bounded_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    async with KernelSpace() as kernel:
        proc = kernel.external("noisy")
        run = SandboxedRun(
            kernel, proc, Entry(Path("x.py")), (), {}, None, lambda _, line: lines.append(line)
        )
        monkeypatch.setattr(supervisor, "OUTPUT_LINES_PER_SECOND", 3)
        clock = iter([100.0] * 5 + [101.0])
        monkeypatch.setattr(supervisor, "_clock", lambda: next(clock))
        for i in range(6):
            run._line(f"line {i}".encode(), keep=True)
    assert lines == ["line 0", "line 1", "line 2", "(2 lines of output dropped)", "line 5"]
    assert list(run.tail) == [f"line {i}" for i in range(6)]


def test_the_uid_lock_directory_is_never_followed_through_planted_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link planted in /run/agent-os/sandbox-uids is never opened (nor a file it points at
    flocked or created); a lock directory others may write to is refused."""
    from agent_os.control_plane.errors import SandboxError
    from agent_os.control_plane.sandbox import bwrap

    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    target = tmp_path / "victim"
    monkeypatch.setattr(bwrap, "_LOCKS", locks)
    monkeypatch.setattr(bwrap, "UID_SLOTS", 1)
    (locks / f"{bwrap.UID_BASE}.lock").symlink_to(target)
    with pytest.raises(SandboxError, match="no free sandbox uid"):
        bwrap._UidLease()
    assert not target.exists(), "the link was not followed"
    (locks / f"{bwrap.UID_BASE}.lock").unlink()
    lease = bwrap._UidLease()
    try:
        assert lease.uid == bwrap.UID_BASE
    finally:
        lease.release()
    locks.chmod(0o777)
    with pytest.raises(SandboxError, match="writable only by it"):
        bwrap._UidLease()
