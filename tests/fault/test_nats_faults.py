"""Faults against the real NATS server: a durable consumer that dies, a server that restarts.

Both tests use the adapter directly (bytes, acks) so that every delivery is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from agent_os.amb import Delivery, TransportError
from agent_os.bus_adapters.nats import NatsBroker
from tests.support import wait_until
from tests.support.cleanup import delete_nats_streams
from tests.support.closing import Closing
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats

SERVER = "/usr/sbin/nats-server"
START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", SERVER, "--",
    "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server", "-l", "/var/log/nats-server.log",
]  # fmt: skip
STOP = ["start-stop-daemon", "--stop", "--oknodo", "--retry", "10", "--exec", SERVER]


def _answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=0.5) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


async def _run(cmd: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await proc.wait()


async def _ensure_server_running(timeout: float = 10.0) -> None:
    if _answers():
        return
    await _run(START)
    deadline = time.monotonic() + timeout
    while not _answers():
        if time.monotonic() > deadline:
            raise AssertionError("the NATS server did not come back")
        await asyncio.sleep(0.05)


def _names() -> Iterator[str]:
    tag = uuid.uuid4().hex[:10]
    yield f"fault{tag}.jobs"
    yield f"fault{tag}-d"


async def test_killed_durable_consumer_loses_nothing(closing: Closing) -> None:
    subject, durable = _names()
    n = 200
    first = closing(NatsBroker(NATS_URL, ack_wait=1.0, pull_batch=16))
    publisher = closing(NatsBroker(NATS_URL, stream_subjects=(subject,)))
    second = closing(NatsBroker(NATS_URL))
    seen: Counter[int] = Counter()
    acked: set[int] = set()
    stuck = asyncio.Event()
    release = asyncio.Event()

    async def dies_after_50(d: Delivery) -> None:
        seq = int(d.data)
        seen[seq] += 1
        if sum(seen.values()) > 50:
            stuck.set()
            await release.wait()  # hangs without acking, as a stuck or dying process would
            return
        await d.ack()
        acked.add(seq)

    async def healthy(d: Delivery) -> None:
        seen[int(d.data)] += 1
        await d.ack()
        acked.add(int(d.data))

    try:
        await first.connect()
        await publisher.connect()
        await first.subscribe(subject, dies_after_50, durable=durable)
        for i in range(n):
            await publisher.publish(subject, str(i).encode())
        await asyncio.wait_for(stuck.wait(), 5)
        # Kill it: the connection goes away with fetched messages unacked; nothing is drained.
        await first.connection.close()
        release.set()

        await second.connect()
        await second.subscribe(subject, healthy, durable=durable)
        await wait_until(lambda: len(acked) == n, timeout=10, what=f"all {n} messages acked")
        await asyncio.sleep(0.3)
        assert acked == set(range(n)), "nothing is lost"
        duplicates = sum(seen.values()) - n
        # Only what the dead consumer was handed but had not acked comes again: its one
        # in-flight message and nothing it acknowledged.
        assert 0 < duplicates <= 16, f"{duplicates} duplicate deliveries"
    finally:
        release.set()
        for broker in (second, publisher, first):
            with contextlib.suppress(Exception):
                await broker.close(timeout=1)
        await delete_nats_streams(subject.split(".")[0], NATS_URL)


async def test_server_restart_loses_no_acknowledged_durable_publish(closing: Closing) -> None:
    subject, durable = _names()
    n = 400
    consumer = closing(NatsBroker(NATS_URL))
    publisher = closing(NatsBroker(NATS_URL, stream_subjects=(subject,), publish_timeout=8.0))
    received: Counter[int] = Counter()
    acked: list[int] = []
    failed: list[int] = []

    async def handler(d: Delivery) -> None:
        received[int(d.data)] += 1
        await d.ack()

    async def restart() -> None:
        await _run(STOP)
        assert not _answers(), "the server stopped"
        await asyncio.sleep(0.5)
        await _ensure_server_running()

    try:
        await consumer.connect()
        await publisher.connect()
        await consumer.subscribe(subject, handler, durable=durable)
        restarter: asyncio.Task[None] | None = None
        for i in range(n):
            if i == n // 4:
                restarter = asyncio.ensure_future(restart())
            try:
                await publisher.publish(subject, str(i).encode())
            except TransportError:
                failed.append(i)  # not acknowledged: the caller knows it may be lost
            else:
                acked.append(i)
            if restarter is not None and not restarter.done():
                await asyncio.sleep(0.005)  # keep publishing across the outage
        assert restarter is not None
        await restarter
        # publish() returned before JetStream's ack (acks are batched); flush() returns once the
        # stream has stored every one of them, resending what the restart lost.
        await publisher.flush(timeout=10)
        acks = publisher.publish_acks
        assert acks.outstanding == 0
        assert acks.failures == 0, "no durable publish was given up"
        assert acks.confirmed >= len(acked)
        assert publisher.connection.stats["reconnects"] >= 1, "the publisher reconnected"
        assert len(acked) >= n // 2, f"most publishes succeed across the restart ({len(failed)} failed)"
        await wait_until(
            lambda: set(acked) <= set(received),
            timeout=10,
            what=f"every acknowledged publish (missing {len(set(acked) - set(received))})",
        )
        assert set(received) - set(acked) <= set(failed), "nothing was delivered that was not published"
    finally:
        await _ensure_server_running()
        for broker in (publisher, consumer):
            with contextlib.suppress(Exception):
                await broker.close(timeout=1)
        await delete_nats_streams(subject.split(".")[0], NATS_URL)
