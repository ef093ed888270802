"""Dispatcher.deliver_message: a source's messages (nats-py's) handed over inline, as LocalDelivery."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

from agent_os.amb.dispatch import Dispatcher, InstantHandler, LocalDelivery
from tests.support import wait_until


@dataclass
class Msg:
    subject: str
    data: bytes


async def test_messages_become_first_local_deliveries_in_the_callers_task_and_keep_order_with_retries() -> (
    None
):
    tasks: list[asyncio.Task[object] | None] = []
    inside: list[bool] = []
    seen: list[tuple[str, int, int]] = []
    d: Dispatcher[LocalDelivery]

    async def handler(item: LocalDelivery) -> None:
        tasks.append(asyncio.current_task())
        inside.append(d.in_handler())
        seen.append((item.subject, int(item.data), item.attempt))
        assert item.extra == {}
        if item.data == b"1" and item.attempt == 1:
            await item.nack()  # queued: handled before anything delivered after it

    d = Dispatcher(handler, max_pending=8, name="test")
    for i in range(4):
        await d.deliver_message(Msg("s.x", str(i).encode()))
    await wait_until(lambda: len(seen) == 5)
    assert seen == [("s.x", 0, 1), ("s.x", 1, 1), ("s.x", 1, 2), ("s.x", 2, 1), ("s.x", 3, 1)]
    assert tasks[0] is asyncio.current_task(), "no hop: the first message ran in the caller's task"
    assert all(inside)
    assert not d.in_handler()
    assert not d.busy
    await d.stop(1.0)


async def test_a_raising_handler_is_counted_and_messages_after_stop_are_dropped() -> None:
    seen: list[bytes] = []

    async def handler(item: LocalDelivery) -> None:
        seen.append(item.data)
        if item.data == b"boom":
            raise RuntimeError("handler bug")

    d: Dispatcher[LocalDelivery] = Dispatcher(handler, max_pending=8, name="test")
    await d.deliver_message(Msg("s", b"boom"))
    await d.deliver_message(Msg("s", b"ok"))
    assert seen == [b"boom", b"ok"]
    assert d.handler_errors == 1
    await d.stop(1.0)
    await d.deliver_message(Msg("s", b"late"))
    assert seen == [b"boom", b"ok"]


async def test_drain_from_another_task_cancels_a_stuck_inline_handler() -> None:
    started = asyncio.Event()

    async def handler(item: LocalDelivery) -> None:
        started.set()
        await asyncio.sleep(30)

    d: Dispatcher[LocalDelivery] = Dispatcher(handler, max_pending=8, name="test")
    source = asyncio.create_task(d.deliver_message(Msg("s", b"x")))
    await started.wait()
    assert d.busy
    assert not d.in_handler()
    await d.stop(0.05)
    await asyncio.wait({source}, timeout=2)
    assert source.done()


def test_queued_local_deliveries_cost_the_garbage_collector_nothing() -> None:
    d: Dispatcher[LocalDelivery] = Dispatcher(lambda item: asyncio.sleep(0), max_pending=5000, name="t")
    a = LocalDelivery("s", b"x", 2, d.handle, {"k": 1})
    assert (a.subject, a.data, a.attempt, a.owner.dispatcher, a.extra) == ("s", b"x", 2, d, {"k": 1})
    assert LocalDelivery("s", b"x", 1, d.handle).extra == {}
    assert not gc.is_tracked(a)
    assert a != LocalDelivery("s", b"x", 2, d.handle, {"k": 1})  # equal only to itself
    assert len({a, a}) == 1
    secret = LocalDelivery("s", b"secret-token", 1, d.handle)
    assert "secret" not in repr(secret)  # no payload in logs
    assert "secret" not in repr(secret.__rich_repr__())  # nor in rich's pretty printing
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        before = gc.get_count()[0]
        for i in range(3000):  # a backlog: each would count toward a collection if tracked
            d._items.append(LocalDelivery("s", b"%d" % i, 1, d.handle))
        assert gc.get_count()[0] - before < 50
    finally:
        d._items.clear()
        if was_enabled:
            gc.enable()


async def test_an_instant_handler_runs_in_the_offering_task_only_while_nothing_is_queued() -> None:
    now_seen: list[bytes] = []
    queued_seen: list[bytes] = []
    release = asyncio.Event()
    d: Dispatcher[LocalDelivery]

    def now(item: LocalDelivery) -> bool:
        if item.data == b"bug":
            raise RuntimeError("instant path bug")
        if item.data.startswith(b"later"):
            return False
        now_seen.append(item.data)
        return True

    async def call(item: LocalDelivery) -> None:
        queued_seen.append(item.data)
        if item.data == b"later-slow":
            await release.wait()

    handled_calls: list[int] = []
    d = Dispatcher(
        InstantHandler(call, now),
        max_pending=8,
        name="test",
        on_handled=lambda: handled_calls.append(len(now_seen) + len(queued_seen)),
    )

    def offer(data: bytes) -> bool:
        return d.offer(LocalDelivery("s", data, 1, d.handle))

    assert offer(b"a")
    assert now_seen == [b"a"], "taken at once, in this task"
    assert queued_seen == []
    assert handled_calls == [1], "on_handled follows an instant delivery too"
    assert offer(b"later-slow")  # refused by now(): queued for the handler
    assert offer(b"b")  # something is queued: b waits its turn, now() is not asked
    await wait_until(lambda: queued_seen == [b"later-slow"])
    assert d.busy
    assert offer(b"c")  # the handler is busy: queued too
    release.set()
    await wait_until(lambda: queued_seen == [b"later-slow", b"b", b"c"])
    assert now_seen == [b"a"]
    await wait_until(lambda: not d.busy)
    assert offer(b"bug")  # an error in now() counts as a handler error; the delivery is handled
    assert d.handler_errors == 1
    assert queued_seen == [b"later-slow", b"b", b"c"]
    assert offer(b"d")
    assert now_seen == [b"a", b"d"]
    assert len(handled_calls) == 6  # a, later-slow, b, c, bug, d: once each
    await d.stop(1.0)
    assert not offer(b"e"), "stopped: refused"
    assert now_seen == [b"a", b"d"]
