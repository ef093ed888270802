"""Look-ahead subscriptions: middleware that prepares messages as they arrive, handlers in turn.

On the in-memory broker (a real broker). A middleware asks for look-ahead and records what it
prepares; its inbound hook holds a message until the test lets it go, so the tests see how far
ahead the client prepares, in which order handlers and settlements happen, and what a close
does to messages waiting for their turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, LifecycleState, MessageRejected, Metadata, Middleware, MsgpackSerializer, new_id
from agent_os.amb.envelope import Envelope
from agent_os.amb.middleware import ConsumeNext
from agent_os.amb.subscription import Subscription
from tests.support import Collector, wait_until
from tests.support.closing import Closing


def memory_url() -> str:
    return f"memory://ahead-{uuid.uuid4().hex}"


class Held(Middleware):
    """Asks for ``depth`` messages of look-ahead and records what it prepares; in turn, holds
    message ``n`` while ``hold`` has an unset event for it, and refuses those in ``refuse``."""

    def __init__(self, depth: int, refuse: frozenset[int] = frozenset(), fail_prepare: int = -1) -> None:
        self.depth = depth
        self.refuse = refuse
        self.fail_prepare = fail_prepare
        self.prepared: list[int] = []
        self.hold: dict[int, asyncio.Event] = {}
        self.in_turn: list[int] = []
        self.running = 0
        self.overlapped = False

    def lookahead(self, subscription: Subscription) -> int:
        return self.depth

    def prepare(self, envelope: Envelope, metadata: Metadata) -> None:
        if envelope.payload == self.fail_prepare:
            raise RuntimeError("prepare failed")
        self.prepared.append(envelope.payload)
        metadata.context["prepared"] = envelope.payload

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        n = envelope.payload
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            self.in_turn.append(n)
            held = self.hold.get(n)
            if held is not None:
                await held.wait()
            if n in self.refuse:
                raise MessageRejected(f"{n} is refused", reason="refused")
            await call_next(envelope, metadata)
        finally:
            self.running -= 1


class Abandons(Held):
    """:class:`Held` that records what it is told is abandoned."""

    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.abandoned: list[int] = []

    def abandon(self, envelope: Envelope, metadata: Metadata) -> None:
        self.abandoned.append(envelope.payload)


class Handler:
    """Records handled payloads (and what was prepared for them); holds payload ``n`` while
    ``hold[n]`` is not set."""

    def __init__(self) -> None:
        self.handled: list[int] = []
        self.prepared: list[Any] = []
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
            self.prepared.append(metadata.context.get("prepared"))
        finally:
            self.running -= 1


async def test_an_ordered_subscription_prepares_ahead_and_handles_in_arrival_order(closing: Closing) -> None:
    held, handler = Held(depth=4), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    sub = await client.subscribe("la.x", handler)
    assert sub.lookahead == 4
    held.hold[0] = asyncio.Event()
    for n in range(12):
        await client.publish("la.x", n)
    # While message 0 is in its turn, four more are prepared, and no further: bounded.
    await wait_until(lambda: held.prepared == [0, 1, 2, 3, 4], what="four prepared behind the first")
    for _ in range(20):
        await asyncio.sleep(0)
    assert held.prepared == [0, 1, 2, 3, 4]
    assert held.in_turn == [0]
    held.hold[0].set()
    await wait_until(lambda: len(handler.handled) == 12, what="every message")
    assert handler.handled == list(range(12))
    assert handler.prepared == list(range(12))  # prepare's context reached the handler
    assert held.in_turn == list(range(12))
    assert not held.overlapped
    assert handler.most == 1
    assert client.stats.handled == 12
    await client.close()


async def test_a_refusal_is_settled_in_its_turn(closing: Closing) -> None:
    held, handler, url = Held(depth=8, refuse=frozenset({2})), Handler(), memory_url()
    client = closing(AMB(connection_string=url, middleware=[held]))
    watcher = closing(AMB(connection_string=url))
    dead = Collector()
    await watcher.subscribe("_DLQ.lr.x", dead)
    handler.hold[1] = asyncio.Event()
    await client.subscribe("lr.x", handler)
    for n in range(4):
        await client.publish("lr.x", n)
    await wait_until(lambda: handler.handled == [0] and handler.running == 1, what="handler 1 held")
    await wait_until(lambda: len(held.prepared) == 4, what="every message prepared")
    assert client.stats.rejected == 0  # message 2 waits behind message 1
    handler.hold[1].set()
    await dead.wait_for(1)
    await wait_until(lambda: handler.handled == [0, 1, 3], what="the rest")
    assert client.stats.rejected == 1
    assert [m.headers["dlq-reason"] for m in dead.metadata] == ["refused"]
    assert MsgpackSerializer().decode(dead.messages[0]).payload == 2  # the original's bytes
    await client.close()
    await watcher.close()


async def test_with_concurrency_handlers_stay_bounded_while_more_are_prepared(closing: Closing) -> None:
    held, handler = Held(depth=6), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    for n in range(20):
        handler.hold[n] = asyncio.Event()
    sub = await client.subscribe("lc.x", handler, concurrency=2)
    assert sub.lookahead == 6
    for n in range(20):
        await client.publish("lc.x", n)
    await wait_until(lambda: handler.running == 2, what="two handlers held")
    # two in their handlers, one waiting for a slot, six prepared behind them
    await wait_until(lambda: len(held.prepared) == 9, what="prepared ahead")
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(held.prepared) == 9
    for n in range(20):
        handler.hold[n].set()
    await wait_until(lambda: len(handler.handled) == 20, what="every message")
    assert sorted(handler.handled) == list(range(20))
    assert handler.most == 2
    await client.close()


async def test_a_prepare_that_raises_is_logged_and_its_message_handled(
    closing: Closing, caplog: pytest.LogCaptureFixture
) -> None:
    held, handler = Held(depth=4, fail_prepare=1), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    await client.subscribe("lp.x", handler)
    with caplog.at_level(logging.ERROR, logger="agent_os.amb.subscription"):
        for n in range(3):
            await client.publish("lp.x", n)
        await wait_until(lambda: len(handler.handled) == 3, what="every message")
    assert handler.handled == [0, 1, 2]
    assert handler.prepared == [0, None, 2]
    assert "prepare raised" in caplog.text
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


async def test_close_gives_up_what_waits_for_its_turn_without_hanging(closing: Closing) -> None:
    held, handler = Held(depth=4), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    held.hold[0] = asyncio.Event()  # never set: message 0's turn never ends
    sub = await client.subscribe("lx.x", handler)
    for n in range(6):
        await client.publish("lx.x", n)
    await wait_until(lambda: len(held.prepared) == 5, what="prepared behind the first")
    await asyncio.wait_for(client.close(timeout=0.2), 5)
    assert handler.handled == []
    assert sub._ahead is not None
    assert sub._ahead.stopping
    assert len(sub._ahead) == 0


async def test_close_from_inside_a_handler_does_not_wait_for_that_handler(closing: Closing) -> None:
    """A handler closes the client while more messages wait for their turn: close() returns
    at once, not after its timeout; what waits is dropped and abandoned."""
    held, handler = Abandons(depth=4), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    closed = asyncio.Event()

    async def closer(message: Any, metadata: Metadata) -> None:
        await handler(message, metadata)
        if message == 0:
            await client.close(timeout=30)
            closed.set()

    await client.subscribe("lci.x", closer)
    for n in range(4):
        await client.publish("lci.x", n)
    await asyncio.wait_for(closed.wait(), 5)
    assert client.state is LifecycleState.CLOSED
    assert handler.handled == [0]
    assert sorted(held.abandoned) == [1, 2, 3]


async def test_a_backlog_is_refilled_while_its_turns_are_taken(closing: Closing) -> None:
    """With a backlog, arrivals get to prepare more messages while earlier ones are handled: the
    queue does not run dry before refilling, so a message's prepared work started well before
    its turn (here, at least a few messages before)."""
    held, handler = Held(depth=8), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    ahead_at_turn: list[int] = []

    async def handle(message: Any, metadata: Metadata) -> None:
        ahead_at_turn.append(len(held.prepared) - 1 - message)
        await handler(message, metadata)

    await client.subscribe("lb.x", handle)
    codec = MsgpackSerializer()
    data = [
        codec.encode(Envelope(new_id(), "lb.x", "t", n, None, timestamp=time.time_ns())) for n in range(200)
    ]
    for item in data:  # a burst: the broker queues them faster than they are handled
        await client.broker.publish("lb.x", item)
    await wait_until(lambda: len(handler.handled) == 200, what="every message")
    assert handler.handled == list(range(200))
    assert min(ahead_at_turn[:150]) >= 2, ahead_at_turn
    await client.close()


@pytest.mark.parametrize("stop", ["unsubscribe", "drain"])
async def test_a_handler_may_stop_its_own_subscription(closing: Closing, stop: str) -> None:
    """From inside a handler (whose turn holds up the full queue and the broker's task waiting
    for room in it): unsubscribe and drain return at once, what waits is dropped."""
    held, handler = Held(depth=4), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    stopped = asyncio.Event()

    async def handle(message: Any, metadata: Metadata) -> None:
        await handler(message, metadata)
        if message == 0:
            await getattr(sub, stop)()
            stopped.set()

    sub = await client.subscribe("ls.x", handle)
    for n in range(10):
        await client.publish("ls.x", n)
    started = time.monotonic()
    await asyncio.wait_for(stopped.wait(), 5)
    assert time.monotonic() - started < 2
    await wait_until(lambda: not sub.active and not sub._tasks, what="stopped")
    assert handler.handled == [0]


@pytest.mark.parametrize("stop", ["unsubscribe", "drain"])
async def test_a_concurrent_handler_may_stop_its_own_subscription(closing: Closing, stop: str) -> None:
    """With ``concurrency=2``: message 0's handler stops its subscription while handler 1 runs
    and message 2's turn waits for a slot (more prepared behind it). The stop does not wait for
    its caller: unsubscribe drops and abandons the rest and returns once 1 has finished; drain
    returns once the rest is handled."""
    held = Abandons(depth=4)
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    release, stopping = asyncio.Event(), asyncio.Event()
    handled: list[int] = []
    at_return: list[int] = []

    async def handle(message: int, metadata: Metadata) -> None:
        if message == 0:
            stopping.set()
            await getattr(sub, stop)()
            at_return.extend(sorted(handled))
        elif message == 1:
            await release.wait()
        handled.append(message)

    sub = await client.subscribe("lcs.x", handle, concurrency=2)
    assert sub.lookahead == 4
    for n in (1, 0, 2, 3, 4, 5):
        await client.publish("lcs.x", n)
    await asyncio.wait_for(stopping.wait(), 5)
    release.set()
    await wait_until(lambda: 0 in handled, what="the stop to return")
    if stop == "unsubscribe":
        assert at_return == [1]
        assert sorted(handled) == [0, 1]
        assert sorted(held.abandoned) == [2, 3, 4, 5]
    else:
        assert at_return == [1, 2, 3, 4, 5]
        assert sorted(handled) == [0, 1, 2, 3, 4, 5]
        assert held.abandoned == []
    await client.close()


async def test_a_message_whose_ttl_runs_out_while_it_waits_is_not_handled(closing: Closing) -> None:
    held, handler = Held(depth=4), Handler()
    client = closing(AMB(connection_string=memory_url(), middleware=[held]))
    handler.hold[0] = asyncio.Event()
    await client.subscribe("lt.x", handler)
    await client.publish("lt.x", 0)
    await client.publish("lt.x", 1, ttl=0.1)  # alive on arrival, prepared, then waits
    await client.publish("lt.x", 2)
    await wait_until(lambda: held.prepared == [0, 1, 2], what="all prepared")
    await asyncio.sleep(0.15)  # message 1's ttl runs out while message 0 is handled
    handler.hold[0].set()
    await wait_until(lambda: handler.handled == [0, 2], what="the others handled")
    assert client.stats.expired == 1
    await client.close()


async def test_a_middleware_hears_when_each_subscription_stops_for_good(closing: Closing) -> None:
    stopped: list[str] = []
    got = Collector()

    class Watching(Middleware):
        def unsubscribed(self, subscription: Subscription) -> None:
            stopped.append(subscription.pattern)

    client = closing(AMB(connection_string=memory_url(), middleware=[Watching()]))
    first = await client.subscribe("watch.a", got)
    second = await client.subscribe("watch.b", got)
    await client.subscribe("watch.c", got)
    await client.publish("watch.a", 1)
    await got.wait_for(1)
    assert stopped == []
    await first.unsubscribe()
    await second.drain()
    assert stopped == ["watch.a", "watch.b"]
    await client.close()
    assert "watch.c" in stopped


async def test_a_middleware_raising_when_told_does_not_stop_the_others_hearing(
    closing: Closing, caplog: pytest.LogCaptureFixture
) -> None:
    stopped: list[str] = []

    class Raising(Middleware):
        def unsubscribed(self, subscription: Subscription) -> None:
            raise RuntimeError("broken hook")

    class Watching(Middleware):
        def unsubscribed(self, subscription: Subscription) -> None:
            stopped.append(subscription.pattern)

    client = closing(AMB(connection_string=memory_url(), middleware=[Raising(), Watching()]))
    sub = await client.subscribe("watch.a", Collector())
    with caplog.at_level(logging.ERROR, logger="agent_os.amb"):
        await sub.unsubscribe()  # does not raise
    assert stopped == ["watch.a"]
    assert "broken hook" in caplog.text
