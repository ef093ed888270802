"""Look-ahead subscriptions: middleware that runs ahead of the handler, handlers still in turn.

On the in-memory broker (a real broker). A middleware that asks for look-ahead holds each
message until the test lets it go, so the tests see how far ahead the client lets it run, in
which order handlers and settlements happen, and what a close does to messages in line.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, MessageRejected, Metadata, Middleware, MsgpackSerializer
from agent_os.amb.envelope import Envelope
from agent_os.amb.middleware import ConsumeNext
from agent_os.amb.subscription import Subscription, Turns
from tests.support import Collector, wait_until
from tests.support.closing import Closing


def memory_url() -> str:
    return f"memory://ahead-{uuid.uuid4().hex}"


class Held(Middleware):
    """Asks for ``depth`` messages of look-ahead; holds message ``n`` until ``release(n)``; refuses
    the payloads in ``refuse`` once let go."""

    def __init__(self, depth: int, refuse: frozenset[int] = frozenset()) -> None:
        self.depth = depth
        self.refuse = refuse
        self.started: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}

    def lookahead(self, subscription: Subscription) -> int:
        return self.depth

    def gate(self, n: int) -> asyncio.Event:
        return self.gates.setdefault(n, asyncio.Event())

    def release(self, *numbers: int) -> None:
        for n in numbers:
            self.gate(n).set()

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        n = envelope.payload
        self.started.append(n)
        await self.gate(n).wait()
        if n in self.refuse:
            raise MessageRejected(f"{n} is refused", reason="refused")
        await call_next(envelope, metadata)


class InTurn(Middleware):
    """Inner middleware: records the order it sees and whether two calls ever overlap."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.running = 0
        self.overlapped = False

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        self.seen.append(envelope.payload)
        try:
            await call_next(envelope, metadata)
        finally:
            self.running -= 1


class Handler:
    """Records handled payloads; holds payload ``n`` while ``hold[n]`` is not set."""

    def __init__(self) -> None:
        self.handled: list[int] = []
        self.hold: dict[int, asyncio.Event] = {}
        self.running = 0
        self.most = 0

    async def __call__(self, message: Any, metadata: Metadata) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            held = self.hold.get(message)
            if held is not None:
                await held.wait()
            self.handled.append(message)
        finally:
            self.running -= 1


async def test_an_ordered_subscription_runs_middleware_ahead_and_handlers_in_arrival_order(
    closing: Closing,
) -> None:
    held, inner, handler = Held(depth=4), InTurn(), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held, inner]))
    sub = await client.subscribe("la.x", handler)
    assert sub.lookahead == 4
    for n in range(10):
        await client.publish("la.x", n)
    # Four messages' middleware run at once, none further: the look-ahead is bounded.
    await wait_until(lambda: held.started == [0, 1, 2, 3], what="four messages ahead")
    held.release(3, 2, 1)  # the later ones are let go first: their handlers still wait for 0
    await wait_until(lambda: held.gate(1).is_set() and inner.seen == [], what="nothing in turn yet")
    assert handler.handled == []
    held.release(0)
    await wait_until(lambda: handler.handled == [0, 1, 2, 3], what="the first four in order")
    held.release(*range(4, 10))
    await wait_until(lambda: len(handler.handled) == 10, what="every message")
    assert handler.handled == list(range(10))
    assert inner.seen == list(range(10))  # middleware after the one ahead run in turn
    assert not inner.overlapped
    assert handler.most == 1
    assert client.stats.handled == 10
    await client.close()


async def test_a_refusal_ahead_is_settled_in_its_turn(closing: Closing) -> None:
    held, handler, url = Held(depth=8, refuse=frozenset({2})), Handler(), memory_url()
    client = closing(AMB(connection_string=url, middleware=[held]))
    watcher = closing(AMB(connection_string=url))
    dead = Collector()
    await watcher.subscribe("_DLQ.lr.x", dead)
    handler.hold[1] = asyncio.Event()
    await client.subscribe("lr.x", handler)
    for n in range(4):
        await client.publish("lr.x", n)
    held.release(0, 1, 2, 3)
    await wait_until(lambda: handler.handled == [0] and handler.running == 1, what="handler 1 held")
    # Message 2 was refused ahead, but is not dead-lettered before message 1 is settled.
    await wait_until(lambda: len(held.started) == 4, what="every message started")
    assert client.stats.rejected == 0
    handler.hold[1].set()
    await dead.wait_for(1)
    await wait_until(lambda: handler.handled == [0, 1, 3], what="the rest")
    assert client.stats.rejected == 1
    assert [m.headers["dlq-reason"] for m in dead.metadata] == ["refused"]
    assert MsgpackSerializer().decode(dead.messages[0]).payload == 2  # the original's bytes
    await client.close()
    await watcher.close()


async def test_with_concurrency_the_handlers_stay_bounded_while_more_run_ahead(closing: Closing) -> None:
    held, handler = Held(depth=6), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    for n in range(12):
        handler.hold[n] = asyncio.Event()
    sub = await client.subscribe("lc.x", handler, concurrency=2)
    assert sub.lookahead == 6
    for n in range(12):
        await client.publish("lc.x", n)
    await wait_until(lambda: len(held.started) == 6, what="six ahead")
    held.release(*range(12))
    await wait_until(lambda: handler.running == 2, what="two handlers held")
    assert handler.most == 2  # six let through the middleware, two of them in their handlers
    assert len(held.started) == 6  # the four waiting for a handler still count as ahead
    for n in range(12):
        handler.hold[n].set()
    await wait_until(lambda: len(handler.handled) == 12, what="every message")
    assert sorted(handler.handled) == list(range(12))
    assert handler.most == 2
    await client.close()


async def test_no_look_ahead_unless_asked_for_and_beyond_the_concurrency(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url(), middleware=[Middleware(), Held(depth=2)]))
    plain = await client.subscribe("ln.a", Handler())
    assert plain.lookahead == 2
    wide = await client.subscribe("ln.b", Handler(), concurrency=2)  # 2 handlers already
    assert wide.lookahead == 0
    other = closing(AMB(connection_string=memory_url(), middleware=[Middleware()]))
    assert (await other.subscribe("ln.c", Handler())).lookahead == 0
    await client.close()
    await other.close()


async def test_close_cancels_what_waits_in_line_without_hanging(closing: Closing) -> None:
    held, handler = Held(depth=4), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    sub = await client.subscribe("lx.x", handler)
    for n in range(6):
        await client.publish("lx.x", n)
    await wait_until(lambda: len(held.started) == 4, what="four ahead")
    held.release(1, 2, 3)  # in line behind message 0, which never comes out
    await asyncio.wait_for(client.close(timeout=0.2), 5)
    assert handler.handled == []
    assert not sub._tasks
    assert sub._turns is not None
    assert len(sub._turns) == 0


async def test_turns_go_in_entry_order_and_a_place_given_up_holds_nobody() -> None:
    turns = Turns()
    keys = [object() for _ in range(4)]
    for key in keys:
        turns.enter(key)
    order: list[int] = []

    async def take(i: int) -> None:
        await turns.wait(keys[i])
        order.append(i)
        turns.leave(keys[i])

    waiting = [asyncio.create_task(take(i)) for i in (3, 2, 1)]
    await asyncio.sleep(0)
    waiting[1].cancel()  # key 2 gives up its place while waiting
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]
    turns.leave(keys[2])
    await take(0)
    await asyncio.gather(waiting[0], waiting[2])
    assert order == [0, 1, 3]
    assert len(turns) == 0
