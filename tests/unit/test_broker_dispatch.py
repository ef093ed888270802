"""The per-subscription dispatcher every broker adapter feeds its handler through."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent_os.amb.dispatch import Dispatcher, LocalDelivery, check_group_names, drain_all
from agent_os.amb.errors import ConfigError
from tests.support import wait_until


def _recorder(seen: list[int], gate: asyncio.Event | None = None) -> Dispatcher[int]:
    async def handler(item: int) -> None:
        if gate is not None:
            await gate.wait()
        seen.append(item)

    return Dispatcher(handler, max_pending=4, name="test")


async def test_queued_items_are_handled_one_at_a_time_in_order() -> None:
    running = 0
    peak = 0
    seen: list[int] = []

    async def handler(item: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        seen.append(item)
        running -= 1

    d: Dispatcher[int] = Dispatcher(handler, max_pending=100, name="test")
    for i in range(50):
        assert d.offer(i)
    await wait_until(lambda: len(seen) == 50)
    assert seen == list(range(50))
    assert peak == 1
    await d.stop(1.0)


async def test_put_waits_for_room_and_offer_refuses_when_full() -> None:
    gate = asyncio.Event()
    seen: list[int] = []
    d = _recorder(seen, gate)
    assert d.offer(0)
    await asyncio.sleep(0)  # the runner takes 0 and waits at the gate
    for i in range(1, 5):
        assert d.offer(i)
    assert not d.offer(5), "the queue holds max_pending"
    putter = asyncio.ensure_future(d.put(5))
    await asyncio.sleep(0.02)
    assert not putter.done(), "put waits while the queue is full"
    gate.set()
    assert await asyncio.wait_for(putter, 2)
    await wait_until(lambda: len(seen) == 6)
    assert seen == list(range(6))
    await d.stop(1.0)


async def test_inline_delivery_runs_in_the_callers_task_and_keeps_order_with_retries() -> None:
    tasks: list[asyncio.Task[object] | None] = []
    seen: list[tuple[int, int]] = []

    async def handler(item: LocalDelivery) -> None:
        tasks.append(asyncio.current_task())
        seen.append((int(item.data), item.attempt))
        if item.data == b"1" and item.attempt == 1:
            await item.nack()  # redelivered locally, before anything delivered after it

    d: Dispatcher[LocalDelivery] = Dispatcher(handler, max_pending=8, name="test")
    me = asyncio.current_task()
    for i in range(4):
        await d.deliver(LocalDelivery("s", str(i).encode(), 1, d.handle))
    await wait_until(lambda: len(seen) == 5)
    assert seen == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1)]
    assert tasks[0] is me, "no hop: the first delivery ran in the caller's task"
    await d.stop(1.0)


async def test_nack_with_delay_redelivers_later_with_the_next_attempt() -> None:
    seen: list[tuple[float, int]] = []
    t0 = time.monotonic()

    async def handler(item: LocalDelivery) -> None:
        seen.append((time.monotonic() - t0, item.attempt))
        if item.attempt < 3:
            await item.nack(0.05)

    d: Dispatcher[LocalDelivery] = Dispatcher(handler, max_pending=8, name="test")
    await d.deliver(LocalDelivery("s", b"x", 1, d.handle))
    await wait_until(lambda: len(seen) == 3)
    assert [a for _, a in seen] == [1, 2, 3]
    assert seen[2][0] >= 0.1
    await d.stop(1.0)


async def test_handler_errors_are_counted_and_do_not_stop_the_subscription() -> None:
    seen: list[int] = []

    async def handler(item: int) -> None:
        if item == 1:
            raise RuntimeError("boom")
        seen.append(item)

    d: Dispatcher[int] = Dispatcher(handler, max_pending=8, name="test")
    for i in range(3):
        d.offer(i)
    await wait_until(lambda: len(seen) == 2)
    assert seen == [0, 2]
    assert d.handler_errors == 1
    await d.stop(1.0)


async def test_drain_finishes_queued_items() -> None:
    seen: list[int] = []

    async def slow(item: int) -> None:
        await asyncio.sleep(0.002)
        seen.append(item)

    d: Dispatcher[int] = Dispatcher(slow, max_pending=100, name="test")
    for i in range(20):
        d.offer(i)
    left = await d.stop(5.0)
    assert left == []
    assert seen == list(range(20))
    assert not d.offer(99), "nothing is taken after stop"


async def test_drain_cancels_a_stuck_inline_handler_and_returns_the_rest() -> None:
    cancelled = asyncio.Event()

    async def stuck(item: int) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    d: Dispatcher[int] = Dispatcher(stuck, max_pending=8, name="test")
    source = asyncio.ensure_future(d.deliver(1))  # the source's own task, stuck in the handler
    await asyncio.sleep(0.01)
    await d.deliver(2)  # queued behind the stuck one: returns at once
    t0 = time.monotonic()
    left = await d.stop(0.1)
    assert time.monotonic() - t0 < 1.5
    assert cancelled.is_set()
    assert left == [2]
    await asyncio.wait({source}, timeout=1)
    assert source.done()


async def test_unsubscribe_drops_the_queue_and_stop_from_the_handler_does_not_wait() -> None:
    seen: list[int] = []
    stopped: list[list[int]] = []

    async def handler(item: int) -> None:
        seen.append(item)
        if item == 0:
            stopped.append(await d.stop(None, drop=True))

    d: Dispatcher[int] = Dispatcher(handler, max_pending=8, name="test")
    for i in range(4):
        d.offer(i)
    await wait_until(lambda: bool(stopped))
    await asyncio.sleep(0.02)
    assert seen == [0]
    assert stopped == [[1, 2, 3]]


async def test_helpers() -> None:
    with pytest.raises(ConfigError):
        Dispatcher(_noop, max_pending=0, name="bad")
    for queue, durable in (("", None), (None, ""), (" ", None)):
        with pytest.raises(ConfigError):
            check_group_names(queue, durable)
    check_group_names("q", "d")

    class Failing:
        async def drain(self, timeout: float | None = None) -> None:
            raise RuntimeError("drain failed")

    class Fine:
        drained = False

        async def drain(self, timeout: float | None = None) -> None:
            self.drained = True

    fine = Fine()
    await drain_all([Failing(), fine], 1.0)  # one failing drain stops no other
    assert fine.drained


async def _noop(item: object) -> None:
    return None
