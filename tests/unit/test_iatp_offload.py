"""Signature checks in worker processes (``verify_workers``): the answers are the inline
check's, a worker's answer vouches only for the bytes it checked, and a worker that dies, hangs
or breaks the protocol costs an inline check, never an unchecked message."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import gc
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import (
    AMB,
    CapabilityNotSupported,
    LifecycleState,
    Metadata,
    Middleware,
    MsgpackSerializer,
    Subscription,
)
from agent_os.iatp import IATP, IATPConfigError, IATPMiddleware, _crypto, offload
from agent_os.iatp.offload import VerifyWorkers, WorkerLost, _Worker
from tests.support import Collector, memory_url, wait_until


def _signed(n: int, seed: int = 7) -> list[tuple[bytes, bytes, bytes, bool]]:
    """``n`` checks, the first sound and about half of the rest spoiled (another key, a
    flipped bit in the message or the signature), with the answer the inline check gives."""
    rng = random.Random(seed)
    keys = [_crypto.keypair_from_seed(rng.randbytes(32)) for _ in range(3)]
    checks = []
    for i in range(n):
        public, secret = keys[i % 3]
        message = rng.randbytes(rng.randrange(0, 600))
        signature = _crypto.sign(secret, message)
        spoil = rng.randrange(6) if i else 5  # the first one is sound
        if spoil == 0:
            public = keys[(i + 1) % 3][0]
        elif spoil == 1 and message:
            at = rng.randrange(len(message))
            message = message[:at] + bytes([message[at] ^ 1]) + message[at + 1 :]
        elif spoil == 2:
            signature = bytes([signature[0] ^ 0x80]) + signature[1:]
        checks.append((public, message, signature, _crypto.verify(public, message, signature)))
    assert n < 10 or {good for *_, good in checks} == {True, False}
    return checks


def _idle_process() -> subprocess.Popen[bytes]:
    """A process standing in for a worker that a test answers for itself."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _block_until_answered(sock: socket.socket, past: float) -> None:
    """Hold the event loop (a handler that blocks) until an answer waits on ``sock``, then
    ``past`` seconds more."""
    select.select([sock], [], [], 30)
    time.sleep(past)


def _exit_code(pid: int) -> int:
    """Wait for a forked child and return its exit code."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
async def workers() -> AsyncIterator[VerifyWorkers]:
    pool = VerifyWorkers(1, restart_after=0.0)
    try:
        yield pool
    finally:
        pool.close()


async def _answers(pool: VerifyWorkers, checks: list[tuple[bytes, bytes, bytes, bool]]) -> list[bool | None]:
    futures = [pool.check(public, message, signature) for public, message, signature, _ in checks]
    assert all(future is not None for future in futures)
    return [await future for future in futures if future is not None]


async def test_workers_answer_what_the_inline_check_answers(workers: VerifyWorkers) -> None:
    checks = _signed(300)
    found: list[bool | None] = []
    for start in range(0, len(checks), 50):  # within the pool's fill (16 x 4)
        found += await _answers(workers, checks[start : start + 50])
    assert found == [good for *_, good in checks]
    assert workers.checks == 300
    assert workers.lost == 0
    assert workers.batches < 300


async def test_two_workers_share_the_checks() -> None:
    pool = VerifyWorkers(2)
    try:
        checks = _signed(60, seed=3)
        assert await _answers(pool, checks) == [good for *_, good in checks]
        assert pool.running == 2
        assert pool.started == 2
    finally:
        pool.close()


async def test_checks_go_in_batches_and_a_full_worker_takes_no_more() -> None:
    pool = VerifyWorkers(1, max_batch=2, max_frames=1)
    try:
        public, message, signature, _ = _signed(1)[0]
        first = pool.check(public, message, signature)
        assert first is not None
        assert pool.batches == 0  # queued until the loop has run what is ready
        second = pool.check(public, message, signature)  # a batch full: sent at once
        assert second is not None
        assert pool.batches == 1
        assert pool.check(public, message, signature) is None  # 2 x 1 held: checked inline
        assert await first is True
        assert await second is True
    finally:
        pool.close()


async def test_a_check_not_sent_or_alone_is_taken_back_not_waited_for() -> None:
    pool = VerifyWorkers(1)
    try:
        public, message, signature, _ = _signed(1)[0]
        queued = pool.check(public, message, signature)
        assert queued is not None
        assert await pool.answer(queued) is None  # not sent yet: taken back, checked inline
        assert queued.cancelled()
        assert pool.batches == 0
        alone = pool.check(public, message, signature)
        assert alone is not None
        await wait_until(lambda: pool.batches == 1, what="the batch sent")
        assert await pool.answer(alone) is None  # its worker's only check: not waited for
        assert pool.withdrawn == 2
    finally:
        pool.close()


async def test_a_queued_check_with_others_is_sent_and_waited_for() -> None:
    pool = VerifyWorkers(1)
    try:
        checks = _signed(3, seed=5)
        futures = [pool.check(p, m, s) for p, m, s, _ in checks]
        assert pool.batches == 0
        found = [await pool.answer(future) for future in futures if future is not None]
        assert found == [good for *_, good in checks]
        assert pool.batches == 1  # all three went together, sent by the first answer asked
        assert pool.withdrawn == 0
    finally:
        pool.close()


async def test_a_killed_worker_fails_its_checks_and_is_replaced(workers: VerifyWorkers) -> None:
    checks = _signed(40, seed=11)
    workers.start()
    pid = workers._workers[0].process.pid
    os.kill(pid, signal.SIGSTOP)  # holds its checks while it is killed
    futures = [workers.check(p, m, s) for p, m, s, _ in checks]
    os.kill(pid, signal.SIGKILL)
    for future in futures:
        assert future is not None
        assert await workers.answer(future) is None  # check inline
        assert isinstance(future.exception(), WorkerLost)
    assert workers.lost == 40
    assert workers.running == 0
    assert await _answers(workers, checks) == [good for *_, good in checks]  # a new worker
    assert workers.started == 2
    assert workers._workers[0].process.pid != pid


async def test_a_worker_that_does_not_answer_is_killed_after_the_timeout() -> None:
    pool = VerifyWorkers(1, max_batch=1, answer_timeout=0.2)
    try:
        public, message, signature, _ = _signed(1)[0]
        pool.start()
        process = pool._workers[0].process
        os.kill(process.pid, signal.SIGSTOP)
        future = pool.check(public, message, signature)
        behind = pool.check(public, message, signature)
        assert future is not None
        assert behind is not None
        started = time.monotonic()
        assert await pool.answer(future) is None
        assert time.monotonic() - started >= 0.2  # waited, as it was not alone
        assert isinstance(behind.exception(), WorkerLost)
        assert process.poll() is not None  # killed and reaped
        assert pool.lost == 2
        assert pool.running == 0
    finally:
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        struct.pack("<II", 1, 1) + b"\x01",  # another batch's sequence number
        struct.pack("<II", 0, 0),  # no answers to a batch of one
        struct.pack("<II", 0, 1) + b"\x07",  # neither 0 nor 1
        struct.pack("<II", 0, 5) + b"\x01" * 5,  # five answers to a batch of one
    ],
)
async def test_an_answer_out_of_protocol_drops_the_worker(answer: bytes) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    process = _idle_process()
    pool = VerifyWorkers(1)
    try:
        pool._loop = asyncio.get_running_loop()
        worker = _Worker(process, ours)
        pool._workers.append(worker)
        pool._loop.add_reader(ours.fileno(), pool._on_readable, worker)
        public, message, signature, _ = _signed(1)[0]
        future = pool.check(public, message, signature)
        assert future is not None
        await wait_until(lambda: pool.batches == 1, what="the batch sent")
        theirs.sendall(answer)
        await wait_until(future.done, what="the worker dropped")
        assert isinstance(future.exception(), WorkerLost)
        assert pool.running == 0
        assert process.poll() is not None
    finally:
        theirs.close()
        pool.close()
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_close_ends_the_workers_and_fails_what_they_held(workers: VerifyWorkers) -> None:
    public, message, signature, _ = _signed(1)[0]
    workers.start()
    process = workers._workers[0].process
    os.kill(process.pid, signal.SIGSTOP)
    future = workers.check(public, message, signature)
    workers.close()
    workers.close()
    assert future is not None
    assert isinstance(future.exception(), WorkerLost)
    assert process.poll() is not None
    assert workers.check(public, message, signature) is None  # closed: inline from now on
    assert workers.start() is False


async def test_stop_ends_the_workers_until_the_next_start(workers: VerifyWorkers) -> None:
    public, message, signature, _ = _signed(1)[0]
    workers.restart_after = 30.0  # a stop is no failure: no wait before starting again
    workers.start()
    process = workers._workers[0].process
    os.kill(process.pid, signal.SIGSTOP)
    held = workers.check(public, message, signature)
    workers.stop()
    assert held is not None
    assert isinstance(held.exception(), WorkerLost)  # checked inline by its caller
    assert process.poll() is not None
    assert workers.running == 0
    again = workers.check(public, message, signature)  # starts them again at once
    assert again is not None
    assert workers.running == 1
    assert workers.started == 2
    assert await again is True


async def test_a_worker_that_cannot_start_means_inline_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "")
    public, message, signature, _ = _signed(1)[0]
    pool = VerifyWorkers(1, restart_after=30.0)
    try:
        assert pool.check(public, message, signature) is None
        assert pool.started == 0
        assert pool.start() is False  # waits before trying again
    finally:
        pool.close()


@pytest.mark.parametrize("option", ["n", "max_batch", "max_frames", "answer_timeout"])
@pytest.mark.parametrize("bad", [0, -1, True, "2", float("nan")])
def test_options_are_checked(option: str, bad: object) -> None:
    with pytest.raises(IATPConfigError):
        VerifyWorkers(**{option: bad})  # type: ignore[arg-type]


def test_the_workers_linger_is_a_number_of_seconds() -> None:
    middleware = IATPMiddleware(IATP(), verify_workers=1)
    assert middleware.workers_linger == 2.0
    middleware.workers_linger = 0
    assert middleware.workers_linger == 0.0
    for bad in (-1, float("nan"), float("inf"), True, "2", None):
        with pytest.raises(IATPConfigError, match="workers_linger"):
            middleware.workers_linger = bad  # type: ignore[assignment]
    assert middleware.workers_linger == 0.0
    middleware.close()


def test_the_middleware_checks_verify_workers() -> None:
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(IATPConfigError, match="verify_workers"):
            IATPMiddleware(IATP(), verify_workers=bad)  # type: ignore[arg-type]
    with pytest.raises(IATPConfigError, match="lookahead"):
        IATPMiddleware(IATP(), verify_workers=1, lookahead=0)  # nothing would be sent ahead
    assert IATPMiddleware(IATP()).workers is None
    for bad in (-1, True, "2"):
        with pytest.raises(IATPConfigError, match="verify_workers"):
            IATP(verify_workers=bad)  # type: ignore[arg-type]


async def test_workers_start_only_for_subscriptions_that_look_ahead() -> None:
    middleware = IATPMiddleware(IATP(), verify_workers=1, lookahead=8)
    client = AMB("memory", memory_url("offload"), middleware=[middleware])
    try:
        many = await client.subscribe("a.b", Collector(), concurrency=8)  # 8 at once: no look-ahead
        assert many.lookahead == 0
        assert middleware.workers is not None
        assert middleware.workers.started == 0
        one = await client.subscribe("a.c", Collector())
        assert one.lookahead == 8
        assert middleware.workers.started == 1
    finally:
        middleware.close()
        await client.close()


async def _pooled(linger: float, **options: Any) -> tuple[IATPMiddleware, VerifyWorkers]:
    """A middleware with one signature worker for an IATP where "pub" signs, whose workers
    outlive their last subscription by ``linger`` seconds, and its pool."""
    iatp = IATP()
    await iatp.register_agent("pub")
    middleware = iatp.middleware(verify_workers=1, **options)
    middleware.workers_linger = linger
    assert middleware.workers is not None
    return middleware, middleware.workers


async def test_workers_stop_with_the_last_subscription_and_start_with_the_next() -> None:
    middleware, workers = await _pooled(0.0)
    where = memory_url("offload")
    first, second = Collector(), Collector()
    sender = AMB("memory", where, agent_id="pub", middleware=[middleware])
    client = AMB("memory", where, agent_id="sub", middleware=[middleware])
    other = AMB("memory", where, agent_id="sub2", middleware=[middleware])
    again = AMB("memory", where, agent_id="sub3", middleware=[middleware])
    try:
        await client.subscribe("pay.x", first)
        sub = await other.subscribe("pay.y", second)
        process = workers._workers[0].process
        await sub.unsubscribe()  # another subscription still sends checks: they run on
        assert workers.running == 1
        for i in range(40):
            await sender.publish("pay.x", {"i": i})
        await first.wait_for(40)
        assert workers.checks > 0
        await client.close()  # the last one: they stop
        await wait_until(lambda: workers.running == 0, what="the workers stopped")
        assert process.wait(timeout=5) is not None
        assert sum(middleware.rejected.values()) == 0

        later = Collector()
        await again.subscribe("pay.z", later)  # a new client's subscription
        assert workers.running == 1  # started with it, no wait
        before = workers.checks
        for i in range(40):
            await sender.publish("pay.z", {"i": i})
        await later.wait_for(40)
        assert later.messages == [{"i": i} for i in range(40)]
        assert workers.checks > before
        await again.close()
        await wait_until(lambda: workers.running == 0, what="the workers stopped again")
    finally:
        middleware.close()
        await sender.close()
        await client.close()
        await other.close()
        await again.close()


async def test_a_client_back_within_the_linger_finds_the_workers_running() -> None:
    middleware, workers = await _pooled(30.0)
    where = memory_url("offload")
    got = Collector()
    sender = AMB("memory", where, agent_id="pub", middleware=[middleware])
    try:
        for round_ in range(5):  # a client per round, as for one request each
            client = AMB("memory", where, agent_id="sub", middleware=[middleware])
            try:
                await client.subscribe("pay.x", got)
                await sender.publish("pay.x", {"round": round_})
                await got.wait_for(round_ + 1)
            finally:
                await client.close()
            assert workers.running == 1  # lingering, not stopped
        assert workers.started == 1
        assert sum(middleware.rejected.values()) == 0
    finally:
        middleware.close()
        await sender.close()
    assert workers.running == 0


async def test_workers_used_through_another_layers_look_ahead_are_kept() -> None:
    # IATP's own look-ahead (4) is below the subscription's concurrency (8), but another layer
    # asks the bus to look ahead: prepare() sends the checks to the workers all the same, so
    # another client's subscriptions coming and going must not stop them.
    class Ahead(Middleware):
        def lookahead(self, subscription: Subscription) -> int:
            return 64

    middleware, workers = await _pooled(0.0, lookahead=4)
    where = memory_url("offload")
    got = Collector()
    sender = AMB("memory", where, agent_id="pub", middleware=[middleware])
    receiver = AMB("memory", where, agent_id="sub", middleware=[middleware, Ahead()])
    churn = AMB("memory", where, agent_id="churn", middleware=[middleware])
    try:
        await receiver.subscribe("pay.x", got, concurrency=8)
        for i in range(300):
            await sender.publish("pay.x", {"i": i})
            if i % 30 == 0:
                passing = await churn.subscribe("tmp.y", Collector())
                await passing.unsubscribe()
                await asyncio.sleep(0)  # a stop would run here
        await got.wait_for(300)
        assert workers.lost == 0
        assert workers.started == 1
        assert workers.checks > 0
    finally:
        middleware.close()
        await sender.close()
        await receiver.close()
        await churn.close()


async def test_workers_stop_after_a_failed_subscribe_or_an_interrupted_close() -> None:
    middleware, workers = await _pooled(0.0)
    where = memory_url("offload")
    release = asyncio.Event()
    busy = asyncio.Event()

    async def slow(message: object, metadata: Metadata) -> None:
        busy.set()
        await release.wait()

    sender = AMB("memory", where, agent_id="pub", middleware=[middleware])
    client = AMB("memory", where, agent_id="sub", middleware=[middleware])
    try:
        with pytest.raises(CapabilityNotSupported):  # the memory broker has no durables
            await client.subscribe("pay.x", Collector(), durable="d")
        await wait_until(lambda: workers.running == 0, what="no workers for a subscription never made")
        await client.subscribe("pay.x", slow)
        assert workers.running == 1
        await sender.publish("pay.x", {"i": 1})
        await busy.wait()
        closing_task = asyncio.create_task(client.close(timeout=30))
        await wait_until(lambda: client.state is LifecycleState.CLOSING, what="the close under way")
        closing_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing_task
        await wait_until(lambda: workers.running == 0, what="the workers stopped after the close")
    finally:
        release.set()
        middleware.close()
        await sender.close()
        await client.close()


async def test_a_shared_claim_subscription_starts_no_workers() -> None:
    class Store:  # claims every nonce once, in this process
        def __init__(self) -> None:
            self.seen: set[tuple[str, bytes]] = set()

        async def claim(self, scope: str, nonce: bytes, ttl_ms: int) -> bool:
            first = (scope, nonce) not in self.seen
            self.seen.add((scope, nonce))
            return first

    iatp = IATP()
    await iatp.register_agent("pub")
    store = Store()
    middleware = iatp.middleware(verify_workers=1, nonce_store=store)
    assert middleware.workers is not None
    where = memory_url("offload")
    sender = AMB("memory", where, agent_id="pub", middleware=[middleware])
    client = AMB("memory", where, agent_id="sub", middleware=[middleware])
    try:
        got = Collector()
        grouped = await client.subscribe("pay.x", got, queue="workers")
        assert grouped.lookahead == 64  # its own look-ahead, verifying inline
        assert middleware.workers.started == 0
        for i in range(20):
            await sender.publish("pay.x", {"i": i})
        await got.wait_for(20)
        assert len(store.seen) == 20
        assert middleware.workers.started == 0
    finally:
        middleware.close()
        await sender.close()
        await client.close()


async def test_a_forked_child_lets_go_of_the_workers_without_harming_the_parent() -> None:
    pool = VerifyWorkers(1, max_batch=2)
    try:
        checks = _signed(4, seed=17)
        first = [pool.check(p, m, s) for p, m, s, _ in checks[:2]]  # a full batch: sent at once
        await wait_until(lambda: pool.checks == 2, timeout=10, what="the first answers")
        pid = os.fork()
        if pid == 0:  # the child: what it does must not touch the parent's workers
            code = 0 if pool.running == 0 else 3
            pool.close()
            os._exit(code)
        assert _exit_code(pid) == 0
        rest = [pool.check(p, m, s) for p, m, s, _ in checks[2:]]
        found = [await pool.answer(f) for f in first + rest if f is not None]
        assert found == [good for *_, good in checks]
        assert pool.lost == 0
        assert pool.started == 1
    finally:
        pool.close()


def test_workers_serve_the_event_loop_that_started_them_while_it_is_open() -> None:
    pool = VerifyWorkers(1)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    checks = _signed(30, seed=19)
    public, message, signature, _ = checks[0]

    async def elsewhere() -> asyncio.Future[bool] | None:
        return pool.check(public, message, signature)

    try:
        assert first.run_until_complete(_answers(pool, checks)) == [good for *_, good in checks]
        assert second.run_until_complete(elsewhere()) is None  # another loop: checked inline
        started = time.monotonic()
        assert first.run_until_complete(_answers(pool, checks)) == [good for *_, good in checks]
        assert time.monotonic() - started < 1.5  # no wait for a timeout
        first.close()
        assert second.run_until_complete(_answers(pool, checks)) == [good for *_, good in checks]
        assert pool.started == 2  # the second loop took over once the first was closed
        assert pool.lost == 0
    finally:
        pool.close()
        first.close()
        second.close()


async def test_a_full_worker_whose_answers_wait_unread_is_not_taken_for_silent() -> None:
    pool = VerifyWorkers(1, max_batch=1, max_frames=1, answer_timeout=0.2)
    try:
        public, message, signature, good = _signed(1)[0]
        first = pool.check(public, message, signature)  # a full batch: sent at once
        assert first is not None
        _block_until_answered(pool._workers[0].sock, past=0.3)  # the loop busy, the answer unread
        second = pool.check(public, message, signature)  # the worker was full: its answer is read
        assert second is not None
        assert await first is good
        assert await second is good
        assert pool.lost == 0
        assert pool.started == 1
    finally:
        pool.close()


def _plant(root: Path, marker: Path) -> None:
    """An ``agent_os`` under ``root`` whose import leaves ``marker`` and whose worker would
    answer anything, and a ``json`` standing in for the standard one."""
    (root / "agent_os" / "iatp").mkdir(parents=True)
    (root / "agent_os" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (root / "agent_os" / "iatp" / "__init__.py").write_text("")
    (root / "agent_os" / "iatp" / "offload.py").write_text("def main(args):\n    return 0\n")
    (root / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError\n")


@pytest.mark.parametrize("where", ["working directory", "PYTHONPATH"])
async def test_a_worker_runs_the_parents_package_not_one_planted(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    _plant(tmp_path, marker)
    if where == "PYTHONPATH":
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the parent was started before: not its path
    else:
        monkeypatch.chdir(tmp_path)
    pool = VerifyWorkers(1)
    try:
        checks = _signed(20, seed=29)
        assert await _answers(pool, checks) == [good for *_, good in checks]
        assert not marker.exists()
    finally:
        pool.close()


def test_a_worker_that_would_run_another_module_exits_before_answering(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    _plant(tmp_path, marker)
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            offload._BOOTSTRAP,
            json.dumps([str(tmp_path), *sys.path]),
            offload.__file__,
            "3",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert b"not the parent's agent_os" in done.stderr


async def test_a_pool_dropped_without_close_ends_its_workers() -> None:
    process: subprocess.Popen[bytes] | None = None
    try:
        pool = VerifyWorkers(1)  # left unclosed on purpose
        pool.start()
        process = pool._workers[0].process
        del pool
        gc.collect()
        assert process.poll() is not None  # killed and reaped when the pool was collected
    finally:
        if process is not None and process.poll() is None:  # the test failed: not left behind
            process.kill()
            process.wait()


def test_close_after_the_event_loop_closed_ends_every_worker() -> None:
    pool = VerifyWorkers(2)
    loop = asyncio.new_event_loop()
    checks = _signed(4, seed=23)

    async def leave_waiting() -> list[asyncio.Task[bool | None]]:
        pool.start()
        for worker in pool._workers:
            os.kill(worker.process.pid, signal.SIGSTOP)
        futures = [pool.check(p, m, s) for p, m, s, _ in checks]
        waiting = [asyncio.ensure_future(pool.answer(f)) for f in futures if f is not None]
        await asyncio.sleep(0.05)  # each waits on its check, which has a callback now
        return waiting

    try:
        waiting = loop.run_until_complete(leave_waiting())
        assert not any(task.done() for task in waiting)
    finally:
        loop.close()  # with the waits pending
    processes = [worker.process for worker in pool._workers]
    pool.close()
    assert pool.running == 0
    assert all(process.poll() is not None for process in processes)


# -- the verifier takes a check done elsewhere only for the very bytes checked ------------------


async def test_the_verifier_uses_a_check_only_for_the_bytes_it_covered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    iatp = IATP()
    await iatp.register_agent("alice")
    verifier = iatp.verifier
    calls: list[int] = []
    real = _crypto.verify

    def counted(public: bytes, message: bytes, signature: bytes) -> bool:
        calls.append(1)
        return real(public, message, signature)

    monkeypatch.setattr(_crypto, "verify", counted)
    genuine = await iatp.sign("alice", {"amount": 1}, topic="pay.x")
    parts = verifier.signed_parts(genuine)
    assert parts is not None
    assert verifier.verify(genuine, scope="a", checked=(*parts, True)).valid
    assert calls == []  # the worker's check stood in for the inline one
    assert verifier.checks_taken == 1
    # the payload changed after the check: its answer covers other bytes, so the check runs
    forged = copy.copy(genuine)
    forged.payload = {"amount": 1_000}
    result = verifier.verify(forged, scope="b", checked=(*parts, True))
    assert (result.valid, result.reason, calls) == (False, "bad_signature", [1])
    assert verifier.checks_taken == 1  # not taken
    # a check of the right bytes that said no is a bad signature, without checking again
    another = await iatp.sign("alice", {"amount": 2}, topic="pay.x")
    other_parts = verifier.signed_parts(another)
    assert other_parts is not None
    result = verifier.verify(another, scope="c", checked=(*other_parts, False))
    assert (result.valid, result.reason, calls) == (False, "bad_signature", [1])
    # an answer that is not a bool is no answer
    result = verifier.verify(another, scope="d", checked=(*other_parts, 1))  # type: ignore[arg-type]
    assert result.valid
    assert calls == [1, 1]


async def test_signed_parts_is_none_for_what_has_no_key_here() -> None:
    iatp, stranger = IATP(), IATP()
    await iatp.register_agent("alice")
    await stranger.register_agent("mallory")
    verifier = iatp.verifier
    assert verifier.signed_parts(await stranger.sign("mallory", {}, topic="t")) is None
    claimed = await stranger.sign("mallory", {}, topic="t")
    claimed.sender = "alice"  # alice's name on mallory's key
    assert verifier.signed_parts(claimed) is None
    unsigned = await iatp.sign("alice", {}, topic="t")
    unsigned.sig = None
    assert verifier.signed_parts(unsigned) is None
    assert verifier.signed_parts(object()) is None
    assert verifier.signed_parts(await iatp.sign("alice", {}, topic="t")) is not None


# -- on the bus ---------------------------------------------------------------------------------


async def test_on_the_bus_workers_check_and_forgeries_and_replays_are_refused() -> None:
    iatp, mallory = IATP(), IATP()
    await iatp.register_agent("pub")
    await mallory.register_agent("pub")  # claims the name with another key
    handled = Collector()
    codec = MsgpackSerializer()
    sent: list[int] = []
    where = memory_url("offload")
    middleware = iatp.middleware(verify_workers=1)
    receiver = AMB("memory", where, agent_id="sub", middleware=[middleware])
    raw = AMB("memory", where, agent_id="raw")  # no middleware: puts anything on the wire
    try:
        await receiver.subscribe("pay.x", handled)
        await raw.connect()
        for i in range(300):
            good = await iatp.sign("pub", {"i": i}, topic="pay.x")
            if i % 10 == 3:  # the payload changed after signing
                env = dataclasses.replace(good, payload={"i": -i})
            elif i % 10 == 7:
                env = await mallory.sign("pub", {"i": i}, topic="pay.x")
            else:
                env = good
                sent.append(i)
            await raw.broker.publish("pay.x", codec.encode(env))
        await wait_until(lambda: receiver.stats.rejected == 60, what="the forgeries refused")
        await handled.wait_for(240)
        assert handled.messages == [{"i": i} for i in sent]
        assert middleware.rejected == {"bad_signature": 30, "unknown_key": 30}
        workers = middleware.workers
        assert workers is not None
        assert iatp.verifier.checks_taken >= 100  # answers that stood in for the inline check
        assert workers.lost == 0
        # a replay of a delivered message is still refused
        await raw.broker.publish("pay.x", codec.encode(good))
        await wait_until(lambda: receiver.stats.rejected == 61, what="the replay refused")
        assert middleware.rejected["replayed_nonce"] == 1
        assert len(handled.messages) == 240
    finally:
        middleware.close()
        await raw.close()
        await receiver.close()


async def test_on_the_bus_a_worker_lost_midway_loses_nothing() -> None:
    iatp = IATP()
    await iatp.register_agent("pub")
    middleware = iatp.middleware(verify_workers=1)
    assert middleware.workers is not None
    middleware.workers.restart_after = 0.0
    got: list[int] = []
    killed: list[int] = []

    async def handler(message: dict[str, int], metadata: Metadata) -> None:
        got.append(message["i"])
        workers = middleware.workers
        if message["i"] in (50, 150) and workers is not None and workers._workers:
            pid = workers._workers[0].process.pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    where = memory_url("offload")
    sender = AMB("memory", where, agent_id="pub", middleware=[middleware])
    receiver = AMB("memory", where, agent_id="sub", middleware=[middleware])
    try:
        await receiver.subscribe("pay.x", handler)
        for i in range(300):
            await sender.publish("pay.x", {"i": i})
        await wait_until(lambda: len(got) == 300, what="every message")
        assert got == list(range(300))
        assert len(killed) == 2
        assert middleware.workers.started >= 2
        assert middleware.verified == 300
        assert sum(middleware.rejected.values()) == 0
    finally:
        middleware.close()
        await sender.close()
        await receiver.close()
