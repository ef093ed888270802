"""A control-plane service process started with ``--verify-workers``, on real NATS: its
signature checks run in worker processes, a tampered message is still refused, and the workers
end with the service."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

import pytest

from agent_os.amb import AMB, MsgpackSerializer
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.services._identity import PASSPHRASE_ENV
from tests.support import wait_until
from tests.support.closing import Closing
from tests.support.identities import PASSPHRASE, mediated
from tests.support.processes import get, start_service
from tests.support.servers import NATS_URL


def _workers_of(pid: int) -> list[int]:
    """The signature workers a process started (their parent is ``pid``)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            command = (status.parent / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if fields.get("PPid", "").strip() == str(pid) and b"agent_os.iatp.offload" in command:
            found.append(int(status.parent.name))
    return found


def _cpu_ns(pid: int) -> int:
    """The CPU time ``pid`` has had so far, in ns (the scheduler's count)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def _settled(pid: int) -> None:
    """Wait until ``pid`` has used no CPU for 0.3 s (a worker done importing)."""
    last = -1
    while (now := _cpu_ns(pid)) != last:
        last = now
        await asyncio.sleep(0.3)


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]


def _state(pid: int) -> str:
    try:
        return next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:")
        )
    except (OSError, StopIteration):
        return "Z"


@pytest.mark.nats
async def test_a_service_with_verify_workers_checks_in_them_and_refuses_forgeries(
    tmp_path: Path, closing: Closing
) -> None:
    setting = await mediated(tmp_path, "workers")
    args = setting.args(NATS_URL, "--verify-workers", "1")
    raw = closing(AMB("nats", NATS_URL, agent_id=f"raw-{setting.tag}"))
    got, dead = await setting.observe(raw)
    subject = setting.subject
    agent = setting.keys[setting.agent_id]
    codec = MsgpackSerializer()
    process: asyncio.subprocess.Process | None = None
    try:
        process, admin = await start_service(*args, env={PASSPHRASE_ENV: PASSPHRASE})
        await wait_until(lambda: len(_workers_of(process.pid)) == 1, timeout=20, what="the worker")
        workers = _workers_of(process.pid)
        await _settled(workers[0])  # its start read what it imports
        before = _cpu_ns(workers[0])
        for i in range(200):
            signed = await agent.sign(setting.agent_id, {"transfer": i}, topic=subject)
            if i % 20 == 7:  # the amount changed after signing
                signed = dataclasses.replace(signed, payload={"transfer": i + 1_000_000})
            await raw.broker.publish(subject, codec.encode(signed))
        await got.wait_for(190, timeout=30)
        await dead.wait_for(10, timeout=30)
        assert sorted(m["transfer"] for m in got.messages) == [i for i in range(200) if i % 20 != 7]
        assert {m.headers[DLQ_REASON] for m in dead.metadata} == {"bad_signature"}
        # Checks went to the worker (an idle one uses none): 40 ed25519 checks take over 1 ms.
        assert _cpu_ns(workers[0]) - before > 40 * 25_000
        _, metrics = await get(admin + "/metrics")
        assert "agentos_control_plane_unverified_total 10.0" in metrics
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        await wait_until(lambda: not _running(workers), timeout=10, what="the worker ended")
    finally:
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 20)
        await raw.close()
