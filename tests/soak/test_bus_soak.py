"""Soak and load tests of the bus against the real servers (``-m slow``; skipped by default).

What they prove that the short conformance tests cannot:

- **Sustained load**: hundreds of thousands of messages from several publishers through a queue
  group of three members and a fan-out subscriber at once: every message reaches the group once
  and the fan-out subscriber once (at least once, duplicates counted, where the group is a
  durable log: Redis Streams, Kafka), in publish order per publisher where the broker promises
  it.
- **Durable delivery under failures**: JetStream and Redis Streams durables whose handlers fail
  at random (seeded, decided per message and attempt): nothing is lost, each message succeeds
  on the attempt its fate says, and the dead letters are exactly the messages that failed all
  ``max_attempts``; nothing stays pending on the server.
- **Resource bounds**: two equal rounds of load and requests on the same clients: the clients'
  internal tables (pending requests, dispatcher queues, timers, background tasks, unacked
  publishes, Kafka offset bookkeeping) are empty after each round, the second round does not
  grow the live Python objects or the process's RSS materially, and closing leaves no task.
- **Request/reply soak**: 20,000 requests with bounded concurrency to a group of responders
  answering out of order: every reply is the request's own, none late, none mismatched, no
  pending entry left.

They share the conformance suite's fixtures (a client factory per broker target that closes its
clients and deletes what the test left on the servers). Figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import Counter
from typing import Any, cast

import pytest

from agent_os.amb import AMB, Metadata, decode
from agent_os.amb.deadletter import DLQ_ATTEMPTS, DLQ_REASON
from tests.support import rss_bytes, wait_until
from tests.support.brokers import TARGETS, AmbFactory, BrokerTarget, requires
from tests.support.servers import REDIS_URL

pytestmark = pytest.mark.slow

PUBLISHERS = 4
# Messages per load run, by broker: what each moves in well under a minute on a small machine.
# Kafka: librdkafka's mock cluster keeps at most 5 MiB per partition and drops the oldest
# records beyond (consumers that lag lose them, as with retention on a real broker); each
# publisher's messages share a key, so a partition can hold 3 of the 4 publishers' records:
# 24,000 messages of about 180 bytes keep any partition under that.
LOAD = {"memory": 300_000, "nats": 300_000, "redis": 100_000, "kafka": 24_000}
LOAD_TIMEOUT = 180.0
# (messages, requests) per round of the resource test; two equal rounds.
ROUND = {
    "memory": (200_000, 40_000),
    "nats": (200_000, 40_000),
    "redis": (20_000, 5_000),
    "kafka": (20_000, 5_000),
}
REQUESTS = 20_000
REQUEST_CONCURRENCY = {"memory": 128, "nats": 128, "redis": 128, "kafka": 256}
DURABLE = {"nats": 100_000, "redis": 50_000}
# How much the second round of the resource test may grow the process's RSS: 8 MiB is 35
# bytes per message and request of a memory or NATS round (the live-object count is the finer
# check). Kafka: the mock cluster lives in this process and keeps the records (about 6 MiB a
# round here, at most 5 MiB per partition).
RSS_SLACK = {"memory": 8 << 20, "nats": 8 << 20, "redis": 8 << 20, "kafka": 16 << 20}
# Redis clients of the resource test: a pool small enough that its connections all open in
# the first round (redis-py opens them as concurrency peaks; each is about 50 live objects).
REDIS_POOL = {"broker_options": {"max_connections": 12}}
SEED = 20240601


def _targets(*names: str) -> list[Any]:
    """The conformance targets called ``names``, with their markers, for parametrizing ``target``."""
    return [
        pytest.param(t, id=t.name, marks=[getattr(pytest.mark, t.marker)] if t.marker else [])
        for t in TARGETS
        if t.name in names
    ]


# -- bookkeeping of deliveries ---------------------------------------------------------------


class Ledger:
    """Deliveries per (publisher, sequence number) to one subscription or one queue group, and
    first deliveries that came out of publish order across the whole of it."""

    def __init__(self, publishers: int, per_publisher: int) -> None:
        self.per_publisher = per_publisher
        self.seen = [bytearray(per_publisher) for _ in range(publishers)]  # saturates at 255
        self._last = [-1] * publishers
        self.out_of_order = 0
        self.deliveries = 0
        self.firsts = 0

    def record(self, p: int, n: int) -> bool:
        """Count a delivery of message ``n`` of publisher ``p``; True when it is its first."""
        self.deliveries += 1
        seen = self.seen[p]
        count = seen[n]
        if count < 255:
            seen[n] = count + 1
        if count:
            return False
        self.firsts += 1
        if n <= self._last[p]:
            self.out_of_order += 1
        self._last[p] = n
        return True

    @property
    def complete(self) -> bool:
        return self.firsts >= len(self.seen) * self.per_publisher

    def missing(self) -> int:
        return sum(s.count(0) for s in self.seen)

    def duplicates(self) -> int:
        return self.deliveries - self.firsts


class Receiver:
    """A handler recording into a ledger (shared by the members of a queue group), checking the
    publish order of its own first deliveries too."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._last = [-1] * len(ledger.seen)
        self.out_of_order = 0
        self.handled = 0
        self.redelivered = 0

    async def __call__(self, message: Any, metadata: Metadata) -> None:
        p, n = message
        self.handled += 1
        if metadata.attempt > 1:
            self.redelivered += 1
        if self.ledger.record(p, n):
            if n <= self._last[p]:
                self.out_of_order += 1
            self._last[p] = n


async def _publish_all(publishers: list[AMB], topic: str, per_publisher: int) -> None:
    """Each publisher sends ``[its index, 0..per_publisher-1]`` in order, all at once."""

    async def run(p: int, client: AMB) -> None:
        for n in range(per_publisher):
            await client.publish(topic, [p, n])

    await asyncio.gather(*(run(p, c) for p, c in enumerate(publishers)))


def _at_least_once_group(target: BrokerTarget) -> bool:
    """Queue groups on a durable log (Redis Streams, Kafka) deliver at least once."""
    return target.name in ("redis", "kafka")


def _report(what: str, **figures: Any) -> None:
    print(f"\nsoak {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def _request_all(requesters: list[AMB], topic: str, count: int, concurrency: int) -> list[str]:
    """Send requests ``0..count-1`` over ``requesters`` with at most ``concurrency`` in flight;
    return what was wrong with any reply (empty when every reply was the request's own)."""
    numbers = iter(range(count))
    wrong: list[str] = []

    async def worker(client: AMB) -> None:
        for n in numbers:  # one iterator shared by the workers: each number is sent once
            reply = await client.request(topic, {"n": n, "from": client.agent_id}, timeout=30)
            if reply.get("n") != n or reply.get("to") != client.agent_id:
                wrong.append(f"request {n} from {client.agent_id} got {reply!r}")

    await asyncio.gather(*(worker(requesters[i % len(requesters)]) for i in range(concurrency)))
    return wrong


async def _answer_requests(responders: list[AMB], topic: str, answered: Counter[str]) -> None:
    """Subscribe ``responders`` as a queue group answering ``topic``: each echoes the request's
    number, up to 8 at once, finishing in a seeded random order (so replies overtake each other)."""
    for i, client in enumerate(responders):
        rng = random.Random(SEED + i)

        async def respond(
            message: Any, metadata: Metadata, client: AMB = client, rng: random.Random = rng
        ) -> None:
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)  # yield to the others: not a wait
            answered[client.agent_id] += 1
            await client.reply(metadata, {"n": message["n"], "to": message["from"]})

        await client.subscribe(topic, respond, queue="responders", concurrency=8)


# -- sustained load ------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_sustained_load_through_a_queue_group_and_a_fan_out_subscriber(
    amb_factory: AmbFactory, subject: str, target: BrokerTarget
) -> None:
    per_publisher = LOAD[target.name] // PUBLISHERS
    total = per_publisher * PUBLISHERS
    topic = f"{subject}.load"
    group, fan_out = Ledger(PUBLISHERS, per_publisher), Ledger(PUBLISHERS, per_publisher)
    members = [Receiver(group) for _ in range(3)]
    watcher = Receiver(fan_out)
    member_clients = []
    for member in members:
        client = await amb_factory()
        requires(client, "queue_groups")
        await client.subscribe(topic, member, queue="workers")
        member_clients.append(client)
    watcher_client = await amb_factory()
    await watcher_client.subscribe(topic, watcher)
    publishers = [await amb_factory(agent_id=f"publisher-{p}") for p in range(PUBLISHERS)]
    ordered_per_key = publishers[0].capabilities.ordered_per_key

    started = time.perf_counter()
    await _publish_all(publishers, topic, per_publisher)
    published = time.perf_counter() - started
    try:
        await wait_until(lambda: group.complete and fan_out.complete, timeout=LOAD_TIMEOUT, what="all")
    except AssertionError as exc:  # the counts when it timed out
        raise AssertionError(
            f"{exc}: the group has {group.firsts} of {total} ({[m.handled for m in members]} per member), "
            f"the fan-out subscriber {fan_out.firsts}"
        ) from None
    elapsed = time.perf_counter() - started
    # Closing drains: whatever else was on its way (a duplicate) arrives before the counts.
    for client in [*member_clients, watcher_client, *publishers]:
        await client.close(timeout=10)

    shares = [m.handled for m in members]
    redelivered = sum(m.redelivered for m in members)
    _report(
        f"load {target.name}",
        messages=total,
        publishers=PUBLISHERS,
        publish_s=f"{published:.1f}",
        all_delivered_s=f"{elapsed:.1f}",
        msg_per_s=f"{total / elapsed:,.0f}",
        group_shares=shares,
        group_duplicates=group.duplicates(),
        group_redelivered=redelivered,
        fan_out_duplicates=fan_out.duplicates(),
    )
    assert fan_out.missing() == 0, "nothing lost to the fan-out subscriber"
    assert group.missing() == 0, "nothing lost to the group"
    assert fan_out.duplicates() == 0, "the fan-out subscriber gets each message once"
    if not _at_least_once_group(target):
        assert group.duplicates() == 0, "each message goes to exactly one member of the group"
    assert all(share > 0 for share in shares), f"work is spread over the members: {shares}"
    assert watcher.out_of_order == 0, "the fan-out subscriber sees each publisher's messages in order"
    assert [m.out_of_order for m in members] == [0, 0, 0], "each member sees them in order"
    if ordered_per_key:  # Kafka: a key's (publisher's) messages are handled in order group-wide
        assert group.out_of_order == 0
    if target.name == "kafka":
        from agent_os.bus_adapters.kafka import KafkaBroker, topic_for
        from tests.support.kafka import committed_offsets

        broker = publishers[0].broker
        assert isinstance(broker, KafkaBroker)
        bootstrap = broker.bootstrap
        offsets = await asyncio.to_thread(
            committed_offsets, bootstrap, f"amb.workers.{topic}", topic_for(topic)
        )
        assert sum(offsets.values()) == total, f"the group committed every offset: {offsets}"
    if target.name == "redis":
        backlog = await _redis_group_backlog(f"amb:queue:workers:{topic}", "workers")
        assert backlog == 0, "every entry of the group's stream was acked and deleted"


async def _redis_group_backlog(key: str, group: str) -> int:
    """Entries a Redis group's stream still holds plus those pending on its consumers: 0 once
    every entry was acked (the adapter deletes an entry when it acks it)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        return int(await r.xlen(key)) + int((await r.xpending(key, group))["pending"])
    finally:
        await r.aclose()


# -- durable delivery under failures -------------------------------------------------------

FAIL_RATE = 0.3  # per attempt: about 2.7% of the messages fail all three attempts
MAX_ATTEMPTS = 3


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", _targets("nats", "redis"), indirect=True)
async def test_durable_consumers_under_random_failures_lose_nothing(
    amb_factory: AmbFactory, subject: str, target: BrokerTarget
) -> None:
    total = DURABLE[target.name]
    topic, durable = f"{subject}.jobs", f"{subject}-jobs"
    rng = random.Random(SEED)
    # Each message's fate per attempt, fixed in advance: the outcome does not depend on which
    # member gets it or when.
    fate = [[rng.random() < FAIL_RATE for _ in range(MAX_ATTEMPTS)] for _ in range(total)]
    expected_dead = {n for n, f in enumerate(fate) if all(f)}
    expected_attempt = {n: f.index(False) + 1 for n, f in enumerate(fate) if not all(f)}
    succeeded: dict[int, list[int]] = {}  # message -> the attempts on which it succeeded
    dead: list[tuple[Any, str, str]] = []

    async def work(message: Any, metadata: Metadata) -> None:
        attempt = metadata.attempt
        if attempt > MAX_ATTEMPTS or fate[message][attempt - 1]:
            raise RuntimeError(f"job {message} fails on attempt {attempt}")
        succeeded.setdefault(message, []).append(attempt)

    async def dead_letter(message: Any, metadata: Metadata) -> None:
        dead.append((decode(message).payload, metadata.headers[DLQ_ATTEMPTS], metadata.headers[DLQ_REASON]))

    watcher = await amb_factory()
    await watcher.subscribe(f"_DLQ.{topic}", dead_letter)
    members = [await amb_factory(agent_id=f"worker-{i}") for i in range(3)]
    subs = []
    for client, concurrency in zip(members, (1, 2, 4), strict=True):
        requires(client, "durable")
        subs.append(
            await client.subscribe(
                topic,
                work,
                durable=durable,
                max_attempts=MAX_ATTEMPTS,
                retry_delay=0.01,
                concurrency=concurrency,
            )
        )
    # On NATS the publisher sends through JetStream with acks (a core publish to a stream is
    # not confirmed and could be dropped under load).
    options = {"broker_options": {"stream_subjects": (topic,)}} if target.name == "nats" else {}
    publisher = await amb_factory(**options)

    started = time.perf_counter()
    for n in range(total):
        await publisher.publish(topic, n)
    published = time.perf_counter() - started
    await wait_until(
        lambda: len(succeeded) + len({d[0] for d in dead}) >= total,
        timeout=180,
        what=f"{total} messages to succeed or be dead-lettered",
    )
    elapsed = time.perf_counter() - started
    broker_sub = subs[0]._broker_sub
    if target.name == "nats":
        from nats.js.api import ConsumerInfo

        from agent_os.bus_adapters.nats import NatsBroker
        from agent_os.bus_adapters.nats._subscriptions import DurableSubscription

        nats_broker = members[0].broker
        assert isinstance(nats_broker, NatsBroker)
        assert isinstance(broker_sub, DurableSubscription)
        jsm = nats_broker.connection.jsm()
        stream = broker_sub.stream

        async def settled() -> bool:
            # nats-py leaves consumer_info's return unannotated; it is a ConsumerInfo.
            info = cast(ConsumerInfo, await jsm.consumer_info(stream, durable))
            return info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0

    else:
        from agent_os.bus_adapters.redis._subscriptions import StreamSubscription

        assert isinstance(broker_sub, StreamSubscription)
        key, group = broker_sub.key, broker_sub.group

        async def settled() -> bool:
            return await _redis_group_backlog(key, group) == 0

    await wait_until(settled, timeout=30, what="the server to hold nothing pending for the durable")
    for client in [*members, publisher, watcher]:
        await client.close(timeout=10)

    duplicates = sum(len(a) - 1 for a in succeeded.values())
    retried = sum(c.stats.retried for c in members)
    expected_retries = sum(a - 1 for a in expected_attempt.values()) + (MAX_ATTEMPTS - 1) * len(expected_dead)
    _report(
        f"durable {target.name}",
        messages=total,
        publish_s=f"{published:.1f}",
        settled_s=f"{elapsed:.1f}",
        msg_per_s=f"{total / elapsed:,.0f}",
        retried=retried,
        dead_letters=len(dead),
        duplicate_successes=duplicates,
        handled_per_member=[c.stats.handled for c in members],
    )
    assert set(succeeded) | expected_dead == set(range(total)), "nothing lost"
    assert not set(succeeded) & expected_dead, "a message whose every attempt fails never succeeds"
    first = {n: attempts[0] for n, attempts in succeeded.items()}
    assert first == expected_attempt, "each message succeeded on the attempt its fate says"
    assert sorted(d[0] for d in dead) == sorted(expected_dead), "dead letters: exactly the exhausted ones"
    assert {(attempts, reason) for _, attempts, reason in dead} == {(str(MAX_ATTEMPTS), "handler_error")}
    assert sum(c.stats.dead_lettered for c in members) == len(expected_dead)
    # Every failed attempt but the last was retried. (Exact: with no crash and every message
    # settled well within ack_wait / claim_min_idle, neither broker has cause to redeliver.)
    assert retried == expected_retries
    assert all(c.stats.handled > 0 for c in members), "every member took part"


# -- resource bounds -------------------------------------------------------------------------


def _live_objects() -> Counter[str]:
    """Objects the garbage collector tracks, by type name, after a full collection."""
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


def _held(client: AMB) -> dict[str, int]:
    """What ``client`` still holds of past traffic; every figure is 0 once all of it settled."""
    held: Counter[str] = Counter()
    held["pending requests"] = len(client._requests)
    held["pending subscription starts"] = len(client._pending_starts)
    held["handler tasks"] = sum(len(s._tasks) for s in client._subs)
    broker: Any = client.broker
    held["adapter background tasks"] = len(getattr(broker, "_background", ()))
    for sub in list(getattr(broker, "_subs", ())):
        d = sub.dispatcher
        held["dispatcher queue"] += len(d)
        held["dispatcher timers"] += len(d._timers)
        held["dispatcher waiting putters"] += len(d._putters)
        held["dispatcher busy"] += int(d.busy)
        held["stream redelivery timers"] += len(getattr(sub, "_timers", ()))
        nats_sub = getattr(sub, "_nats_sub", None)
        if nats_sub is not None:  # messages nats-py received but has not handed over
            held["nats-py pending"] += nats_sub.pending_msgs
        group = getattr(sub, "group", None)
        if group is not None and not isinstance(group, str):  # a Kafka group consumer
            held["kafka keys owned"] += len(group._key_owner)
            held["kafka offsets pending"] += sum(len(q) for q in group._pending.values())
            held["kafka offsets acked ahead"] += sum(len(a) for a in group._acked.values())
    if broker.name == "nats":
        held["unacked durable publishes"] = broker.publish_acks.outstanding
    if broker.name == "redis":
        held["subscribe confirmations"] = len(broker._confirms)
    if broker.name == "kafka":
        held["unacked publishes"] = broker._unacked
    return {k: v for k, v in held.items() if v}


@pytest.mark.timeout(240)
async def test_two_equal_rounds_leave_nothing_behind_and_do_not_grow(
    amb_factory: AmbFactory, subject: str, target: BrokerTarget
) -> None:
    messages, requests = ROUND[target.name]
    per_publisher = messages // PUBLISHERS
    topic, rpc = f"{subject}.round", f"{subject}.rpc"
    before = asyncio.all_tasks()
    ledgers: dict[str, Ledger] = {}

    async def member(message: Any, metadata: Metadata) -> None:
        ledgers["group"].record(*message)

    async def watch(message: Any, metadata: Metadata) -> None:
        ledgers["fan out"].record(*message)

    pool: dict[str, Any] = REDIS_POOL if target.name == "redis" else {}
    members = [await amb_factory(agent_id=f"member-{i}", **pool) for i in range(3)]
    for client in members:
        await client.subscribe(topic, member, queue="workers")
    answered: Counter[str] = Counter()
    await _answer_requests(members, rpc, answered)
    watcher = await amb_factory(**pool)
    await watcher.subscribe(topic, watch)
    publishers = [await amb_factory(agent_id=f"publisher-{p}", **pool) for p in range(PUBLISHERS)]
    requester = await amb_factory(agent_id="requester", **pool)
    clients = [*members, watcher, *publishers, requester]

    async def one_round() -> float:
        ledgers["group"] = Ledger(PUBLISHERS, per_publisher)
        ledgers["fan out"] = Ledger(PUBLISHERS, per_publisher)
        started = time.perf_counter()
        _, wrong = await asyncio.gather(
            _publish_all(publishers, topic, per_publisher),
            _request_all([requester], rpc, requests, REQUEST_CONCURRENCY[target.name]),
        )
        assert wrong == []
        await wait_until(
            lambda: all(ledger.complete for ledger in ledgers.values()),
            timeout=120,
            what="the round's messages",
        )
        # Acks, commits and the last replies trail the handlers by a little.
        await wait_until(lambda: not any(_held(c) for c in clients), timeout=30, what="the clients to settle")
        return time.perf_counter() - started

    rss0, objects0 = rss_bytes(), _live_objects()
    first = await one_round()
    rss1, objects1 = rss_bytes(), _live_objects()
    second = await one_round()
    rss2, objects2 = rss_bytes(), _live_objects()
    for client in clients:
        await client.close(timeout=10)
    left = [t for t in asyncio.all_tasks() if t not in before and t is not asyncio.current_task()]

    mib = 1024 * 1024
    grown = objects2 - objects1
    growth = sum(objects2.values()) - sum(objects1.values())
    _report(
        f"resources {target.name}",
        messages_per_round=messages,
        requests_per_round=requests,
        rounds_s=f"{first:.1f}/{second:.1f}",
        rss_mib=f"{rss0 / mib:.1f} -> {rss1 / mib:.1f} -> {rss2 / mib:.1f}",
        objects=f"{sum(objects0.values())} -> {sum(objects1.values())} -> {sum(objects2.values())}",
        most_grown=grown.most_common(5),
        tasks_left=len(left),
    )
    assert not left, f"tasks left after close: {[t.get_name() for t in left]}"
    assert (
        sum(c.stats.request_timeouts + c.stats.late_replies + c.stats.mismatched_replies for c in clients)
        == 0
    )
    assert sum(answered.values()) == 2 * requests
    # A leak of one object per message or per request would add `requests` objects or more.
    assert growth < requests // 2, (
        f"the second round left {growth} more live objects: {grown.most_common(10)}"
    )
    assert rss2 - rss1 < RSS_SLACK[target.name], (
        f"the second round grew RSS by {(rss2 - rss1) / mib:.1f} MiB (the first by {(rss1 - rss0) / mib:.1f})"
    )


# -- request/reply soak ------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_request_reply_soak_every_reply_is_the_requests_own(
    amb_factory: AmbFactory, subject: str, target: BrokerTarget
) -> None:
    rpc = f"{subject}.rpc"
    responders = [await amb_factory(agent_id=f"responder-{i}") for i in range(3)]
    answered: Counter[str] = Counter()
    await _answer_requests(responders, rpc, answered)
    requesters = [await amb_factory(agent_id=f"requester-{i}") for i in range(2)]
    concurrency = REQUEST_CONCURRENCY[target.name]

    started = time.perf_counter()
    wrong = await _request_all(requesters, rpc, REQUESTS, concurrency)
    elapsed = time.perf_counter() - started
    pending = [len(c._requests) for c in requesters]
    for client in [*requesters, *responders]:
        await client.close(timeout=10)

    stats = [c.stats for c in requesters]
    _report(
        f"request/reply {target.name}",
        requests=REQUESTS,
        in_flight=concurrency,
        elapsed_s=f"{elapsed:.1f}",
        req_per_s=f"{REQUESTS / elapsed:,.0f}",
        answered=dict(answered),
    )
    assert wrong == [], wrong[:5]
    assert sum(s.requests for s in stats) == REQUESTS
    assert [(s.request_timeouts, s.mismatched_replies, s.late_replies) for s in stats] == [(0, 0, 0)] * 2
    assert pending == [0, 0], "no pending request entry left"
    assert sum(answered.values()) == REQUESTS, "each request was answered once"
    assert all(answered[c.agent_id] > 0 for c in responders), f"every responder answered: {answered}"
