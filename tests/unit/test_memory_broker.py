"""Semantics of the in-memory broker that the shared conformance suite does not pin down."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Awaitable, Callable

import pytest

from agent_os.amb import (
    AMB,
    BrokerSubscription,
    CapabilityNotSupported,
    ConfigError,
    Delivery,
    LifecycleState,
    StateError,
)
from agent_os.amb.dispatch import InstantHandler, LocalDelivery
from agent_os.bus_adapters.memory import MemoryBroker, _MemorySubscription, memory_server
from tests.support import memory_url, wait_until
from tests.support.closing import Closing


async def test_publisher_waits_while_a_subscriber_queue_is_full(closing: Closing) -> None:
    u = memory_url("mb")
    broker = closing(MemoryBroker(u, max_pending=4))
    await broker.connect()
    release = asyncio.Event()
    handled: list[bytes] = []

    async def blocked(d: Delivery) -> None:
        await release.wait()
        handled.append(d.data)

    await broker.subscribe("bp.x", blocked)
    server = memory_server(broker.server_name)
    assert server is not None
    publisher = asyncio.create_task(_publish_many(broker, 20))
    # One message is in the handler, four are queued: the publisher is parked on the sixth.
    await wait_until(lambda: server.stats.published == 6, what="the sixth publish")
    await wait_until(lambda: len(handled) == 0 and server.stats.routed == 5, what="five routed")
    assert not publisher.done()
    release.set()
    await asyncio.wait_for(publisher, 5)
    await wait_until(lambda: len(handled) == 20)
    assert handled == [str(i).encode() for i in range(20)]
    await broker.close()


async def _publish_many(broker: MemoryBroker, n: int) -> None:
    for i in range(n):
        await broker.publish("bp.x", str(i).encode())


async def test_idle_subscriptions_do_not_wake_up(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    calls = 0

    async def handler(d: Delivery) -> None:
        nonlocal calls
        calls += 1

    for i in range(200):
        await broker.subscribe(f"idle.{i}", handler)
    loop = asyncio.get_running_loop()
    # Every idle subscription is one task parked on a future: nothing is scheduled to run.
    await asyncio.sleep(0.05)
    ready = len(loop._ready)  # type: ignore[attr-defined]
    scheduled = len(loop._scheduled)  # type: ignore[attr-defined]
    assert ready == 0
    assert scheduled <= 1  # at most this test's own sleep timer
    start = time.process_time()
    await asyncio.sleep(0.3)
    assert time.process_time() - start < 0.05
    assert calls == 0
    await broker.close()


async def test_queue_group_skips_a_full_member(closing: Closing) -> None:
    u = memory_url("mb")
    slow_broker = closing(MemoryBroker(u, max_pending=1))
    fast_broker = closing(MemoryBroker(u, max_pending=1000))
    for b in (slow_broker, fast_broker):
        await b.connect()
    gate = asyncio.Event()
    slow: list[bytes] = []
    fast: list[bytes] = []

    async def slow_handler(d: Delivery) -> None:
        await gate.wait()
        slow.append(d.data)

    async def fast_handler(d: Delivery) -> None:
        fast.append(d.data)

    await slow_broker.subscribe("qg.x", slow_handler, queue="g")
    await fast_broker.subscribe("qg.x", fast_handler, queue="g")
    for i in range(50):
        await asyncio.wait_for(fast_broker.publish("qg.x", str(i).encode()), 2)
    await wait_until(lambda: len(fast) >= 48)
    gate.set()
    await wait_until(lambda: len(slow) + len(fast) == 50)
    assert len(slow) <= 2
    for b in (slow_broker, fast_broker):
        await b.close()


async def test_nack_redelivers_with_attempt_count(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    attempts: list[int] = []

    async def handler(d: Delivery) -> None:
        attempts.append(d.attempt)
        if d.attempt < 3:
            await d.nack(0.01 if d.attempt == 1 else None)
        else:
            await d.ack()

    await broker.subscribe("n.x", handler)
    await broker.publish("n.x", b"1")
    await wait_until(lambda: attempts == [1, 2, 3])
    await broker.close()


async def test_close_cancels_a_handler_stuck_past_the_timeout(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    started = asyncio.Event()
    cancelled = False

    async def stuck(d: Delivery) -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled = True
            raise

    await broker.subscribe("s.x", stuck)
    await broker.publish("s.x", b"x")
    await started.wait()
    t0 = time.monotonic()
    await broker.close(timeout=0.1)
    assert time.monotonic() - t0 < 1.0
    assert cancelled


async def test_unsubscribe_from_inside_the_handler(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    seen: list[bytes] = []
    subs: list[BrokerSubscription] = []

    async def once(d: Delivery) -> None:
        seen.append(d.data)
        await subs[0].unsubscribe()

    subs.append(await broker.subscribe("u.x", once))
    for _ in range(3):
        await broker.publish("u.x", b"m")
    dispatcher = subs[0].dispatcher  # type: ignore[attr-defined]
    # Stopped, nothing queued, no handler running: nothing more can be delivered.
    await wait_until(
        lambda: dispatcher.stopping and not len(dispatcher) and not dispatcher.busy, what="the stop"
    )
    assert seen == [b"m"]
    await broker.publish("u.x", b"m")
    assert memory_server(broker.server_name).stats.no_subscribers == 1  # type: ignore[union-attr]
    assert seen == [b"m"]
    await broker.close()


async def test_close_from_inside_the_handler_does_not_wait_for_it(closing: Closing) -> None:
    """close() drains every subscription in a task of its own; the handler that called it is
    still not waited for (else close would wait out its timeout, then cancel its caller)."""
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    closed = asyncio.Event()

    async def closer(d: Delivery) -> None:
        await broker.close(timeout=30)
        closed.set()

    async def idle(d: Delivery) -> None:
        return None

    await broker.subscribe("ci.x", closer)
    await broker.subscribe("ci.y", idle)  # so close drains more than one subscription
    await broker.publish("ci.x", b"x")
    await asyncio.wait_for(closed.wait(), 5)
    assert broker.state is LifecycleState.CLOSED


async def test_messages_without_subscribers_are_counted(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    await broker.publish("nobody.home", b"x")
    server = memory_server(broker.server_name)
    assert server is not None
    assert server.stats.no_subscribers == 1
    await broker.close()
    assert memory_server(broker.server_name) is None


async def test_durable_is_refused_and_state_is_checked(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    with pytest.raises(StateError, match="connect"):
        await broker.publish("x", b"")
    await broker.connect()

    async def handler(d: Delivery) -> None:
        return None

    with pytest.raises(CapabilityNotSupported) as info:
        await broker.subscribe("x", handler, durable="d")
    assert isinstance(info.value, NotImplementedError)
    assert info.value.broker == "memory"
    with pytest.raises(ConfigError):
        await broker.publish("bad.*", b"")
    await broker.close()
    with pytest.raises(StateError, match="closed"):
        await broker.publish("x", b"")


def test_bad_urls() -> None:
    with pytest.raises(ConfigError):
        MemoryBroker("nats://localhost")
    with pytest.raises(ConfigError):
        MemoryBroker("memory://x", max_pending=0)


def test_compiled_patterns_answer_like_matches() -> None:
    import itertools

    from agent_os.amb.subjects import compile_pattern, matches

    subjects = [".".join(p) for n in range(1, 5) for p in itertools.product("abc", repeat=n)]
    patterns = [
        ".".join(p)
        for n in range(1, 5)
        for p in itertools.product(["a", "b", "*", ">"], repeat=n)
        if ">" not in p[:-1]
    ]
    for pattern in patterns:
        match = compile_pattern(pattern)
        assert [bool(match(s)) for s in subjects] == [matches(pattern, s) for s in subjects], pattern


async def test_replies_to_fresh_inbox_subjects_reach_the_inbox_wildcard(closing: Closing) -> None:
    u = memory_url("mb")
    broker = closing(MemoryBroker(u))
    await broker.connect()
    got: list[str] = []

    async def inbox(d: Delivery) -> None:
        got.append(d.subject)

    await broker.subscribe(broker.inbox_prefix() + ".>", inbox)
    for i in range(50):
        await broker.publish(f"{broker.inbox_prefix()}.{i:x}", b"r")
    await broker.publish(broker.inbox_prefix(), b"not under the inbox")
    await broker.publish(f"{broker.inbox_prefix()}.end", b"r")  # after anything published before it
    await wait_until(lambda: got[-1:] == [f"{broker.inbox_prefix()}.end"], what="the last reply")
    assert got == [f"{broker.inbox_prefix()}.{i:x}" for i in range(50)] + [f"{broker.inbox_prefix()}.end"]
    await broker.close()


async def test_a_stray_cancelled_error_from_a_handler_does_not_end_the_subscription(closing: Closing) -> None:
    """A handler that lets out the CancelledError of something it awaited, its own task not
    being cancelled: counted like any handler error; the next message is still delivered."""
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    handled: list[bytes] = []

    async def handler(d: Delivery) -> None:
        if d.data == b"1":
            other = asyncio.get_running_loop().create_future()
            other.cancel()
            await other
        handled.append(d.data)

    sub = await broker.subscribe("cancel.x", handler)
    for data in (b"1", b"2", b"3"):
        await broker.publish("cancel.x", data)
    await wait_until(lambda: handled == [b"2", b"3"], what="the later messages")
    assert sub.handler_errors == 1  # type: ignore[attr-defined]
    await broker.close()


async def test_routing_finds_every_matching_subscription_in_subscribe_order(closing: Closing) -> None:
    """Plain subscriptions and queue groups among many others, each subject routed to what
    matches it (in the order subscribed), and nothing left of them in the server once gone."""
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    got: list[tuple[str, str]] = []

    def recorder(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handler(d: Delivery) -> None:
            got.append((name, d.subject))

        return handler

    # Bystanders first: none matches the subjects below.
    subs = [await broker.subscribe(f"agents.a{i}.*", recorder("bystander")) for i in range(300)]
    subs.append(await broker.subscribe("_INBOX.c1.>", recorder("inbox")))
    subs.append(await broker.subscribe(">", recorder("all")))
    subs.append(await broker.subscribe("_INBOX.*.7", recorder("sevens"), queue="q"))
    subs.append(await broker.subscribe("_INBOX.*.7", recorder("sevens"), queue="q"))
    subs.append(await broker.subscribe("_INBOX.c1.7", recorder("exact")))
    for n in range(10):  # subjects never routed before, as reply subjects are
        await broker.publish(f"_INBOX.c1.{n}", b"")
    await wait_until(lambda: len(got) == 10 + 10 + 1 + 1)
    by_subject: dict[str, list[str]] = {}
    for name, subject in got:
        by_subject.setdefault(subject, []).append(name)
    assert by_subject["_INBOX.c1.3"] == ["inbox", "all"]
    assert sorted(by_subject["_INBOX.c1.7"]) == sorted(["inbox", "all", "sevens", "exact"])
    server = memory_server(broker.server_name)
    assert server is not None
    assert [type(t).__name__ for t in server.route("_INBOX.c1.7")] == [
        "_MemorySubscription",
        "_MemorySubscription",
        "_QueueGroup",
        "_MemorySubscription",
    ]
    for sub in subs:
        await sub.unsubscribe()
    assert len(server._index) == 0
    assert server.route("_INBOX.c1.7") == ()
    await broker.close()


async def test_a_publish_waiting_for_room_skips_a_group_emptied_meanwhile(closing: Closing) -> None:
    """A publish parked on a full queue goes on to the rest of its route: a queue group whose
    last member left meanwhile is skipped (not a ZeroDivisionError), and is not counted as
    routed to."""
    broker = closing(MemoryBroker(memory_url("mb"), max_pending=1))
    await broker.connect()
    release = asyncio.Event()
    got: list[bytes] = []

    async def blocked(d: Delivery) -> None:
        await release.wait()
        got.append(d.data)

    async def member(d: Delivery) -> None:
        return None

    await broker.subscribe("g.x", blocked)  # first in the route
    leaving = await broker.subscribe("g.x", member, queue="q")
    server = memory_server(broker.server_name)
    assert server is not None
    await broker.publish("g.x", b"0")  # in the handler
    await broker.publish("g.x", b"1")  # queued: the queue is full
    routed = server.stats.routed
    parked = asyncio.create_task(broker.publish("g.x", b"2"))
    await wait_until(lambda: server.stats.published == 3, what="the third publish parked")
    await leaving.unsubscribe()
    release.set()
    await asyncio.wait_for(parked, 5)
    await wait_until(lambda: got == [b"0", b"1", b"2"])
    assert server.stats.routed == routed + 1  # the plain subscription only
    await broker.close()


async def test_a_refused_subject_is_not_counted_as_published(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    server = memory_server(broker.server_name)
    assert server is not None
    for bad in ("a..b", "a.*", "", "x" * 2000):
        with pytest.raises(ConfigError):
            await broker.publish(bad, b"x")
    assert server.stats.published == 0
    await broker.publish("fine.x", b"x")
    assert server.stats.published == 1
    assert server.stats.no_subscribers == 1
    await broker.close()


async def test_a_queue_group_member_leaving_during_the_wait_passes_the_message_on(closing: Closing) -> None:
    """Both members of a group are full and a publish waits for room: one member leaves, and
    the message goes to the other once it has room (it is not lost while a member remains),
    routed once."""
    broker = closing(MemoryBroker(memory_url("mb"), max_pending=1))
    await broker.connect()
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def member(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(d: Delivery) -> None:
            await gates[name].wait()
            got[name].append(d.data)

        return handle

    leaving = await broker.subscribe("qg.w", member("a"), queue="g")
    await broker.subscribe("qg.w", member("b"), queue="g")
    server = memory_server(broker.server_name)
    assert server is not None
    for i in range(4):  # each member: one in its handler, one queued
        await asyncio.wait_for(broker.publish("qg.w", str(i).encode()), 2)
    routed = server.stats.routed
    parked = asyncio.create_task(broker.publish("qg.w", b"w"))
    await wait_until(lambda: server.stats.published == 5, what="the fifth publish parked")
    # Unsubscribing stops the member at once (its handler in progress is waited for).
    unsubscribing = asyncio.create_task(leaving.unsubscribe())
    await asyncio.sleep(0)
    assert not parked.done()  # the other member is still full
    gates["b"].set()
    await asyncio.wait_for(parked, 5)
    await wait_until(lambda: got["b"] == [b"1", b"3", b"w"], what="the message at the member that stayed")
    assert server.stats.routed == routed + 1
    gates["a"].set()
    await asyncio.wait_for(unsubscribing, 5)
    assert got["a"] == [b"0"]  # the one in its handler; the queued one is dropped with it
    await broker.close()


async def test_a_member_joining_a_full_group_takes_a_waiting_publish(closing: Closing) -> None:
    """Every member of a group is stuck and full: a member that joins takes the publish
    waiting for room at once, without waiting for the stuck ones."""
    broker = closing(MemoryBroker(memory_url("mb"), max_pending=1))
    await broker.connect()
    gate = asyncio.Event()
    stuck: list[bytes] = []
    joined: list[bytes] = []

    async def stuck_handler(d: Delivery) -> None:
        await gate.wait()
        stuck.append(d.data)

    async def joined_handler(d: Delivery) -> None:
        joined.append(d.data)

    await broker.subscribe("qg.j", stuck_handler, queue="g")
    await broker.publish("qg.j", b"0")  # in the handler
    await broker.publish("qg.j", b"1")  # queued: full
    parked = asyncio.create_task(broker.publish("qg.j", b"2"))
    await asyncio.sleep(0)
    assert not parked.done()
    await broker.subscribe("qg.j", joined_handler, queue="g")
    await asyncio.wait_for(parked, 5)
    await wait_until(lambda: joined == [b"2"], what="the waiting publish at the new member")
    assert stuck == []
    gate.set()
    await broker.close()


async def test_a_stuck_group_member_does_not_hold_a_publish_the_others_can_take(closing: Closing) -> None:
    """Every member of a group is full, one of them stuck for good: a publish waiting for
    room goes to the first member that has some, and leaves no waiter behind in the stuck
    member's queue (publishes that waited there would pile up)."""
    broker = closing(MemoryBroker(memory_url("mb"), max_pending=1))
    await broker.connect()
    stuck_gate, slow_gate = asyncio.Event(), asyncio.Event()
    stuck: list[bytes] = []
    slow: list[bytes] = []

    async def stuck_handler(d: Delivery) -> None:
        await stuck_gate.wait()
        stuck.append(d.data)

    async def slow_handler(d: Delivery) -> None:
        await slow_gate.wait()
        slow.append(d.data)

    first = await broker.subscribe("qg.s", stuck_handler, queue="g")
    second = await broker.subscribe("qg.s", slow_handler, queue="g")
    assert isinstance(first, _MemorySubscription)
    assert isinstance(second, _MemorySubscription)
    for i in range(4):  # each member: one in its handler, one queued
        await asyncio.wait_for(broker.publish("qg.s", str(i).encode()), 2)
    assert not first.has_room()
    assert not second.has_room()
    parked = [asyncio.create_task(broker.publish("qg.s", f"w{i}".encode())) for i in range(3)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in parked)
    slow_gate.set()  # the second member drains; the first stays stuck
    await asyncio.wait_for(asyncio.gather(*parked), 5)
    await wait_until(lambda: len(slow) == 5, what="the second member's two and the three parked")
    assert sorted(slow[2:]) == [b"w0", b"w1", b"w2"]
    assert stuck == []
    assert len(first.dispatcher._putters) == 0  # no waiter left behind
    stuck_gate.set()
    await broker.close()


@pytest.mark.parametrize("queue", [None, "g"], ids=["plain", "group"])
async def test_a_waiter_cancelled_after_its_wake_up_passes_the_room_on(
    closing: Closing, queue: str | None
) -> None:
    """Two publishes wait for room; the first is woken and cancelled before it runs (a
    ``wait_for`` timing out): the room it was woken for goes to the second."""
    broker = closing(MemoryBroker(memory_url("mb"), max_pending=1))
    await broker.connect()
    first_gate, forever = asyncio.Event(), asyncio.Event()
    waiters: list[asyncio.Task[None]] = []

    async def handler(d: Delivery) -> None:
        if d.data == b"0":
            await first_gate.wait()
        elif d.data == b"1":
            waiters[0].cancel()  # woken by this item leaving the queue: cancelled at once
            await forever.wait()  # stuck from here on

    sub = await broker.subscribe("cw.x", handler, queue=queue)
    assert isinstance(sub, _MemorySubscription)
    await broker.publish("cw.x", b"0")
    await wait_until(lambda: sub.dispatcher.busy, what="the first message in its handler")
    await broker.publish("cw.x", b"1")  # queued: full
    waiters.append(asyncio.create_task(broker.publish("cw.x", b"w1")))
    await asyncio.sleep(0)
    waiters.append(asyncio.create_task(broker.publish("cw.x", b"w2")))
    await asyncio.sleep(0)
    first_gate.set()
    await asyncio.wait_for(waiters[1], 5)  # parked for good before the fix
    assert waiters[0].cancelled()
    assert len(sub.dispatcher._putters) == 0
    forever.set()
    await broker.close()


@pytest.mark.parametrize("queue", [None, "g"], ids=["plain", "group"])
async def test_a_waiter_whose_item_is_handled_inline_passes_the_room_on(
    closing: Closing, queue: str | None
) -> None:
    """A woken publish whose item the handler takes inline (an InstantHandler, as the reply
    inbox is) uses no room: the next waiting publish gets it."""
    broker = closing(MemoryBroker(memory_url("mb"), max_pending=1))
    await broker.connect()
    gate = asyncio.Event()
    inline = False
    got: list[bytes] = []

    async def call(d: Delivery) -> None:
        if d.data == b"0":
            await gate.wait()
        got.append(d.data)

    def now(d: Delivery) -> bool:
        if inline:
            got.append(d.data)
        return inline

    await broker.subscribe("iw.x", InstantHandler(call, now), queue=queue)
    await broker.publish("iw.x", b"0")
    await asyncio.sleep(0)  # the runner is in call(0)
    await broker.publish("iw.x", b"1")  # queued: full
    first = asyncio.create_task(broker.publish("iw.x", b"2"))
    await asyncio.sleep(0)
    second = asyncio.create_task(broker.publish("iw.x", b"3"))
    await asyncio.sleep(0)
    inline = True
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)  # the second parked for good before
    await wait_until(lambda: sorted(got) == [b"0", b"1", b"2", b"3"], what="all four")
    await broker.close()


async def test_reply_subjects_route_as_the_index_does_whatever_else_is_subscribed(closing: Closing) -> None:
    """Reply subjects are not cached: a client's inbox is found by the subject's head while no
    other pattern could match under _INBOX. (``MemoryServer.route_miss``). Whatever else is
    subscribed, each route is the index's answer, and an invalid reply subject is refused."""
    u = memory_url("mb")
    broker = closing(MemoryBroker(u))
    other = closing(MemoryBroker(u))
    await broker.connect()
    await other.connect()
    server = memory_server(broker.server_name)
    assert server is not None
    inbox, elsewhere = broker.inbox_prefix(), other.inbox_prefix()

    async def nothing(d: Delivery) -> None:
        return None

    subjects = [
        f"{inbox}.5",
        f"{inbox}.ab12",
        f"{inbox}.a.b",
        f"{inbox}.a-b",
        f"{inbox}.\u00e9t\u00e9",
        f"{elsewhere}.5",
        "_INBOX.zz.1",
        "_INBOX.x",
    ]
    invalid = [
        f"{inbox}.a b",
        f"{inbox}.*",
        f"{inbox}.>",
        f"{inbox}..x",
        f"{inbox}.{'x' * 1100}",
        f"{inbox}.a\x00",
    ]

    def check() -> None:
        for subject in subjects:
            assert server.route(subject) == tuple(server._index.match(subject)), subject
        for subject in invalid:
            with pytest.raises(ConfigError):
                server.route(subject)
        assert not any(s.startswith("_INBOX.") for s in server._routes), "reply subjects are not cached"

    mine = await broker.subscribe(inbox + ".>", nothing)
    assert server._inboxes == {inbox: mine}
    assert server._shadows == 0
    check()
    assert server.route(f"{inbox}.5") == (mine,)
    shadows: list[tuple[MemoryBroker, str, str | None]] = [
        (other, ">", None),
        (other, "*.>", None),
        (other, "_INBOX.>", None),
        (other, "_INBOX.*.*", None),
        (other, "*.*.a", None),
        (other, inbox + ".>", None),  # another client's subscription to this inbox
        (broker, inbox + ".>", None),  # the same client's second one
        (broker, inbox + ".*", None),
        (other, inbox + ".>", "group"),
    ]
    taken = []
    for client, pattern, queue in shadows:
        sub = await client.subscribe(pattern, nothing, queue=queue)
        taken.append(sub)
        assert server._shadows == 1, pattern
        check()
        await sub.unsubscribe()
        assert server._shadows == 0, pattern
        check()
    for client, pattern, queue in shadows:  # all at once, then gone one by one
        taken.append(await client.subscribe(pattern, nothing, queue=queue))
    check()
    for sub in taken[len(shadows) :]:
        await sub.unsubscribe()
        check()
    assert server._shadows == 0
    await mine.unsubscribe()
    assert server._inboxes == {}
    check()
    await other.close()
    await broker.close()


@pytest.mark.parametrize("bad", [5, 1.5, None, b"a.b", ["_INBOX.x.1"]])
async def test_a_subject_that_is_not_a_string_is_refused_with_a_config_error(
    closing: Closing, bad: object
) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    with pytest.raises(ConfigError):
        await broker.publish(bad, b"x")  # type: ignore[arg-type]


async def test_a_subscription_closed_with_a_backlog_is_collected() -> None:
    # Deliveries are not traversed by the garbage collector: a strong reference from them to
    # their dispatcher would keep the cycle the cancelled runner leaves (task, traceback,
    # frame holding a delivery, dispatcher) alive for good.
    gate = asyncio.Event()

    async def stuck(message: object, metadata: object) -> None:
        await gate.wait()

    client = AMB("memory", memory_url("mb"))
    try:
        sub = await client.subscribe("gone.x", stuck)
        for i in range(50):
            await client.publish("gone.x", i)
        gone = weakref.ref(sub._broker_sub.dispatcher)  # type: ignore[union-attr]

        def queued() -> int:
            dispatcher = gone()
            assert dispatcher is not None
            return len(dispatcher)

        await wait_until(lambda: queued() == 49, what="the handler stuck, the rest queued")
    finally:
        await client.close(timeout=0.05)  # the stuck handler is cancelled
    assert queued() == 0
    del sub, client
    gc.collect()
    assert gone() is None


async def _collecting(
    closing: Closing, pattern: str
) -> tuple[MemoryBroker, BrokerSubscription, list[Delivery]]:
    """A connected broker, its subscription to ``pattern`` and the deliveries it collects."""
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    got: list[Delivery] = []

    async def handler(d: Delivery) -> None:
        got.append(d)

    return broker, await broker.subscribe(pattern, handler), got


async def test_a_publish_carries_bytes(closing: Closing) -> None:
    broker, _, got = await _collecting(closing, "bytes.x")
    buffer = bytearray(b"first")
    await broker.publish("bytes.x", buffer)  # type: ignore[arg-type]
    buffer[:] = b"later"  # the message was copied when published
    await broker.publish("bytes.x", memoryview(b"view"))  # type: ignore[arg-type]
    for bad in (5, "text", None, [1, 2], object()):
        with pytest.raises(ConfigError, match="bytes"):
            await broker.publish("bytes.x", bad)  # type: ignore[arg-type]
    await wait_until(lambda: len(got) == 2)
    assert [(type(d.data), d.data) for d in got] == [(bytes, b"first"), (bytes, b"view")]
    assert broker.server.stats.published == 2


async def test_memory_deliveries_are_local_deliveries_of_what_was_published(closing: Closing) -> None:
    broker, sub, got = await _collecting(closing, "built.x")
    await broker.publish("built.x", b"payload")
    await wait_until(lambda: len(got) == 1)
    delivery = got[0]
    assert type(delivery) is LocalDelivery
    assert (delivery.subject, delivery.data, delivery.attempt) == ("built.x", b"payload", 1)
    assert delivery.extra == {}
    assert delivery.owner.dispatcher is sub.dispatcher  # type: ignore[attr-defined]
    await delivery.nack()  # and it works as one: handed back with the next attempt
    await wait_until(lambda: len(got) == 2)
    assert (got[1].data, got[1].attempt) == (b"payload", 2)


async def test_routes_are_keyed_by_plain_text_never_by_the_callers_object(closing: Closing) -> None:
    from collections import UserString

    from tests.support.strings import LooseStr

    broker, _, got = await _collecting(closing, ">")
    await broker.publish("t.x", b"1")  # routed and cached
    with pytest.raises(ConfigError):
        await broker.publish(UserString("t.x"), b"2")  # type: ignore[arg-type]
    await broker.publish(LooseStr("t.x"), b"3")  # a str subclass: sent as its text
    with pytest.raises(ConfigError):
        await broker.publish("t x", b"4")  # equal to the subclass by its __eq__, not a subject
    await wait_until(lambda: len(got) == 2)
    assert [(type(d.subject), d.subject, d.data) for d in got] == [(str, "t.x", b"1"), (str, "t.x", b"3")]


async def test_a_first_deliverys_extra_is_read_only(closing: Closing) -> None:
    broker = closing(MemoryBroker(memory_url("mb")))
    await broker.connect()
    got: list[Delivery] = []
    refused: list[Exception] = []

    async def handler(d: Delivery) -> None:
        try:
            d.extra["mine"] = 1  # type: ignore[index]
        except TypeError as exc:
            refused.append(exc)
        got.append(d)

    await broker.subscribe("ro.x", handler)
    for data in (b"1", b"2"):
        await broker.publish("ro.x", data)
    await wait_until(lambda: len(got) == 2)
    assert len(refused) == 2
    assert [dict(d.extra) for d in got] == [{}, {}]
