"""One measurement of benchmarks/peers.py, run in a process of its own and reported as JSON.

    python benchmarks/_peers_worker.py IMPL BROKER MODE [options]

IMPL is ``ours`` (the AMB client), ``faststream`` or ``raw`` (nats-py, redis-py); BROKER is
``nats`` or ``redis``. It is run by path, not imported, and imports only what its IMPL needs:
FastStream runs from the peers venv (``.venv-peers``), where the project is not installed.

Modes:
- ``single``: publish -> handler throughput (publisher and subscriber in this process, two
  connections), then request/reply latency; prints ``{"tp": msg/s, "p50": µs, "p99": µs}``.
- ``consume``: a queue-group member: prints ``ready`` once subscribed, then counts messages into
  its slot of the counters file ``--counters`` until stopped (SIGTERM).
- ``produce``: connects, prints ``{"start": time.time()}``, then publishes ``--n`` messages.

Every message is the same dict ``{"id": n, "text": 200 characters}``; each implementation
encodes it its own way (ours: a msgpack envelope; FastStream: JSON; raw: msgpack of the dict).
The handler work is the same everywhere: read ``id`` and count (``single``), or ``--work``
rounds of BLAKE2b over 64 bytes and count (``consume``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import mmap
import signal
import statistics
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
TEXT = "x" * 200
WAIT = 60.0


def message(n: int) -> dict[str, Any]:
    return {"id": n, "text": TEXT}


def work(rounds: int) -> None:
    """The CPU work of one queue-group message (the same in every implementation)."""
    digest = b"\0" * 64
    for _ in range(rounds):
        digest = hashlib.blake2b(digest).digest()


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.target = -1
        self.done = asyncio.Event()

    def expect(self, n: int) -> None:
        self.count, self.target, self.done = 0, n, asyncio.Event()

    def hit(self, payload: Any) -> None:
        _ = payload["id"]  # the handler reads the message, as a real one would
        self.count += 1
        if self.count == self.target:
            self.done.set()


async def timed(counter: Counter, n: int, send: Callable[[int], Awaitable[Any]]) -> float:
    counter.expect(n)
    start = time.perf_counter()
    for i in range(n):
        await send(i)
    await asyncio.wait_for(counter.done.wait(), WAIT)
    return n / (time.perf_counter() - start)


async def latency(request: Callable[[int], Awaitable[Any]], n: int, warm: int) -> list[float]:
    for i in range(warm):
        await asyncio.wait_for(request(i), 10)
    samples = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await asyncio.wait_for(request(i), 10)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


def summary(tp: float, samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"tp": tp, "p50": q[49], "p99": q[98]}


# -- single: throughput and request/reply ----------------------------------------------------------


async def single_ours(broker: str, n: int, rr: int, warm: int, subject: str) -> dict[str, float]:
    from agent_os.amb import AMB, Metadata

    url = NATS_URL if broker == "nats" else REDIS_URL
    pub, sub = AMB(broker, url), AMB(broker, url)
    counter = Counter()

    async def handler(payload: Any, metadata: Metadata) -> None:
        counter.hit(payload)

    async def echo(payload: Any, metadata: Metadata) -> None:
        await sub.reply(metadata, payload)

    try:
        await sub.subscribe(subject, handler)
        await sub.subscribe(subject + "_rr", echo)
        await pub.connect()
        await timed(counter, warm, lambda i: pub.publish(subject, message(i)))
        tp = await timed(counter, n, lambda i: pub.publish(subject, message(i)))
        samples = await latency(lambda i: pub.request(subject + "_rr", message(i), timeout=5), rr, warm)
        return summary(tp, samples)
    finally:
        await pub.close()
        await sub.close()


def _faststream_broker(broker: str) -> Any:
    if broker == "nats":
        from faststream.nats import NatsBroker

        return NatsBroker(NATS_URL, logger=None)
    from faststream.redis import RedisBroker

    return RedisBroker(REDIS_URL, logger=None)


async def single_faststream(broker: str, n: int, rr: int, warm: int, subject: str) -> dict[str, float]:
    fs = _faststream_broker(broker)
    counter = Counter()

    @fs.subscriber(subject)
    async def handler(body: dict[str, Any]) -> None:
        counter.hit(body)

    @fs.subscriber(subject + "_rr")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    await fs.start()
    try:

        async def send(i: int) -> None:
            await fs.publish(message(i), subject)

        async def request(i: int) -> Any:
            reply = await fs.request(message(i), subject + "_rr", timeout=5)
            return await reply.decode()

        await timed(counter, warm, send)
        tp = await timed(counter, n, send)
        return summary(tp, await latency(request, rr, warm))
    finally:
        await fs.stop()


async def single_raw_nats(n: int, rr: int, warm: int, subject: str) -> dict[str, float]:
    import msgpack
    import nats

    pub, sub = await nats.connect(NATS_URL), await nats.connect(NATS_URL)
    counter = Counter()

    async def handler(msg: Any) -> None:
        counter.hit(msgpack.unpackb(msg.data))

    async def echo(msg: Any) -> None:
        await sub.publish(msg.reply, msgpack.packb(msgpack.unpackb(msg.data)))

    try:
        await sub.subscribe(subject, cb=handler)
        await sub.subscribe(subject + "_rr", cb=echo)
        await sub.flush()

        async def send(i: int) -> None:
            await pub.publish(subject, msgpack.packb(message(i)))

        async def request(i: int) -> Any:
            reply = await pub.request(subject + "_rr", msgpack.packb(message(i)), timeout=5)
            return msgpack.unpackb(reply.data)

        await timed(counter, warm, send)
        tp = await timed(counter, n, send)
        return summary(tp, await latency(request, rr, warm))
    finally:
        await pub.close()
        await sub.close()


async def single_raw_redis(n: int, rr: int, warm: int, subject: str) -> dict[str, float]:
    """Throughput: PUBLISH + a pub/sub reader. Request/reply: PUBLISH on a request channel with
    a per-request reply channel in the message, answered by a PUBLISH there."""
    import msgpack
    import redis.asyncio as aioredis

    pub, resp_pub = aioredis.Redis.from_url(REDIS_URL), aioredis.Redis.from_url(REDIS_URL)
    sub, req_sub = aioredis.Redis.from_url(REDIS_URL), aioredis.Redis.from_url(REDIS_URL)
    ps, req_ps = sub.pubsub(), req_sub.pubsub()
    counter = Counter()
    waiting: dict[bytes, asyncio.Future[Any]] = {}
    inbox = f"{subject}_inbox".encode()

    async def on_message(msg: dict[str, Any]) -> None:
        channel = msg["channel"]
        if channel == subject.encode():
            counter.hit(msgpack.unpackb(msg["data"]))
        elif channel == (subject + "_rr").encode():
            reply_to, body = msgpack.unpackb(msg["data"])
            await resp_pub.publish(reply_to, msgpack.packb(body))

    async def on_reply(msg: dict[str, Any]) -> None:
        fut = waiting.pop(msg["channel"], None)
        if fut is not None and not fut.done():
            fut.set_result(msgpack.unpackb(msg["data"]))

    async def read(pubsub: Any, handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                await handle(msg)

    await ps.subscribe(subject, subject + "_rr")
    await req_ps.psubscribe(inbox + b".*")
    readers = [asyncio.create_task(read(ps, on_message)), asyncio.create_task(read(req_ps, on_reply))]
    try:

        async def send(i: int) -> None:
            await pub.publish(subject, msgpack.packb(message(i)))

        async def request(i: int) -> Any:
            reply_to = inbox + f".{uuid.uuid4().hex}".encode()
            fut = waiting[reply_to] = asyncio.get_running_loop().create_future()
            await pub.publish(subject + "_rr", msgpack.packb([reply_to, message(i)]))
            return await fut

        await timed(counter, warm, send)
        tp = await timed(counter, n, send)
        return summary(tp, await latency(request, rr, warm))
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for conn in (ps, req_ps, pub, resp_pub, sub, req_sub):
            await conn.aclose()


# -- queue groups: consume and produce -------------------------------------------------------------


class Slot:
    """This consumer's message counter in the counters file the orchestrator maps and reads."""

    def __init__(self, path: str, index: int) -> None:
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 0)
        self._offset = 8 * index
        self.count = 0

    def hit(self) -> None:
        self.count += 1
        struct.pack_into("<Q", self._map, self._offset, self.count)

    def close(self) -> None:
        self._map.close()


async def consume(impl: str, broker: str, args: argparse.Namespace) -> None:
    slot = Slot(args.counters, args.slot)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    rounds, subject, group = args.work, args.subject, args.group

    def handle(payload: Any) -> None:
        _ = payload["id"]
        work(rounds)
        slot.hit()

    closers: list[Callable[[], Awaitable[Any]]] = []
    try:
        if impl == "ours":
            from agent_os.amb import AMB, Metadata

            client = AMB(broker, NATS_URL if broker == "nats" else REDIS_URL)
            closers.append(client.close)

            async def ours_handler(payload: Any, metadata: Metadata) -> None:
                handle(payload)

            await client.subscribe(subject, ours_handler, queue=group)
        elif impl == "faststream":
            fs = _faststream_broker(broker)
            if broker == "nats":
                decorator = fs.subscriber(subject, queue=group)
            else:
                from faststream.redis import StreamSub

                decorator = fs.subscriber(stream=StreamSub(subject, group=group, consumer=uuid.uuid4().hex))

            @decorator
            async def fs_handler(body: dict[str, Any]) -> None:
                handle(body)

            await fs.start()
            closers.append(fs.stop)
        elif broker == "nats":
            import msgpack
            import nats

            nc = await nats.connect(NATS_URL)
            closers.append(nc.close)

            async def cb(msg: Any) -> None:
                handle(msgpack.unpackb(msg.data))

            await nc.subscribe(subject, queue=group, cb=cb)
            await nc.flush()
        else:
            closers.append(await raw_redis_group_reader(subject, group, handle, stop))
        print("ready", flush=True)
        await stop.wait()
    finally:
        for close in reversed(closers):
            await close()
        slot.close()


async def raw_redis_group_reader(
    stream: str, group: str, handle: Callable[[Any], None], stop: asyncio.Event
) -> Callable[[], Awaitable[None]]:
    """redis-py's form of a queue group: a stream consumer group read with XREADGROUP, each
    entry XACKed after its handler."""
    import msgpack
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    conn = aioredis.Redis.from_url(REDIS_URL)
    try:
        await conn.xgroup_create(stream, group, id="$", mkstream=True)
    except ResponseError as exc:  # the other member created it
        if "BUSYGROUP" not in str(exc):
            raise
    consumer = uuid.uuid4().hex

    async def read() -> None:
        while not stop.is_set():
            batches = await conn.xreadgroup(group, consumer, {stream: ">"}, count=100, block=200)
            for _, entries in batches or ():
                for entry_id, fields in entries:
                    handle(msgpack.unpackb(fields[b"d"]))
                    await conn.xack(stream, group, entry_id)

    task = asyncio.create_task(read())

    async def close() -> None:
        stop.set()
        await asyncio.wait_for(task, 5)
        await conn.aclose()

    return close


async def produce(impl: str, broker: str, args: argparse.Namespace) -> None:
    """Connect, print the start time, publish ``--n`` messages as fast as the client allows."""
    n, subject = args.n, args.subject

    def started() -> None:
        print(json.dumps({"start": time.time()}), flush=True)

    if impl == "ours":
        from agent_os.amb import AMB

        async with AMB(broker, NATS_URL if broker == "nats" else REDIS_URL) as client:
            started()
            for i in range(n):
                await client.publish(subject, message(i))
    elif impl == "faststream":
        fs = _faststream_broker(broker)
        await fs.connect()
        try:
            started()
            for i in range(n):
                if broker == "nats":
                    await fs.publish(message(i), subject)
                else:
                    await fs.publish(message(i), stream=subject)
        finally:
            await fs.stop()
    elif broker == "nats":
        import msgpack
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            started()
            for i in range(n):
                await nc.publish(subject, msgpack.packb(message(i)))
            await nc.flush()
        finally:
            await nc.close()
    else:
        import msgpack
        import redis.asyncio as aioredis

        conn = aioredis.Redis.from_url(REDIS_URL)
        try:
            await conn.ping()
            started()
            for i in range(n):
                await conn.xadd(subject, {"d": msgpack.packb(message(i))})
        finally:
            await conn.aclose()


async def main(args: argparse.Namespace) -> None:
    impl, broker = args.impl, args.broker
    if args.mode == "single":
        if impl == "ours":
            result = await single_ours(broker, args.n, args.rr, args.warm, args.subject)
        elif impl == "faststream":
            result = await single_faststream(broker, args.n, args.rr, args.warm, args.subject)
        elif broker == "nats":
            result = await single_raw_nats(args.n, args.rr, args.warm, args.subject)
        else:
            result = await single_raw_redis(args.n, args.rr, args.warm, args.subject)
        print(json.dumps(result), flush=True)
    elif args.mode == "consume":
        await consume(impl, broker, args)
    else:
        await produce(impl, broker, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("impl", choices=["ours", "faststream", "raw"])
    parser.add_argument("broker", choices=["nats", "redis"])
    parser.add_argument("mode", choices=["single", "consume", "produce"])
    parser.add_argument("--subject", required=True)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rr", type=int, default=1_000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--group", default="workers")
    parser.add_argument("--work", type=int, default=200)
    parser.add_argument("--counters", default="")
    parser.add_argument("--slot", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
