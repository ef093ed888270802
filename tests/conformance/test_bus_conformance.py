"""One suite, every broker: the behaviour the bus promises, checked against a real server.

Capabilities an adapter does not declare are skipped by flag, with a reason naming the adapter.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import pytest

from agent_os.amb import AMB, LifecycleState, Metadata, RemoteError, RequestTimeout, decode
from agent_os.amb.deadletter import DLQ_ATTEMPTS, DLQ_REASON, DLQ_SUBJECT
from tests.support import Collector, wait_until
from tests.support.brokers import AmbFactory, requires

PAYLOADS: list[Any] = [
    {"task_id": "task_123", "priority": "high", "nested": {"list": [1, 2.5, None, True]}},
    [1, "two", b"\x00\x01bytes"],
    "plain text ✓",
    b"\x00\xffraw bytes",
    12345678901234,
    None,
]


async def test_publish_subscribe_roundtrip(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory(agent_id="producer")
    sub = await amb_factory(agent_id="consumer")
    got = Collector()
    await sub.subscribe(f"{subject}.tasks", got)
    before = time.time_ns()
    ids = [await pub.publish(f"{subject}.tasks", p, headers={"content-type": "test"}) for p in PAYLOADS]
    await got.wait_for(len(PAYLOADS))
    assert got.messages == PAYLOADS
    meta = got.metadata[0]
    assert [m.id for m in got.metadata] == ids
    assert meta.sender == "producer"
    assert meta.topic == f"{subject}.tasks"
    assert meta.subject == f"{subject}.tasks"
    assert meta.headers["content-type"] == "test"
    assert meta.attempt == 1
    assert not meta.redelivered
    assert before <= meta.timestamp <= time.time_ns()


async def test_sender_id_overrides_default(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory(agent_id="default-sender")
    got = Collector()
    await client.subscribe(f"{subject}.x", got)
    await client.publish(f"{subject}.x", 1, sender_id="coordinator")
    await got.wait_for(1)
    assert got.metadata[0].sender == "coordinator"


async def test_wildcards(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    requires(client, "wildcards")
    one, rest, exact = Collector(), Collector(), Collector()
    await client.subscribe(f"{subject}.tasks.*", one)
    await client.subscribe(f"{subject}.tasks.>", rest)
    await client.subscribe(f"{subject}.tasks.a", exact)
    for s in ("tasks.a", "tasks.b", "tasks.a.deep", "tasks", "other.a"):
        await client.publish(f"{subject}.{s}", s)
    await client.publish(f"{subject}.tasks.end", "end")
    await rest.wait_for(4)
    await one.wait_for(3)
    await exact.wait_for(1)
    await asyncio.sleep(0.05)  # a quiet period, not a wait: a misrouted message would come in it
    assert one.messages == ["tasks.a", "tasks.b", "end"]
    assert rest.messages == ["tasks.a", "tasks.b", "tasks.a.deep", "end"]
    assert exact.messages == ["tasks.a"]
    assert [m.subject for m in rest.metadata] == [f"{subject}.tasks.{t}" for t in ("a", "b", "a.deep", "end")]


async def test_fan_out_in_order(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    subscribers = [await amb_factory() for _ in range(3)]
    collectors = [Collector() for _ in subscribers]
    for client, got in zip(subscribers, collectors, strict=True):
        await client.subscribe(f"{subject}.events", got)
    for i in range(300):
        await pub.publish(f"{subject}.events", i)
    for got in collectors:
        await got.wait_for(300)
        assert got.messages == list(range(300))


async def test_queue_group_delivers_each_message_once(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    requires(pub, "queue_groups")
    members = [Collector() for _ in range(3)]
    for got in members:
        worker = await amb_factory()
        await worker.subscribe(f"{subject}.work", got, queue="workers")
    outsider = Collector()
    await (await amb_factory()).subscribe(f"{subject}.work", outsider)
    for i in range(90):
        await pub.publish(f"{subject}.work", i)
    await outsider.wait_for(90)
    await wait_until(lambda: sum(len(m.messages) for m in members) >= 90, what="90 deliveries to the group")
    await asyncio.sleep(0.05)  # a quiet period, not a wait: a duplicate would come in it
    delivered = sorted(x for m in members for x in m.messages)
    assert delivered == list(range(90)), "each message goes to exactly one member"
    assert sum(1 for m in members if m.messages) >= 2, "work is spread over the members"


async def test_content_filters(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    equal, member, predicate, nested = Collector(), Collector(), Collector(), Collector()
    await client.subscribe(
        f"{subject}.tasks.*", equal, filter={"priority": "high", "department": "analytics"}
    )
    await client.subscribe(f"{subject}.tasks.*", member, filter={"priority": ["high", "urgent"]})
    await client.subscribe(
        f"{subject}.tasks.*", predicate, filter=lambda m: isinstance(m, dict) and m.get("n", 0) > 2
    )
    await client.subscribe(
        f"{subject}.tasks.*", nested, filter={"user.role": "admin", "n": lambda n: n % 2 == 0}
    )
    messages = [
        {"n": 1, "priority": "high", "department": "analytics"},
        {"n": 2, "priority": "urgent", "user": {"role": "admin"}},
        {"n": 3, "priority": "low", "department": "analytics"},
        {"n": 4, "priority": "high", "department": "sales", "user": {"role": "admin"}},
        "not a dict",
    ]
    for m in messages:
        await client.publish(f"{subject}.tasks.process", m)
    await client.publish(f"{subject}.tasks.process", {"n": 99, "priority": "high", "department": "analytics"})
    await equal.wait_for(2)
    await member.wait_for(4)
    await predicate.wait_for(3)
    await nested.wait_for(2)
    # Every subscription sees all six messages: each one not delivered is counted as filtered.
    await wait_until(
        lambda: client.stats.filtered >= 4 + 2 + 3 + 4, what="every message filtered or delivered"
    )
    assert [m["n"] for m in equal.messages] == [1, 99]
    assert [m["n"] for m in member.messages] == [1, 2, 4, 99]
    assert [m["n"] for m in predicate.messages] == [3, 4, 99]
    assert [m["n"] for m in nested.messages] == [2, 4]
    assert client.stats.filtered == 4 + 2 + 3 + 4


async def test_request_reply(amb_factory: AmbFactory, subject: str) -> None:
    requester = await amb_factory(agent_id="asker")
    responder = await amb_factory(agent_id="status-service")

    @responder.subscribe(f"{subject}.agents.status")
    async def status(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to
        await responder.reply(metadata, {"agent_id": message["agent_id"], "state": "running"})

    # The decorator's subscription is active before the responder's next publish.
    await responder.publish(f"{subject}.warmup", None)
    reply, meta = await requester.request(
        f"{subject}.agents.status", {"agent_id": "agent_123"}, timeout=5.0, with_metadata=True
    )
    assert reply == {"agent_id": "agent_123", "state": "running"}
    assert meta.sender == "status-service"
    assert meta.correlation_id is not None


async def test_concurrent_requests_get_their_own_replies(amb_factory: AmbFactory, subject: str) -> None:
    requester = await amb_factory()
    responder = await amb_factory()

    async def double(message: Any, metadata: Metadata) -> None:
        await asyncio.sleep(0.001 * (message % 5))
        await responder.reply(metadata, message * 2)

    await responder.subscribe(f"{subject}.double", double, concurrency=8)
    results = await asyncio.gather(*(requester.request(f"{subject}.double", i, timeout=5) for i in range(50)))
    assert results == [i * 2 for i in range(50)]


async def test_request_timeout(amb_factory: AmbFactory, subject: str) -> None:
    requester = await amb_factory()
    silent = await amb_factory()

    async def ignore(message: Any, metadata: Metadata) -> None:
        return None

    await silent.subscribe(f"{subject}.silent", ignore)
    start = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        await requester.request(f"{subject}.silent", "hello?", timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.29 <= elapsed < 2.0
    assert info.value.topic == f"{subject}.silent"
    assert isinstance(info.value, TimeoutError)
    assert requester.stats.request_timeouts == 1
    with pytest.raises(RequestTimeout):
        await requester.request(f"{subject}.nobody-listens", 1, timeout=0.2)


async def test_failing_responder_raises_remote_error(amb_factory: AmbFactory, subject: str) -> None:
    requester = await amb_factory()
    responder = await amb_factory()

    async def broken(message: Any, metadata: Metadata) -> None:
        raise ValueError("cannot")

    await responder.subscribe(f"{subject}.broken", broken)
    with pytest.raises(RemoteError) as info:
        await requester.request(f"{subject}.broken", 1, timeout=5)
    assert "ValueError" in info.value.reason


async def test_stream(amb_factory: AmbFactory, subject: str) -> None:
    consumer = await amb_factory()
    producer = await amb_factory()
    stream = consumer.stream(f"{subject}.events.>", with_metadata=True)
    await stream.start()
    for i in range(20):
        await producer.publish(f"{subject}.events.realtime", {"seq": i})
    received = []
    async for message, meta in stream:
        received.append(message["seq"])
        assert meta.topic == f"{subject}.events.realtime"
        if len(received) == 20:
            break
    assert received == list(range(20))
    await stream.aclose()
    await producer.publish(f"{subject}.events.realtime", {"seq": 99})
    assert [item async for item in stream] == [], "a closed stream yields nothing more"


async def test_stream_as_context_manager_yields_payloads(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    async with client.stream(f"{subject}.s", filter={"keep": True}) as stream:
        for i in range(6):
            await client.publish(f"{subject}.s", {"i": i, "keep": i % 2 == 0})
        seen = []
        async for message in stream:
            seen.append(message["i"])
            if len(seen) == 3:
                break
    assert seen == [0, 2, 4]


async def test_closing_a_stream_with_a_full_buffer_ends_it(amb_factory: AmbFactory, subject: str) -> None:
    """aclose() while the buffer is full and the next message waits for room in it (the
    broker's task holds it): it returns at once, and the stream yields nothing more."""
    client = await amb_factory()
    stream = client.stream(f"{subject}.full", buffer=2)
    await stream.start()
    for i in range(6):
        await client.publish(f"{subject}.full", i)
    await wait_until(lambda: client.stats.delivered >= 3, what="two buffered, one waiting for room")
    await asyncio.wait_for(stream.aclose(), 5)
    assert [item async for item in stream] == []


async def test_closing_a_stream_ends_the_reader_waiting_on_it(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    stream = client.stream(f"{subject}.wait")
    await stream.start()
    received: list[Any] = []
    first = asyncio.Event()

    async def read() -> None:
        async for message in stream:
            received.append(message)
            first.set()  # and it waits for the next one

    reader = asyncio.create_task(read())
    try:
        await client.publish(f"{subject}.wait", 1)
        await asyncio.wait_for(first.wait(), 5)
        await asyncio.wait_for(stream.aclose(), 5)
        await asyncio.wait_for(reader, 5)
    finally:
        reader.cancel()
    assert received == [1]


async def test_ttl_expired_messages_are_not_delivered(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    sub = await amb_factory()
    release = asyncio.Event()
    got: list[Any] = []

    async def slow(message: Any, metadata: Metadata) -> None:
        if message == "first":
            await release.wait()
        got.append(message)

    await sub.subscribe(f"{subject}.ttl", slow)
    await pub.publish(f"{subject}.ttl", "first")
    await wait_until(lambda: sub.stats.delivered >= 1, what="the first delivery")
    await pub.publish(f"{subject}.ttl", "short-lived", ttl=0.05)
    await pub.publish(f"{subject}.ttl", "long-lived", ttl=30)
    await asyncio.sleep(0.2)  # the short-lived message expires while it waits behind "first"
    release.set()
    await wait_until(lambda: len(got) == 2 and sub.stats.expired == 1, what="expiry counted")
    assert got == ["first", "long-lived"]


async def test_large_payload(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    limit = client.capabilities.max_payload or 8 * 1024 * 1024
    size = min(512 * 1024, limit - 4096)
    blob = bytes(range(256)) * (size // 256)
    got = Collector()
    await client.subscribe(f"{subject}.big", got)
    await client.publish(f"{subject}.big", {"blob": blob})
    await got.wait_for(1)
    assert got.messages[0]["blob"] == blob


async def test_malformed_bytes_are_dead_lettered_and_subscriber_survives(
    amb_factory: AmbFactory, subject: str
) -> None:
    client = await amb_factory()
    got, dead = Collector(), Collector()
    await client.subscribe(f"{subject}.in", got)
    await client.subscribe(f"_DLQ.{subject}.in", dead)
    garbage = [b"\xc1\xc1\xc1", b"not an envelope", b'{"v": 1, "id": 5}', b"\x9d\x01", b"{"]
    for g in garbage:
        await client.broker.publish(f"{subject}.in", g)
    await client.publish(f"{subject}.in", "still alive")
    await got.wait_for(1)
    await dead.wait_for(len(garbage))
    assert got.messages == ["still alive"]
    assert client.stats.malformed == len(garbage)
    assert sorted(dead.messages) == sorted(garbage), "the original bytes are kept"
    assert {m.headers[DLQ_REASON] for m in dead.metadata} == {"malformed"}
    assert {m.headers[DLQ_SUBJECT] for m in dead.metadata} == {f"{subject}.in"}


async def test_handler_exception_is_dead_lettered_with_reason(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    sub = await amb_factory()
    ok, dead = Collector(), Collector()

    async def handler(message: Any, metadata: Metadata) -> None:
        if message == "poison":
            raise RuntimeError("cannot digest")
        await ok(message, metadata)

    await sub.subscribe(f"{subject}.jobs", handler)
    await pub.subscribe(f"_DLQ.{subject}.jobs", dead)
    for m in ("a", "poison", "b"):
        await pub.publish(f"{subject}.jobs", m)
    await ok.wait_for(2)
    await dead.wait_for(1)
    assert ok.messages == ["a", "b"]
    assert sub.stats.handler_errors == 1
    assert sub.stats.dead_lettered == 1
    headers = dead.metadata[0].headers
    assert headers[DLQ_REASON] == "handler_error"
    assert "cannot digest" in headers["dlq-error"]
    original = decode(dead.messages[0])
    assert original.payload == "poison"
    assert headers["dlq-original-id"] == original.id


async def test_nack_redelivers_until_max_attempts(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    sub = await amb_factory()
    requires(sub, "redelivery")
    attempts: list[int] = []

    async def flaky(message: Any, metadata: Metadata) -> None:
        attempts.append(metadata.attempt)
        if metadata.attempt < 3:
            raise RuntimeError("transient")

    await sub.subscribe(f"{subject}.flaky", flaky, max_attempts=3, retry_delay=0.01)
    await pub.publish(f"{subject}.flaky", "job")
    await wait_until(lambda: sub.stats.handled == 1, what="the third attempt to succeed")
    assert attempts == [1, 2, 3]
    assert sub.stats.retried == 2
    assert sub.stats.dead_lettered == 0


async def test_redelivery_exhausted_is_dead_lettered(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    requires(client, "redelivery")
    dead = Collector()
    await client.subscribe(f"_DLQ.{subject}.always", dead)

    async def always_fails(message: Any, metadata: Metadata) -> None:
        raise RuntimeError("permanent")

    await client.subscribe(f"{subject}.always", always_fails, max_attempts=2, retry_delay=0.01)
    await client.publish(f"{subject}.always", "job")
    await dead.wait_for(1)
    assert dead.metadata[0].headers[DLQ_ATTEMPTS] == "2"
    assert client.stats.handler_errors == 2


async def test_durable_subscription_survives_client_restart(amb_factory: AmbFactory, subject: str) -> None:
    first = await amb_factory()
    requires(first, "durable")
    got = Collector()
    sub = await first.subscribe(f"{subject}.durable", got, durable=f"{subject}-d")
    await sub.drain(5)
    pub = await amb_factory()
    for i in range(10):
        await pub.publish(f"{subject}.durable", i)
    second = await amb_factory()
    await second.subscribe(f"{subject}.durable", got, durable=f"{subject}-d")
    await got.wait_for(10)
    assert sorted(set(got.messages)) == list(range(10))


async def test_ordering_per_key(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    requires(pub, "ordered_per_key")
    seen: dict[str, list[int]] = {}

    async def record(message: Any, metadata: Metadata) -> None:
        seen.setdefault(message["key"], []).append(message["seq"])

    for _ in range(3):
        await (await amb_factory()).subscribe(f"{subject}.ordered", record, queue="ordered")
    for seq in range(50):
        for key in ("k1", "k2", "k3"):
            await pub.publish(f"{subject}.ordered", {"key": key, "seq": seq}, key=key)
    await wait_until(lambda: sum(len(v) for v in seen.values()) >= 150, what="150 deliveries")
    assert all(v == list(range(50)) for v in seen.values())


async def test_concurrency_limit(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    running = 0
    peak = 0
    done = 0

    async def slow(message: Any, metadata: Metadata) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        done += 1

    await client.subscribe(f"{subject}.c", slow, concurrency=4)
    for i in range(20):
        await client.publish(f"{subject}.c", i)
    await wait_until(lambda: done == 20, what="20 handled")
    assert peak == 4


async def test_unsubscribe_stops_delivery(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    got = Collector()
    sub = await client.subscribe(f"{subject}.u", got)
    await client.publish(f"{subject}.u", 1)
    await got.wait_for(1)
    await sub.unsubscribe()
    await client.publish(f"{subject}.u", 2)
    await asyncio.sleep(0.1)
    assert got.messages == [1]


async def test_close_drains_in_flight_and_queued(amb_factory: AmbFactory, subject: str) -> None:
    pub = await amb_factory()
    sub = await amb_factory()
    handled: list[int] = []

    async def slow(message: Any, metadata: Metadata) -> None:
        await asyncio.sleep(0.005)
        handled.append(message)

    await sub.subscribe(f"{subject}.drain", slow)
    for i in range(40):
        await pub.publish(f"{subject}.drain", i)
    await wait_until(lambda: sub.stats.delivered >= 1, what="the first delivery")
    await asyncio.sleep(0.05)  # let the broker hand everything to the subscriber's client
    await sub.close(timeout=10)
    assert handled == list(range(40))


async def test_close_from_inside_a_handler_does_not_wait_for_it(
    amb_factory: AmbFactory, subject: str
) -> None:
    """A handler closes its own client: close() returns at once, not after its timeout (it
    cannot wait for the handler that is waiting for it), and the client is closed."""
    client = await amb_factory()
    closed = asyncio.Event()

    async def closer(message: Any, metadata: Metadata) -> None:
        await client.close(timeout=30)
        closed.set()

    await client.subscribe(f"{subject}.close", closer)
    await client.publish(f"{subject}.close", 1)
    await asyncio.wait_for(closed.wait(), 5)
    assert client.state is LifecycleState.CLOSED


async def test_json_and_msgpack_clients_interoperate(amb_factory: AmbFactory, subject: str) -> None:
    json_client = await amb_factory(serializer="json")
    msgpack_client = await amb_factory(serializer="msgpack")
    a, b = Collector(), Collector()
    await json_client.subscribe(f"{subject}.mixed", a)
    await msgpack_client.subscribe(f"{subject}.mixed", b)
    await json_client.publish(f"{subject}.mixed", {"from": "json", "raw": b"\x00\x01"})
    await msgpack_client.publish(f"{subject}.mixed", {"from": "msgpack"})
    await a.wait_for(2)
    await b.wait_for(2)
    # Two publishers: brokers order messages per publisher, not across publishers.
    expected = [{"from": "json", "raw": b"\x00\x01"}, {"from": "msgpack"}]
    for got in (a, b):
        assert sorted(got.messages, key=lambda m: m["from"]) == expected


async def test_many_handlers_on_one_subject(amb_factory: AmbFactory, subject: str) -> None:
    client = await amb_factory()
    collectors = [Collector() for _ in range(4)]
    for got in collectors:
        await client.subscribe(f"{subject}.shared", got)
    await client.publish(f"{subject}.shared", "x")
    await client.publish(f"{subject}.shared", "end")  # after "x" on every subscription

    def ended(got: Collector) -> bool:
        return got.messages[-1:] == ["end"]

    for got in collectors:
        await wait_until(functools.partial(ended, got), what="the last message")
    assert [c.messages for c in collectors] == [["x", "end"]] * 4


async def test_client_close_fails_pending_requests(amb_factory: AmbFactory, subject: str) -> None:
    requester: AMB = await amb_factory()
    silent = await amb_factory()

    async def never(message: Any, metadata: Metadata) -> None:
        return None

    await silent.subscribe(f"{subject}.never", never)
    pending = asyncio.ensure_future(requester.request(f"{subject}.never", 1, timeout=30))
    await wait_until(lambda: requester.stats.requests == 1, what="the request to be sent")
    await asyncio.sleep(0.05)
    await requester.close()
    with pytest.raises(Exception, match="closed"):
        await pending
