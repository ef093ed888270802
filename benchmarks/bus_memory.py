"""In-memory bus benchmarks: throughput, fan-out, request/reply latency, codec, idle CPU.

    .venv/bin/python -m benchmarks.bus_memory [--quick] [--rounds N] [--no-write]

Each figure is measured beside a baseline doing the least possible work of the same shape in
the same round: for throughput an asyncio.Queue between two tasks carrying the same 13 envelope
fields packed and unpacked with raw msgpack (and, for reference, the bare queue); for
request/reply a pair of asyncio.Queues and a responder task, request and reply packed and
unpacked with msgpack; request/reply again with 1,000 other subscriptions on the server, against
itself without them. In each round ours and the baselines take turns in short blocks, so load
from other processes and a host's drifting speed hit them alike; the figures are medians of
per-round ratios with their range. The section
"bus_memory" of benchmarks/RESULTS.md is rewritten with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import msgpack

from agent_os.amb import AMB, Envelope, Metadata, MsgpackSerializer, new_id
from benchmarks._report import pct, per_round, spread, write_section

PAYLOAD = b"x" * 256
DEFAULT_ROUNDS = 7
_ids = itertools.count()
packb = msgpack.Packer(use_bin_type=True).pack


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def fresh_url() -> str:
    return f"memory://bench-{uuid.uuid4().hex}"


class BusFlow:
    """Ours, publish -> handler: one client publishing to its own subscription, kept open
    between blocks (see :func:`alternate`)."""

    def __init__(self) -> None:
        self.client = AMB("memory", fresh_url(), agent_id="bench")
        self.done = asyncio.Event()
        self.count = 0
        self.target = 0

    async def open(self) -> BusFlow:
        async def handler(message: Any, metadata: Metadata) -> None:
            self.count += 1
            if self.count == self.target:
                self.done.set()

        await self.client.subscribe("bench.tp", handler)
        return self

    async def block(self, n: int) -> float:
        """Seconds for ``n`` messages, published and handled."""
        self.done.clear()
        self.target = self.count + n
        publish = self.client.publish
        start = time.perf_counter()
        for _ in range(n):
            await publish("bench.tp", PAYLOAD)
        await self.done.wait()
        return time.perf_counter() - start

    async def close(self) -> None:
        await self.client.close()


def wire_fields(topic: str, reply_to: str | None = None, correlation_id: str | None = None) -> list[Any]:
    """The 13 fields of a msgpack envelope (what the baselines pack and unpack per message)."""
    id_, now = f"{next(_ids):032x}", time.time_ns()
    return [1, id_, topic, "bench", None, reply_to, correlation_id, now, None, 0, {}, PAYLOAD, None]


class QueueFlow:
    """Baseline: a bounded asyncio.Queue between the producer and a consumer task; ``codec``:
    the producer packs the envelope's fields with msgpack, the consumer unpacks them and awaits
    a handler with the payload that counts as ours does (the same work, without the bus)."""

    def __init__(self, codec: bool = True) -> None:
        self.codec = codec
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4096)
        self.done = asyncio.Event()
        self.count = 0
        self.target = 0
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> QueueFlow:
        self.task = asyncio.create_task(self._consume())
        return self

    async def _handler(self, message: Any, fields: list[Any]) -> None:
        self.count += 1
        if self.count == self.target:
            self.done.set()

    async def _consume(self) -> None:
        queue, handler = self.queue, self._handler
        while True:
            data = await queue.get()
            if self.codec:
                fields = unpackb(data)
                await handler(fields[11], fields)
            else:  # the bare queue: counted, no handler
                self.count += 1
                if self.count == self.target:
                    self.done.set()

    async def block(self, n: int) -> float:
        """Seconds for ``n`` messages, put and handled."""
        self.done.clear()
        self.target = self.count + n
        put, codec = self.queue.put, self.codec
        start = time.perf_counter()
        for _ in range(n):
            await put(packb(wire_fields("bench.tp")) if codec else PAYLOAD)
        await self.done.wait()
        return time.perf_counter() - start

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def bus_throughput(n: int) -> float:
    """Ours: messages a second over one block of ``n``."""
    return n / await one_block(BusFlow(), n)


async def queue_throughput(n: int, codec: bool = True) -> float:
    """The queue baseline: messages a second over one block of ``n``."""
    return n / await one_block(QueueFlow(codec), n)


async def fan_out(n: int, subscribers: int) -> float:
    url = fresh_url()
    pub = AMB("memory", url)
    clients = [AMB("memory", url) for _ in range(subscribers)]
    done = asyncio.Event()
    total = n * subscribers
    count = 0

    async def handler(message: Any, metadata: Metadata) -> None:
        nonlocal count
        count += 1
        if count == total:
            done.set()

    for c in clients:
        await c.subscribe("bench.fan", handler)
    start = time.perf_counter()
    for _ in range(n):
        await pub.publish("bench.fan", PAYLOAD)
    await done.wait()
    elapsed = time.perf_counter() - start
    for c in [pub, *clients]:
        await c.close()
    return total / elapsed


BYSTANDERS = 1_000
"""Other subscriptions on the server in the second request/reply measure (a fleet's agents)."""

WARM_UP = 200
"""Requests each side makes before its first timed block."""

TP_BLOCKS = 10
"""Blocks a throughput run is cut into, the sides taking turns (see :func:`alternate`)."""

RR_BLOCKS = 30
"""Blocks a latency run is cut into."""


class BusRequests:
    """Ours, request/reply: a requester and an echoing responder on one memory server, kept
    open between blocks; ``bystanders``: that many other subscriptions on the server, none
    matching (each reply subject is new to the server's routes)."""

    def __init__(self, bystanders: int = 0) -> None:
        url = fresh_url()
        self.requester = AMB("memory", url)
        self.responder = AMB("memory", url)
        self.bystanders = bystanders

    async def open(self) -> BusRequests:
        responder = self.responder

        async def echo(message: Any, metadata: Metadata) -> None:
            await responder.reply(metadata, message)

        async def idle(message: Any, metadata: Metadata) -> None:
            return None

        await responder.subscribe("bench.rr", echo)
        for i in range(self.bystanders):
            await responder.subscribe(f"agents.a{i}.*", idle)
        await self.block(WARM_UP)
        return self

    async def block(self, n: int) -> list[float]:
        """Latencies in µs of ``n`` requests, one at a time."""
        request = self.requester.request
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await request("bench.rr", PAYLOAD, timeout=5)
            samples.append((time.perf_counter_ns() - t0) / 1000)
        return samples

    async def close(self) -> None:
        await self.requester.close()
        await self.responder.close()


class QueuePairRequests:
    """Baseline: a request queue and a reply queue with a responder task between them; request
    and reply are envelopes' fields packed and unpacked with msgpack."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[bytes] = asyncio.Queue()
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _respond(self) -> None:
        requests, replies = self.requests, self.replies
        while True:
            request = unpackb(await requests.get())
            await replies.put(packb(wire_fields(request[5], None, request[1])))

    async def open(self) -> QueuePairRequests:
        self.task = asyncio.create_task(self._respond())
        await self.block(WARM_UP)
        return self

    async def block(self, n: int) -> list[float]:
        """Latencies in µs of ``n`` requests, one at a time."""
        put, get = self.requests.put, self.replies.get
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await put(packb(wire_fields("bench.rr", "_INBOX.bench.1")))
            unpackb(await get())
            samples.append((time.perf_counter_ns() - t0) / 1000)
        return samples

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def request_latency(n: int, bystanders: int = 0) -> list[float]:
    """Ours: latencies in µs of ``n`` requests after the warm-up, in one block."""
    return await one_block(BusRequests(bystanders), n)


async def queue_pair_latency(n: int) -> list[float]:
    """The queue pair: latencies in µs of ``n`` requests after the warm-up, in one block."""
    return await one_block(QueuePairRequests(), n)


T_co = TypeVar("T_co", covariant=True)


class Side(Protocol[T_co]):
    """A flow or a request pair: opened once, then run block by block."""

    async def open(self) -> object: ...

    async def block(self, n: int) -> T_co: ...

    async def close(self) -> None: ...


async def one_block(side: Side[T_co], n: int) -> T_co:
    """Open ``side`` (a flow or a request pair), run one block of ``n`` on it, close it; the
    block's result (what benchmarks.instructions counts)."""
    await side.open()
    try:
        return await side.block(n)
    finally:
        await side.close()


async def alternate(sides: Sequence[Any], blocks: int, per_block: int) -> list[list[Any]]:
    """Run ``blocks`` blocks of ``per_block`` items on each of ``sides`` in turn (each side an
    opened flow or request pair with ``block(n)``), and return each side's block results.

    The sides take turns every block, a fraction of a second, so a host whose speed drifts
    within a round (a busy neighbour, a slower phase) slows them alike: their ratio holds where
    runs one after the other would each catch a different phase."""
    results: list[list[Any]] = [[] for _ in sides]
    for _ in range(blocks):
        for side, found in zip(sides, results, strict=True):
            found.append(await side.block(per_block))
    return results


def codec_rate(n: int, blocks: int = TP_BLOCKS) -> tuple[float, float]:
    """Envelope encode+decode a second, ours and raw msgpack of the same fields (no checks), in
    ``blocks`` alternating blocks (as :func:`alternate`)."""
    ser = MsgpackSerializer()
    env = Envelope(new_id(), "bench.codec", "bench", PAYLOAD, timestamp=time.time_ns(), headers={})
    fields = [1, env.id, env.topic, env.sender, None, None, None, env.timestamp, None, 0, {}, PAYLOAD, None]
    per_block = n // blocks
    ours = raw = 0.0
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            ser.decode(ser.encode(env))
        ours += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(per_block):
            msgpack.unpackb(msgpack.packb(fields, use_bin_type=True), raw=False)
        raw += time.perf_counter() - start
    return per_block * blocks / ours, per_block * blocks / raw


async def idle_cpu(subscriptions: int, seconds: float) -> float:
    client = AMB("memory", fresh_url())

    async def handler(message: Any, metadata: Metadata) -> None:
        return None

    for i in range(subscriptions):
        await client.subscribe(f"bench.idle.{i}", handler)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    await client.close()
    return 100 * cpu / wall


BEFORE_AFTER = """Garbage collection, before and after (not rewritten by the script). Before commit
2e219e7 each message waiting in a subscription's queue was an object the garbage collector
tracked, and a backlog of them set off collections: 122 in a 100,000-message throughput run
(111 young, 10 middle, one full; 20.6 of 467 ms inside the collector), while the queue
baseline, holding bytes, set off none; with `gc.disable()` ours ran 8.9 % faster, the baseline
2.6 % (AMD EPYC, 2026-12-07, one run of 7 rounds). A delivery is now a msgspec struct the
collector does not track (it refers to its dispatcher weakly, so no cycle hides behind it): one
collection in the same run. Instructions a message (`python -m benchmarks.instructions`, the
count valgrind takes on the same binary whatever the load): publish -> handler 34,463 ->
33,186, the queue baseline / ours 0.692 -> 0.718; request/reply 158,251 -> 153,845 a request,
ours / the queue pair 1.742 -> 1.693, most of it from not checking a reply's topic again when
it is the request's own reply subject (26e38a8). Wall clock on this host, the same script:
0.64 (0.54-0.65) and 1.67x at f60d13a in the morning, the figures above after. What is left
is the bus's own work a message: an envelope id and time, checks, routing, the subscription's
dispatcher and the handler's metadata, about 9,300 instructions beyond the baseline's."""


async def main(quick: bool, rounds: int, write: bool = True) -> None:
    n = 30_000 if quick else 100_000
    samples = 1_000 if quick else 3_000
    load_before = os.getloadavg()[0]
    tp, tp_base, tp_bare, p50, p50_base, p99, p99_base, fans, p50_crowd, codec, raw_codec = (
        [] for _ in range(11)
    )
    for r in range(rounds):
        gc.collect()
        flows: list[BusFlow | QueueFlow] = [BusFlow(), QueueFlow(), QueueFlow(codec=False)]
        try:
            for flow in flows:
                await flow.open()
                await flow.block(n // 50)  # warm-up
            times = await alternate(flows, TP_BLOCKS, n // TP_BLOCKS)
        finally:
            for flow in flows:
                await flow.close()
        ours_tp, base_tp, bare_tp = (n // TP_BLOCKS * TP_BLOCKS / sum(t) for t in times)
        tp.append(ours_tp)
        tp_base.append(base_tp)
        tp_bare.append(bare_tp)
        sides: list[BusRequests | QueuePairRequests] = [
            BusRequests(),
            QueuePairRequests(),
            BusRequests(BYSTANDERS),
        ]
        try:
            for side in sides:
                await side.open()
            ours_rr, base_rr, crowd_rr = (
                [x for block in found for x in block]
                for found in await alternate(sides, RR_BLOCKS, samples // RR_BLOCKS)
            )
        finally:
            for side in sides:
                await side.close()
        p50.append(pct(ours_rr, 50))
        p99.append(pct(ours_rr, 99))
        p50_base.append(pct(base_rr, 50))
        p50_crowd.append(pct(crowd_rr, 50))
        p99_base.append(pct(base_rr, 99))
        fans.append(await fan_out(n // 10, 10))
        ours_codec, plain_codec = codec_rate(n)
        codec.append(ours_codec)
        raw_codec.append(plain_codec)
        print(
            f"round {r + 1}: {tp[-1]:,.0f} / {tp_base[-1]:,.0f} msg/s, p50 {p50[-1]:.1f} / {p50_base[-1]:.1f} µs",
            file=sys.stderr,
        )
    idle = await idle_cpu(200, 2.0 if quick else 5.0)
    load_after = os.getloadavg()[0]

    med = statistics.median
    tp_ratios = per_round(tp, tp_base)
    bare_ratios = per_round(tp, tp_bare)
    rr_ratios = per_round(p50, p50_base)
    crowd_ratios = per_round(p50_crowd, p50)
    tp_ok = "met" if med(tp_ratios) >= 0.7 else "MISSED"
    rr_ok = "met" if med(rr_ratios) <= 1.5 else "MISSED"
    codec_ok = "met" if med(codec) >= 300_000 else "MISSED"
    body = f"""
One publisher and one subscriber on one event loop (one core), 256-byte bytes payload, msgpack.
{rounds} rounds of {n:,} messages per throughput run and {samples:,} requests per latency run
(after {WARM_UP} warm-up ones). Within a round ours and its baselines stay open and take turns
in blocks ({TP_BLOCKS} of a throughput run, {RR_BLOCKS} of a latency run, {TP_BLOCKS} of the
codec's), a fraction of a second each, so load from other processes and a host's drifting
speed hit them alike. Ratios are the median of the per-round ratios, with their range;
absolute figures are medians over rounds. Load average {load_before:.1f} before the run, {load_after:.1f} after
(2 cores shared with other work).

| measure | ours | baseline (same rounds) | ratio: median (range) | target |
|---|---|---|---|---|
| publish -> handler throughput | {med(tp):,.0f} msg/s | {med(tp_base):,.0f} msg/s (asyncio.Queue + msgpack of the 13 envelope fields) | {spread(tp_ratios)} | >= 0.7: {tp_ok} |
| (same, against the bare queue) | | {med(tp_bare):,.0f} msg/s (asyncio.Queue of the bytes, no envelope) | {spread(bare_ratios)} | |
| fan-out to 10 subscribers | {med(fans):,.0f} deliveries/s | | | |
| request/reply latency p50 | {med(p50):.1f} µs | {med(p50_base):.1f} µs (two asyncio.Queues, a responder task, msgpack both ways) | {spread(rr_ratios)}x | <= 1.5x: {rr_ok} |
| request/reply latency p99 | {med(p99):.1f} µs | {med(p99_base):.1f} µs | | |
| request/reply latency p50, {BYSTANDERS:,} other subscriptions on the server | {med(p50_crowd):.1f} µs | {med(p50):.1f} µs (ours without them) | {spread(crowd_ratios)}x | (info: each reply subject is routed for the first time) |
| envelope encode+decode | {med(codec):,.0f} /s | {med(raw_codec):,.0f} /s (raw msgpack, no checks) | {spread(per_round(codec, raw_codec))} | >= 300,000 /s: {codec_ok} |
| CPU with 200 idle subscriptions | {idle:.2f} % | | | < 1 % |

{BEFORE_AFTER}
"""
    print(body)
    if write:
        command = "python -m benchmarks.bus_memory" + (" --quick" if quick else "")
        if rounds != DEFAULT_ROUNDS:
            command += f" --rounds {rounds}"
        write_section("bus_memory", command, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds (>= 5)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    asyncio.run(main(args.quick, max(args.rounds, 1), not args.no_write))
