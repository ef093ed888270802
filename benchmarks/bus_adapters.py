"""Broker adapter benchmarks: our client on NATS, Redis and Kafka beside the raw client library.

    .venv/bin/python -m benchmarks.bus_adapters [--quick] [--only nats,redis,kafka]
        [--cases tp,json,rr] [--rounds N] [--no-write]

For each broker, in one run:

1. publish -> handler throughput: one ``AMB`` client publishes N 256-byte ``bytes`` payloads on
   a subject, a second ``AMB`` client's plain (non-durable) subscription counts them; beside the
   raw client doing the same work (nats-py ``publish`` + ``subscribe(cb=...)``; redis-py
   ``PUBLISH`` + a pub/sub listener; aiokafka ``AIOKafkaProducer.send`` + ``AIOKafkaConsumer``).
   For NATS and Redis also the raw client sending our msgpack envelope (built, encoded and
   decoded per message), which shows how much of the gap is the envelope rather than the adapter.
2. request/reply latency p50/p99: ``AMB.request`` against an ``AMB`` responder that
   ``reply()``s, beside a raw request/reply (nats-py ``request`` against a raw responder; Redis
   ``PUBLISH`` on a request channel, answered by a ``PUBLISH`` on a per-request reply channel
   the requester is subscribed to; Kafka produce on a request topic, answered on a reply topic).

Needs nats-server on 127.0.0.1:4222 and redis-server on 127.0.0.1:6379; Kafka is librdkafka's
mock cluster (tests/support/kafka.py), started in-process. Every subject is under a prefix unique
to the run; every wait is bounded (asyncio.wait_for), every loop bounded in count and time.
The section "bus_adapters" of benchmarks/RESULTS.md is rewritten with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from agent_os.amb import AMB, Envelope, Metadata, MsgpackSerializer, decode, new_id
from agent_os.amb.envelope import new_id_at
from benchmarks._report import pct, per_round, spread, write_section

PAYLOAD = b"x" * 256
ENCODER = MsgpackSerializer()
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
KAFKA_OPTIONS = "?session_timeout_ms=1500&heartbeat_interval_ms=100&metadata_max_age_ms=200"
WAIT = 60.0  # the longest any single wait may take
RUN = uuid.uuid4().hex[:10]  # every subject of this run lives under bench<RUN>


@dataclass
class Sizes:
    tp: int  # messages per throughput run
    tp_warm: int  # warm-up messages before each throughput run
    rr: int  # request/reply samples
    rr_warm: int  # warm-up requests
    rr_budget: float  # seconds a latency loop may take at most (each side's share of a round)
    blocks: int = 10  # throughput: each run cut into this many blocks, the sides taking turns
    rr_blocks: int = 10  # latency: the same


@dataclass
class Result:
    ours_tp: list[float] = field(default_factory=list)
    raw_tp: list[float] = field(default_factory=list)
    env_tp: list[float] = field(default_factory=list)  # raw client + our envelope (NATS, Redis)
    ours_rr: list[float] = field(default_factory=list)  # latency samples, every round's pooled
    raw_rr: list[float] = field(default_factory=list)
    ours_p50: list[float] = field(default_factory=list)  # each round's p50
    raw_p50: list[float] = field(default_factory=list)
    json_ratios: list[float] = field(default_factory=list)  # NATS: ours (json) / raw + msgspec JSON
    json_env_ratios: list[float] = field(default_factory=list)  # ours (json) / raw sending our fields
    json_ceiling: list[float] = field(default_factory=list)  # raw sending our fields / raw


_subjects = 0


def subject(what: str) -> str:
    global _subjects
    _subjects += 1
    return f"bench{RUN}.{what}{_subjects}"


class Counter:
    """Counts deliveries; ``done`` is set when ``target`` is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()

    def expect(self, n: int) -> None:
        self.count = 0
        self.target = n
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()

    async def wait(self, timeout: float = WAIT) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"got {self.count} of {self.target} messages in {timeout} s") from None


async def timed_burst(
    counter: Counter,
    n: int,
    send: Callable[[], Awaitable[Any]],
    flush: Callable[[], Awaitable[Any]] | None = None,
) -> float:
    """Send ``n`` messages and wait until ``counter`` has seen them all; return msg/s."""
    counter.expect(n)
    deadline = time.monotonic() + WAIT
    start = time.perf_counter()
    for i in range(n):
        await send()
        if i % 1024 == 0 and time.monotonic() > deadline:
            raise TimeoutError(f"publishing {n} messages took over {WAIT} s")
    if flush is not None:
        await asyncio.wait_for(flush(), WAIT)
    await counter.wait()
    return n / (time.perf_counter() - start)


class Correlator:
    """Matches replies to requests by a correlation key (raw request/reply baselines)."""

    def __init__(self) -> None:
        self.pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._ids = iter(range(1 << 62))

    def resolve(self, key: bytes, value: bytes) -> None:
        fut = self.pending.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    async def call(self, prefix: bytes, send: Callable[[bytes], Awaitable[Any]]) -> bytes:
        """``send(key)`` a request under a new key and wait for its reply."""
        key = prefix + f"{next(self._ids):x}".encode()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        try:
            await send(key)
            return await fut
        finally:
            self.pending.pop(key, None)


class Burst:
    """An open throughput side: ``send`` one message; the receiver hits ``counter``."""

    def __init__(
        self,
        counter: Counter,
        send: Callable[[], Awaitable[Any]],
        flush: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.counter = counter
        self.send = send
        self.flush = flush

    async def seconds(self, n: int) -> float:
        """Send ``n`` messages and wait until all were received; the seconds it took."""
        return n / await timed_burst(self.counter, n, self.send, self.flush)


Request = Callable[[], Awaitable[Any]]


async def burst_rates(
    sides: Sequence[AbstractAsyncContextManager[Burst]], n: int, blocks: int
) -> list[float]:
    """Open every side (each warms up as it opens), then run ``blocks`` blocks of ``n // blocks``
    messages on each side in turn; each side's messages a second over its blocks.

    The sides take turns every block, so a host whose speed drifts within a round slows them
    alike (see docs/development.md, "Benchmarks")."""
    async with contextlib.AsyncExitStack() as stack:
        bursts = [await stack.enter_async_context(side) for side in sides]
        gc.collect()
        per = n // blocks
        seconds = [0.0] * len(bursts)
        for _ in range(blocks):
            for i, burst in enumerate(bursts):
                seconds[i] += await burst.seconds(per)
        return [per * blocks / s for s in seconds]


async def latency_samples(
    sides: Sequence[AbstractAsyncContextManager[Request]], sizes: Sizes
) -> list[list[float]]:
    """Open every side, warm each up, then time ``sizes.rr`` requests a side, one at a time, in
    ``sizes.rr_blocks`` blocks taking turns (at most ``sizes.rr_budget`` seconds a side); µs."""
    async with contextlib.AsyncExitStack() as stack:
        requests = [await stack.enter_async_context(side) for side in sides]
        for request in requests:
            for _ in range(sizes.rr_warm):
                await asyncio.wait_for(request(), 10)
        gc.collect()
        samples: list[list[float]] = [[] for _ in requests]
        per = max(1, sizes.rr // sizes.rr_blocks)
        deadline = time.monotonic() + sizes.rr_budget * len(requests)
        for _ in range(sizes.rr_blocks):
            for request, found in zip(requests, samples, strict=True):
                for _ in range(per):
                    t0 = time.perf_counter_ns()
                    await asyncio.wait_for(request(), 10)
                    found.append((time.perf_counter_ns() - t0) / 1000)
            if time.monotonic() > deadline:
                break
        return samples


# -- ours (any backend) ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ours_burst(
    backend: str, url: str, sizes: Sizes, serializer: str = "msgpack", payload: Any = PAYLOAD
) -> AsyncIterator[Burst]:
    """Ours: one client publishes, a second one's plain subscription counts (warmed up)."""
    pub = AMB(backend=backend, connection_string=url, serializer=serializer)
    sub = AMB(backend=backend, connection_string=url)
    counter = Counter()

    async def handler(message: Any, metadata: Metadata) -> None:
        counter.hit()

    try:
        await asyncio.wait_for(pub.connect(), WAIT)
        await asyncio.wait_for(sub.connect(), WAIT)
        topic = subject("tp")
        await asyncio.wait_for(sub.subscribe(topic, handler), WAIT)

        def send() -> Awaitable[str]:
            return pub.publish(topic, payload)

        burst = Burst(counter, send)
        await burst.seconds(sizes.tp_warm)
        yield burst
    finally:
        await pub.close(timeout=5)
        await sub.close(timeout=5)


@contextlib.asynccontextmanager
async def ours_requests(backend: str, url: str) -> AsyncIterator[Request]:
    """Ours: ``AMB.request`` against an ``AMB`` responder that ``reply()``s."""
    requester = AMB(backend=backend, connection_string=url)
    responder = AMB(backend=backend, connection_string=url)

    async def echo(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, message)

    try:
        await asyncio.wait_for(requester.connect(), WAIT)
        await asyncio.wait_for(responder.connect(), WAIT)
        topic = subject("rr")
        await asyncio.wait_for(responder.subscribe(topic, echo), WAIT)
        yield lambda: requester.request(topic, PAYLOAD, timeout=5)
    finally:
        await requester.close(timeout=5)
        await responder.close(timeout=5)


# -- raw NATS ----------------------------------------------------------------------------------


def _message(topic: str, envelope: bool) -> bytes:
    """The bytes a raw baseline sends: the bare payload, or (``envelope``) the same msgpack
    envelope our client sends, built and encoded per message."""
    if not envelope:
        return PAYLOAD
    return ENCODER.encode(Envelope(new_id(), topic, "raw", PAYLOAD, timestamp=time.time_ns(), headers={}))


def _received(data: bytes, envelope: bool) -> None:
    if envelope:
        decode(data)


@contextlib.asynccontextmanager
async def nats_raw_burst(sizes: Sizes, envelope: bool = False) -> AsyncIterator[Burst]:
    """nats-py ``publish`` + ``subscribe(cb=...)`` (warmed up). ``envelope``: encode and decode
    our envelope per message (the client's own cost)."""
    import nats

    pub = await nats.connect(NATS_URL)
    sub = await nats.connect(NATS_URL)
    counter = Counter()

    async def cb(msg: Any) -> None:
        _received(msg.data, envelope)
        counter.hit()

    try:
        topic = subject("rawtp")
        await sub.subscribe(topic, cb=cb)
        await sub.flush()

        def send() -> Awaitable[None]:
            return pub.publish(topic, _message(topic, envelope))

        burst = Burst(counter, send, pub.flush)
        await burst.seconds(sizes.tp_warm)
        yield burst
    finally:
        await pub.close()
        await sub.close()


TEXT = "x" * 256  # the JSON rows' payload: text, since JSON carries bytes as base64

JSON_PROFILE = """JSON serializer, before and after (not rewritten by the script). pyinstrument over
100,000 NATS publish -> handler messages with `serializer="json"` (`ours_throughput`, now `ours_burst`), before
(commit a6156d7): `JsonSerializer.encode_new` 10.5 % of the run (a `typing.Literal[1]` built per
message for a `cast`, an `Envelope` built only to be taken apart, `_to_json` on the empty
headers), the JSON decode 8.8 % (a scan for `"$` over every envelope, a second msgspec encode to
msgpack only to range-check integers) plus msgspec's msgpack decoder refusing every JSON
envelope first (an exception per message). Per message, one core, best of 7 (CPU time):
encode_new 1.87 µs, `Decoder.decode_fields` 2.50 µs (msgpack: 0.58 / 0.37 µs). After: the same
checks where they cost least (scalar fields compared where they are; the `"$` scan and the
msgpack range check only when the headers or a map/list payload can hold what they look for;
input starting with `{` sent to the JSON path directly; structs without GC tracking):
encode_new 0.88 µs, decode_fields 1.27 µs (msgpack 0.57 / 0.42 µs: the first-byte test costs
it about 0.04 µs); in the profile encode_new fell to 3 % of the run. What is left of the JSON
row's gap is not the serializer: raw nats-py sending the same envelope fields with msgspec and no
checks at all runs at about 0.75 of raw nats-py with `{"payload": ...}` (fewer messages per
socket read, an id and a clock read per message), and the msgpack row above shows the same
client overhead. Since 2026-12-06 the JSON envelope leaves out the fields at their defaults
(`recipient` ... `sig` when null, `priority` 0, empty headers): 391 bytes for this message
instead of 501, the JSON row 0.616 -> 0.644 (5 rounds each); the info row's raw baseline sends
what our encoder writes, the six fields of an unaddressed, unsigned message. At 2026-12-07 22:45 that
sender reached 0.796 (0.766-0.871) of raw nats-py with `{"payload": ...}`, the median below
the 0.80 target: on that host the target asks ours for no cost beyond carrying the envelope's
six fields (an id, a clock read and 116 more bytes a message), before any check and any
of the client's work."""


@contextlib.asynccontextmanager
async def nats_raw_json_burst(sizes: Sizes, envelope: bool = False) -> AsyncIterator[Burst]:
    """Raw nats-py sending ``{"payload": TEXT}`` encoded and decoded per message with msgspec's
    JSON, the library our JSON serializer uses. ``envelope``: the fields our JSON envelope
    carries for this message (a new id and timestamp per message; those at their defaults left
    out, as our encoder does), encoded and decoded by msgspec without any of our checks, which
    shows how much of the gap is the envelope's content."""
    import msgspec
    import nats

    encode, decode_json = msgspec.json.Encoder().encode, msgspec.json.Decoder().decode
    pub = await nats.connect(NATS_URL)
    sub = await nats.connect(NATS_URL)
    counter = Counter()

    async def cb(msg: Any) -> None:
        decode_json(msg.data)
        counter.hit()

    try:
        topic = subject("rawjson")
        await sub.subscribe(topic, cb=cb)
        await sub.flush()

        def message() -> bytes:
            if not envelope:
                return encode({"payload": TEXT})
            now = time.time_ns()
            return encode(
                {
                    "v": 1,
                    "id": new_id_at(now),
                    "topic": topic,
                    "sender": "raw",
                    "timestamp": now,
                    "payload": TEXT,
                }
            )

        def send() -> Awaitable[None]:
            return pub.publish(topic, message())

        burst = Burst(counter, send, pub.flush)
        await burst.seconds(sizes.tp_warm)
        yield burst
    finally:
        await pub.close()
        await sub.close()


@contextlib.asynccontextmanager
async def nats_raw_requests() -> AsyncIterator[Request]:
    """nats-py ``request`` against a raw responder."""
    import nats

    requester = await nats.connect(NATS_URL)
    responder = await nats.connect(NATS_URL)

    async def echo(msg: Any) -> None:
        await responder.publish(msg.reply, msg.data)

    try:
        topic = subject("rawrr")
        await responder.subscribe(topic, cb=echo)
        await responder.flush()
        yield lambda: requester.request(topic, PAYLOAD, timeout=5)
    finally:
        await requester.close()
        await responder.close()


# -- raw Redis ---------------------------------------------------------------------------------


async def _redis_listen(
    pubsub: Any, on_message: Callable[[Any], Awaitable[None] | None], stop: asyncio.Event
) -> None:
    """A pub/sub reader: hands each message to ``on_message`` until ``stop`` is set."""
    while not stop.is_set():
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if msg is not None:
            result = on_message(msg)
            if result is not None:
                await result


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    try:
        await asyncio.wait_for(task, 5)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def redis_raw_burst(sizes: Sizes, envelope: bool = False) -> AsyncIterator[Burst]:
    """redis-py ``PUBLISH`` + a pub/sub listener (warmed up). ``envelope``: encode and decode
    our envelope per message (the client's own cost)."""
    import redis.asyncio as aioredis

    pub = aioredis.Redis.from_url(REDIS_URL)
    sub = aioredis.Redis.from_url(REDIS_URL)
    pubsub = sub.pubsub()
    counter = Counter()
    stop = asyncio.Event()
    topic = subject("rawtp")
    await pubsub.subscribe(topic)

    def on_message(msg: Any) -> None:
        _received(msg["data"], envelope)
        counter.hit()

    task = asyncio.create_task(_redis_listen(pubsub, on_message, stop))
    try:

        def send() -> Awaitable[int]:
            return pub.publish(topic, _message(topic, envelope))

        burst = Burst(counter, send)
        await burst.seconds(sizes.tp_warm)
        yield burst
    finally:
        await _stop_task(task, stop)
        await pubsub.aclose()
        await pub.aclose()
        await sub.aclose()


@contextlib.asynccontextmanager
async def redis_raw_requests() -> AsyncIterator[Request]:
    """Request: PUBLISH "<reply channel>|<payload>" on a request channel; the responder PUBLISHes
    the payload on the reply channel, which the requester has subscribed to (one pattern
    subscription over its per-request reply channels)."""
    import redis.asyncio as aioredis

    req_conn = aioredis.Redis.from_url(REDIS_URL)
    resp_conn = aioredis.Redis.from_url(REDIS_URL)
    req_ps, resp_ps = req_conn.pubsub(), resp_conn.pubsub()
    resp_pub = aioredis.Redis.from_url(REDIS_URL)  # a subscribed connection cannot PUBLISH
    channel, inbox = subject("rawrr"), subject("rawinbox")
    replies = Correlator()
    stop = asyncio.Event()

    async def on_request(msg: Any) -> None:
        reply, _, data = msg["data"].partition(b"|")
        await resp_pub.publish(reply, data)

    await req_ps.psubscribe(inbox + ".*")
    await resp_ps.subscribe(channel)
    tasks = [
        asyncio.create_task(
            _redis_listen(req_ps, lambda msg: replies.resolve(msg["channel"], msg["data"]), stop)
        ),
        asyncio.create_task(_redis_listen(resp_ps, on_request, stop)),
    ]

    def request() -> Awaitable[bytes]:
        return replies.call(
            inbox.encode() + b".", lambda key: req_conn.publish(channel, key + b"|" + PAYLOAD)
        )

    try:
        yield request
    finally:
        for task in tasks:
            await _stop_task(task, stop)
        for conn in (req_ps, resp_ps, req_conn, resp_conn, resp_pub):
            await conn.aclose()


# -- raw Kafka ---------------------------------------------------------------------------------


async def _kafka_consumer(bootstrap: str, topic: str, fetch_max_wait_ms: int = 100) -> Any:
    """A consumer of ``topic`` (created beforehand) in its own group, assigned before return;
    ``fetch_max_wait_ms`` as the adapter's (100 on subscriptions, 10 on the reply inbox)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench{RUN}-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=1500,
        heartbeat_interval_ms=100,
        metadata_max_age_ms=200,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await asyncio.wait_for(consumer.start(), WAIT)
    deadline = time.monotonic() + WAIT
    while not consumer.assignment():
        if time.monotonic() > deadline:
            await consumer.stop()
            raise TimeoutError(f"no partition of {topic} assigned in {WAIT} s")
        await asyncio.sleep(0.05)
    return consumer


async def _kafka_producer(bootstrap: str) -> Any:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")  # as the adapter's
    await asyncio.wait_for(producer.start(), WAIT)
    return producer


async def _kafka_drain(
    consumer: Any, on_record: Callable[[Any], Awaitable[None] | None], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                result = on_record(record)
                if result is not None:
                    await result


@contextlib.asynccontextmanager
async def kafka_raw_burst(cluster: Any, bootstrap: str, sizes: Sizes) -> AsyncIterator[Burst]:
    """``send`` pipelines records (as the adapter does); the acknowledgements are awaited at the end."""
    topic = subject("rawtp")
    cluster.create_topic(topic, partitions=4)
    producer = await _kafka_producer(bootstrap)
    consumer = await _kafka_consumer(bootstrap, topic)
    counter = Counter()
    stop = asyncio.Event()
    task = asyncio.create_task(_kafka_drain(consumer, lambda record: counter.hit(), stop))
    acks: list[asyncio.Future[Any]] = []

    async def send() -> None:
        acks.append(await producer.send(topic, PAYLOAD, key=b"bench"))

    async def flush() -> None:
        await asyncio.gather(*acks)
        acks.clear()

    try:
        burst = Burst(counter, send, flush)
        await burst.seconds(sizes.tp_warm)
        yield burst
    finally:
        await _stop_task(task, stop)
        await consumer.stop()
        await producer.stop()


@contextlib.asynccontextmanager
async def kafka_raw_requests(cluster: Any, bootstrap: str) -> AsyncIterator[Request]:
    """Request: a record on the request topic keyed by a correlation id; the responder produces
    the payload on the reply topic with the same key; the requester consumes the reply topic."""
    req_topic, rep_topic = subject("rawrr"), subject("rawreply")
    cluster.create_topic(req_topic, partitions=4)
    cluster.create_topic(rep_topic, partitions=4)
    req_producer = await _kafka_producer(bootstrap)
    resp_producer = await _kafka_producer(bootstrap)
    req_consumer = await _kafka_consumer(bootstrap, req_topic)
    rep_consumer = await _kafka_consumer(bootstrap, rep_topic, fetch_max_wait_ms=10)
    replies = Correlator()
    stop = asyncio.Event()

    async def on_request(record: Any) -> None:
        await resp_producer.send_and_wait(rep_topic, record.value, key=record.key)

    tasks = [
        asyncio.create_task(_kafka_drain(rep_consumer, lambda r: replies.resolve(r.key, r.value), stop)),
        asyncio.create_task(_kafka_drain(req_consumer, on_request, stop)),
    ]

    def request() -> Awaitable[bytes]:
        return replies.call(b"", lambda key: req_producer.send_and_wait(req_topic, PAYLOAD, key=key))

    try:
        yield request
    finally:
        for task in tasks:
            await _stop_task(task, stop)
        for consumer in (req_consumer, rep_consumer):
            await consumer.stop()
        for producer in (req_producer, resp_producer):
            await producer.stop()


# -- the run -----------------------------------------------------------------------------------


CASES = frozenset({"tp", "json", "rr"})  # throughput (+ envelope), the JSON row, request/reply


def sizes_for(backend: str, quick: bool) -> Sizes:
    if backend == "nats":
        return Sizes(20_000, 2_000, 1_000, 200, 5.0) if quick else Sizes(100_000, 10_000, 5_000, 500, 15.0)
    if backend == "redis":
        return Sizes(5_000, 1_000, 1_000, 200, 5.0) if quick else Sizes(20_000, 2_000, 3_000, 300, 15.0)
    # Kafka's throughput runs whole: each block would wait out the consumer's fetch once more.
    if quick:
        return Sizes(1_000, 200, 100, 20, 5.0, blocks=1, rr_blocks=5)
    return Sizes(3_000, 300, 500, 50, 15.0, blocks=1, rr_blocks=5)


async def run_backend(backend: str, quick: bool, repeats: int, cases: frozenset[str] = CASES) -> Result:
    sizes = sizes_for(backend, quick)
    result = Result()
    cluster: Any = None
    raw_env: Callable[[], AbstractAsyncContextManager[Burst]] | None = None
    if backend == "kafka":
        from tests.support.kafka import MockKafkaCluster

        cluster = MockKafkaCluster(brokers=1)
    try:
        raw: Callable[[], AbstractAsyncContextManager[Burst]]
        raw_requests: Callable[[], AbstractAsyncContextManager[Request]]
        if backend == "kafka":
            bootstrap = cluster.bootstrap_servers
            url = f"kafka://{bootstrap}{KAFKA_OPTIONS}"
            raw = functools.partial(kafka_raw_burst, cluster, bootstrap, sizes)
            raw_requests = functools.partial(kafka_raw_requests, cluster, bootstrap)
        else:
            url, burst, raw_requests = (
                (NATS_URL, nats_raw_burst, nats_raw_requests)
                if backend == "nats"
                else (REDIS_URL, redis_raw_burst, redis_raw_requests)
            )
            raw = functools.partial(burst, sizes)
            raw_env = functools.partial(burst, sizes, envelope=True)

        # In each round ours and raw stay connected and take turns in blocks, so drift hits both
        # alike; each round's ratio.
        for _ in range(repeats):
            if "tp" in cases:
                sides: list[AbstractAsyncContextManager[Burst]] = [ours_burst(backend, url, sizes), raw()]
                if raw_env is not None:
                    sides.append(raw_env())
                rates = await burst_rates(sides, sizes.tp, sizes.blocks)
                result.ours_tp.append(rates[0])
                result.raw_tp.append(rates[1])
                if raw_env is not None:
                    result.env_tp.append(rates[2])
                print(
                    f"{backend}: throughput ours {result.ours_tp[-1]:,.0f} raw {result.raw_tp[-1]:,.0f} msg/s",
                    file=sys.stderr,
                )
            if "json" in cases and backend == "nats":
                ours_json, raw_json, raw_json_env = await burst_rates(
                    [
                        ours_burst(backend, url, sizes, "json", TEXT),
                        nats_raw_json_burst(sizes),
                        nats_raw_json_burst(sizes, envelope=True),
                    ],
                    sizes.tp,
                    sizes.blocks,
                )
                result.json_ratios.append(ours_json / raw_json)
                result.json_env_ratios.append(ours_json / raw_json_env)
                result.json_ceiling.append(raw_json_env / raw_json)
                print(
                    f"{backend}: json ours {ours_json:,.0f} raw {raw_json:,.0f} raw with our fields "
                    f"{raw_json_env:,.0f} msg/s ratio {result.json_ratios[-1]:.3f}",
                    file=sys.stderr,
                )
        if "rr" not in cases:
            return result
        # Latency: each round's share of the samples, ours and raw taking turns in blocks.
        rounds = Sizes(
            sizes.tp,
            sizes.tp_warm,
            sizes.rr // repeats,
            sizes.rr_warm,
            sizes.rr_budget / repeats,
            sizes.blocks,
            sizes.rr_blocks,
        )
        for _ in range(repeats):
            ours, raw_samples = await latency_samples([ours_requests(backend, url), raw_requests()], rounds)
            result.ours_rr += ours
            result.raw_rr += raw_samples
            result.ours_p50.append(pct(ours, 50))
            result.raw_p50.append(pct(raw_samples, 50))
            print(
                f"{backend}: p50 ours {result.ours_p50[-1]:,.0f} raw {result.raw_p50[-1]:,.0f} µs",
                file=sys.stderr,
            )
    finally:
        if cluster is not None:
            cluster.close()
    return result


def render(results: dict[str, Result], quick: bool, repeats: int, load: tuple[float, float]) -> str:
    raw_names = {
        "nats": ("nats-py publish + subscribe(cb)", "nats-py request, raw responder"),
        "redis": ("redis-py PUBLISH + pub/sub listener", "PUBLISH + reply channel"),
        "kafka": ("aiokafka send (pipelined) + consumer", "aiokafka produce + reply topic"),
    }
    rows = []
    for backend, r in results.items():
        sizes = sizes_for(backend, quick)
        if r.ours_tp:
            ours = statistics.median(r.ours_tp)
            tp_ratios = per_round(r.ours_tp, r.raw_tp)
            tp_ratio = statistics.median(tp_ratios)
            rows.append(
                f"| {backend} | publish -> handler ({sizes.tp:,} msgs) | {ours:,.0f} msg/s "
                f"| {statistics.median(r.raw_tp):,.0f} msg/s ({raw_names[backend][0]}) "
                f"| {spread(tp_ratios, '.3f')} | >= 0.70 {'ok' if tp_ratio >= 0.70 else 'MISSED'} |"
            )
            if r.env_tp:
                rows.append(
                    f"| {backend} | (same, raw client + our envelope built, encoded, decoded) | {ours:,.0f} msg/s "
                    f"| {statistics.median(r.env_tp):,.0f} msg/s | {spread(per_round(r.ours_tp, r.env_tp), '.3f')} "
                    "| (info: the adapter's and client's own cost) |"
                )
        if r.json_ratios:
            med = statistics.median(r.json_ratios)
            rows.append(
                f'| {backend} | publish -> handler, `serializer="json"`, 256-char text | median of '
                f"{len(r.json_ratios)} per-round ratios | nats-py + msgspec JSON per message "
                f"| {spread(r.json_ratios, '.3f')} | >= 0.80 {'ok' if med >= 0.80 else 'MISSED'} |"
            )
            rows.append(
                f"| {backend} | (raw client + msgspec JSON of our envelope's fields, unchecked) | median "
                f"of {len(r.json_ceiling)} per-round ratios | nats-py + msgspec JSON per message "
                f"| {spread(r.json_ceiling, '.3f')} | (info: what the envelope's content alone leaves) |"
            )
            rows.append(
                f'| {backend} | publish -> handler, `serializer="json"` (as above) | median '
                f"of {len(r.json_env_ratios)} per-round ratios | nats-py + msgspec JSON of our envelope's "
                f"fields, unchecked | {spread(r.json_env_ratios, '.3f')} | (info: our client's cost beyond "
                "the envelope's content) |"
            )
        if r.ours_rr:
            o50, o99, r50, r99 = pct(r.ours_rr, 50), pct(r.ours_rr, 99), pct(r.raw_rr, 50), pct(r.raw_rr, 99)
            rr_ratios = per_round(r.raw_p50, r.ours_p50)
            rr_ratio = statistics.median(rr_ratios)
            target = f">= 0.80 {'ok' if rr_ratio >= 0.80 else 'MISSED'}"
            if backend == "nats":
                target += f"; p50 <= 400 µs {'ok' if o50 <= 400 else 'MISSED'}"
            rows.append(
                f"| {backend} | request/reply p50 / p99 ({len(r.ours_rr):,} / {len(r.raw_rr):,} samples) "
                f"| {o50:,.0f} / {o99:,.0f} µs | {r50:,.0f} / {r99:,.0f} µs ({raw_names[backend][1]}) "
                f"| {spread(rr_ratios, '.3f')} | {target} |"
            )
    table = "\n".join(rows)
    return f"""
Two clients (separate connections) on one event loop, 256-byte bytes payload, msgpack envelope
for ours; NATS and Redis are local servers, Kafka is librdkafka's mock cluster (in-process, one
broker). {repeats} rounds; in each, ours and raw stay connected after a warm-up and take turns
in blocks (10 of each NATS and Redis throughput run and of each latency run, 5 of Kafka's
latency run; Kafka's throughput runs whole, since each block would wait out its consumer's
fetch once more), so a host's drifting speed slows them alike. A ratio is the median of the
per-round ratios, with their range, and a rate the median over rounds. Throughput ratio =
ours / raw. Latency: one request at a time; the p50 and p99 shown are over every round's
samples pooled, the ratio (raw p50 / ours p50) is per round.
Kafka publishes are pipelined on both sides (aiokafka ``send``, acks awaited at the end / by the
adapter's flush on close). The mock answers a Fetch only when its ``fetch_max_wait_ms`` expires,
so a Kafka request/reply costs about one request-consumer wait (100 ms) plus one reply-consumer
wait (10 ms), the same settings on both sides: its ratio reflects the phase of the fetch loops
more than client cost. Ours carries a msgpack envelope (id, sender, timestamps, headers) that
the raw baselines do not encode or decode. The JSON rows: ours with `serializer="json"` and a
256-character text payload against raw nats-py sending `{{"payload": ...}}` in msgspec JSON,
and raw nats-py sending the fields our encoder writes for that message (no checks), the three
taking turns in blocks as above, each ratio the median of per-round ratios with the range:
ours / raw (the target), raw with our fields / raw (what the envelope's content alone leaves
of raw's rate), ours / raw with our fields. 2 cores shared with other work: load
average {load[0]:.1f} before the run, {load[1]:.1f} after.

| broker | measure | ours | raw (same run) | ratio | target |
|---|---|---|---|---|---|
{table}

{JSON_PROFILE}
"""


async def main(quick: bool, only: list[str], cases: frozenset[str], repeats: int, write: bool) -> None:
    results: dict[str, Result] = {}
    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    for backend in only:
        results[backend] = await run_backend(backend, quick, repeats, cases)
    load = (load_before, os.getloadavg()[0])
    body = render(results, quick, repeats, load)
    print(body)
    print(f"total {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if write:
        command = "python -m benchmarks.bus_adapters" + (" --quick" if quick else "") + f" --rounds {repeats}"
        write_section("bus_adapters", command, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    parser.add_argument("--only", default="nats,redis,kafka", help="comma-separated brokers to run")
    parser.add_argument(
        "--cases",
        default=",".join(sorted(CASES)),
        help="comma-separated measures: tp (throughput), json (the JSON row, NATS only), rr (request/reply);"
        " a subset only prints (RESULTS.md keeps the full table)",
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds (default 5; 2 with --quick)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    chosen = frozenset(c for c in args.cases.split(",") if c)
    if not chosen or not chosen <= CASES:
        parser.error(f"--cases: choose from {sorted(CASES)}")
    rounds = args.rounds or (2 if args.quick else 5)
    brokers = [b for b in args.only.split(",") if b]
    write = not args.no_write and chosen == CASES
    asyncio.run(main(args.quick, brokers, chosen, rounds, write))
