"""Dispatcher.deliver_message: a source's messages (nats-py's) handed over inline, as LocalDelivery."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agent_os.amb.dispatch import Dispatcher, LocalDelivery, local_delivery
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


def test_local_delivery_builds_what_the_constructor_builds() -> None:
    d: Dispatcher[LocalDelivery] = Dispatcher(lambda item: asyncio.sleep(0), max_pending=1, name="t")
    a = local_delivery("s", b"x", 2, d, {"k": 1})
    b = LocalDelivery("s", b"x", 2, d, {"k": 1})
    assert [getattr(a, n) for n in LocalDelivery.__slots__] == [
        getattr(b, n) for n in LocalDelivery.__slots__
    ]
