"""Background tasks over real NATS with worker processes (tests/support/task_worker.py): a
thousand tasks with one of three workers SIGKILLed half way, cancel of a running and of a
pending task, and bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import AMB
from agent_os.amb.errors import ConfigError
from agent_os.control_plane import (
    FlightRecorder,
    KernelSpace,
    Policy,
    TaskInputError,
    TaskManager,
    TaskNotFound,
    TaskState,
    TaskTimeout,
    UnknownHandler,
)
from tests.support.cleanup import delete_nats_streams
from tests.support.servers import NATS_URL
from tests.support.task_worker import ACK_WAIT

pytestmark = pytest.mark.nats


@dataclass
class Workers:
    """Worker processes of one test; each has its own recorder file."""

    prefix: str
    tmp: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start(self, n: int = 1) -> list[asyncio.subprocess.Process]:
        started = []
        for _ in range(n):
            path = self.tmp / f"worker-{len(self.procs)}.db"
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.task_worker",
                NATS_URL,
                "q",
                self.prefix,
                str(path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            self.procs.append(proc)
            assert proc.stdout is not None
            assert proc.stderr is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if not line.startswith("ready "):
                pytest.fail(f"the worker did not start: {line!r} {(await proc.stderr.read()).decode()}")
            started.append(proc)
        return started

    def recorder_of(self, proc: asyncio.subprocess.Process) -> Path:
        return self.tmp / f"worker-{self.procs.index(proc)}.db"

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


@pytest.fixture
async def workers(tmp_path: Path, prefix: str) -> AsyncIterator[Workers]:
    pool = Workers(prefix, tmp_path)
    try:
        yield pool
    finally:
        await pool.stop()
        await delete_nats_streams(prefix)


@pytest.fixture
async def manager(prefix: str) -> AsyncIterator[TaskManager]:
    kernel = KernelSpace(policy=Policy.builtin("permissive"), flight_recorder=FlightRecorder("memory"))
    # The first of manager and workers creates the durable consumer: the same ack_wait for both.
    client = AMB("nats", NATS_URL, agent_id=f"manager-{prefix}", broker_options={"ack_wait": ACK_WAIT})
    tasks = TaskManager(
        kernel, client, queue="q", subject_prefix=prefix, handlers=["square", "sleep", "fail"]
    )
    try:
        await tasks.start()
        yield tasks
    finally:
        await tasks.close()
        await client.close()
        await kernel.close()


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def consumer_settled(manager: TaskManager, timeout: float = 20.0) -> None:
    """Wait until the workers' durable consumer has every task acked and none pending."""
    jsm = manager.client.broker.connection.jsm()  # type: ignore[attr-defined]
    stream = await jsm.find_stream_name_by_subject(manager.subjects.run)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await jsm.consumer_info(stream, manager.subjects.durable)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the consumer did not settle: {info}")
        await asyncio.sleep(0.05)


async def test_a_thousand_tasks_complete_once_with_a_worker_killed_half_way(
    manager: TaskManager, workers: Workers
) -> None:
    procs = await workers.start(3)
    numbers = {await manager.dispatch("square", {"n": n}): n for n in range(1000)}
    ledger = manager.ledger
    await until(lambda: sum(ledger.completed.values()) >= 500)
    victim = procs[0]
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    done = await asyncio.gather(*(manager.wait(task_id, timeout=40) for task_id in numbers))

    for status in done:
        n = numbers[status.id]
        assert status.state is TaskState.SUCCEEDED, status
        assert {k: status.result[k] for k in ("n", "square")} == {"n": n, "square": n * n}
    # Exactly once from the caller's view: one completion and one record per task.
    assert ledger.completed == {("succeeded",): 1000}
    records = await manager.kernel.recorder.query(event_type="task_succeeded", limit=5000)
    assert sorted(r.data["task_id"] for r in records) == sorted(numbers)
    # The victim held tasks it had not finished: they came back and ran elsewhere.
    redelivered = [s for s in done if s.attempt > 1]
    assert redelivered
    assert all(s.result["pid"] != victim.pid for s in redelivered)


async def test_cancel_kills_the_running_task_agent_and_it_is_not_delivered_again(
    manager: TaskManager, workers: Workers
) -> None:
    (proc,) = await workers.start(1)
    task_id = await manager.dispatch("sleep", {"seconds": 60})
    await until(lambda: manager.status(task_id).state is TaskState.RUNNING)
    agent_id = manager.status(task_id).agent_id
    assert agent_id is not None

    assert await manager.cancel(task_id) is True
    status = await manager.wait(task_id, timeout=5)
    assert status.state is TaskState.CANCELLED
    assert await manager.cancel(task_id) is False  # complete already
    (record,) = await manager.kernel.recorder.query(event_type="task_cancelled")
    assert record.data["task_id"] == task_id
    assert record.data["killed"] is True
    # Settled, not delivered again: nothing is waiting for an ack, nothing is pending.
    await consumer_settled(manager)
    assert manager.ledger.completed == {("cancelled",): 1}
    assert manager.ledger.ignored == {}  # the worker's confirmation is not a second result

    await workers.stop()  # the worker closes its recorder: read what its kernel recorded
    worker_records = FlightRecorder("sqlite", str(workers.recorder_of(proc)))
    try:
        killed = await worker_records.query(event_type="agent_killed", agent_id=agent_id)
        signals = await worker_records.query(event_type="signal", agent_id=agent_id)
    finally:
        await worker_records.close()
    assert len(killed) == 1
    assert [(r.data["signal"], r.data["outcome"]) for r in signals] == [("SIGKILL", "delivered")]


async def test_a_task_cancelled_while_pending_never_runs(manager: TaskManager, workers: Workers) -> None:
    pending = await manager.dispatch("square", {"n": 7})  # no worker yet
    assert await manager.cancel(pending) is True
    assert manager.status(pending).state is TaskState.CANCELLED
    await workers.start(1)
    later = await manager.dispatch("square", {"n": 8})
    assert (await manager.wait(later, timeout=20)).result["square"] == 64
    await until(lambda: manager.refused_claims == 1)  # the worker asked, and was told no
    status = manager.status(pending)
    assert (status.state, status.worker, status.attempt) == (TaskState.CANCELLED, None, 0)
    assert manager.ledger.ignored == {}


async def test_failures_and_bad_input_get_their_own_answers(
    manager: TaskManager, workers: Workers, prefix: str
) -> None:
    await workers.start(1)
    failed = await manager.wait(await manager.dispatch("fail", "x"), timeout=20)
    assert failed.state is TaskState.FAILED
    assert failed.error is not None
    assert "ValueError: failing on purpose" in failed.error

    with pytest.raises(UnknownHandler):
        await manager.dispatch("no_such_handler", 1)
    with pytest.raises(UnknownHandler):
        await manager.dispatch("bad name!", 1)
    with pytest.raises(TaskInputError):
        await manager.dispatch("square", {"n": object()})
    assert len(manager.list()) == 1  # refused dispatches leave nothing behind
    with pytest.raises(TaskNotFound):
        manager.status("nope")
    with pytest.raises(TaskNotFound):
        await manager.wait("nope", timeout=1)
    slow = await manager.dispatch("sleep", {"seconds": 30})
    with pytest.raises(TaskTimeout):
        await manager.wait(slow, timeout=0.2)
    assert await manager.cancel(slow) is True

    # Malformed messages on the work queue and a task naming a handler no worker has are
    # dead-lettered with their reason; the worker goes on.
    dead: list[Any] = []
    seen = asyncio.Event()
    probe = AMB("nats", NATS_URL, agent_id=f"probe-{prefix}", broker_options={"ack_wait": ACK_WAIT})
    try:
        other = TaskManager(manager.kernel, probe, queue="q", subject_prefix=prefix)  # checks no names

        async def on_dead(message: Any, metadata: Any) -> None:
            dead.append(metadata.headers.get("dlq-reason"))
            if len(dead) == 3:
                seen.set()

        await probe.subscribe(f"_DLQ.{prefix}.q.run", on_dead)
        run = manager.subjects.run
        await probe.publish(run, "not a task")
        await probe.publish(run, {"id": "a b", "handler": "square", "input": 1})
        unknown = await other.dispatch("ghost", None)
        await asyncio.wait_for(seen.wait(), 20)
        assert sorted(dead) == ["malformed_task", "malformed_task", "unknown_handler"]
        # The worker answered the unknown handler with a failure, which its manager saw.
        await until(lambda: other.ledger.completed.get(("failed",), 0) == 1)
        assert "no handler 'ghost'" in str(other.status(unknown).error)
        ok = await manager.wait(await manager.dispatch("square", {"n": 3}), timeout=20)
        assert ok.result["square"] == 9
    finally:
        await probe.close()  # (other's subscriptions are probe's)


async def test_a_broker_without_durable_queues_is_refused() -> None:
    kernel = KernelSpace(policy=Policy.builtin("permissive"))
    client = AMB("memory", f"memory://tasks-{os.getpid()}")
    try:
        with pytest.raises(ConfigError, match="durable"):
            TaskManager(kernel, client)
    finally:
        await client.close()
        await kernel.close()


# -- an impostor on the bus ---------------------------------------------------------------------


@pytest.fixture
async def impostor(prefix: str) -> AsyncIterator[AMB]:
    """A client of someone else on the same bus, who sees the task subjects."""
    client = AMB("nats", NATS_URL, agent_id=f"impostor-{prefix}")
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


async def test_a_status_from_anyone_but_the_claimant_never_completes_a_task(
    manager: TaskManager, workers: Workers, impostor: AMB
) -> None:
    subjects = manager.subjects
    task_id = await manager.dispatch("square", {"n": 3})  # no worker yet: pending
    forged = {"id": task_id, "state": "succeeded", "attempt": 1, "worker": "w", "agent_id": None}
    await impostor.publish(subjects.status, {**forged, "result": {"square": 10}})
    await impostor.publish(subjects.status, {**forged, "state": "running", "agent_id": "victim"})
    await until(lambda: manager.ledger.ignored.get(("not_claimant",), 0) == 2)
    assert manager.status(task_id).state is TaskState.PENDING
    assert manager.status(task_id).agent_id is None
    await workers.start(1)
    status = await manager.wait(task_id, timeout=20)
    assert status.state is TaskState.SUCCEEDED
    assert status.result["square"] == 9, "the real worker's result, not the forged one"
    # the task is complete: a forged result after the end changes nothing either
    await impostor.publish(subjects.status, {**forged, "result": {"square": 10}})
    await until(lambda: manager.ledger.ignored.get(("not_claimant",), 0) == 3)
    assert manager.status(task_id).result["square"] == 9
    assert manager.ledger.completed == {("succeeded",): 1}


async def test_a_claim_answered_by_an_impostor_is_not_taken(
    manager: TaskManager, workers: Workers, impostor: AMB
) -> None:
    """Only the manager that dispatched a task answers its claim: an impostor saying "do not
    run" does not stop it (here the manager no longer answers: the task runs unclaimed)."""
    statuses: list[dict[str, Any]] = []

    async def refuse(message: Any, metadata: Any) -> None:
        await impostor.reply(metadata, {"run": False})

    async def watch(message: Any, metadata: Any) -> None:
        statuses.append(message)

    await impostor.subscribe(manager.subjects.claim, refuse)
    await impostor.subscribe(manager.subjects.status, watch)
    task_id = await manager.dispatch("square", {"n": 5})
    await manager.close()  # the dispatcher stops answering claims: only the impostor does
    await workers.start(1)
    await until(lambda: any(s["id"] == task_id and s["state"] == "succeeded" for s in statuses))
    [done] = [s for s in statuses if s["state"] == "succeeded"]
    assert done["result"]["square"] == 25
