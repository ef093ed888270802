"""Faults on the Redis broker: a durable consumer killed mid-stream, a server restarted mid-publish.

Both use durable subscriptions (Redis Streams), which promise at-least-once delivery: nothing a
publish accepted may be lost, and duplicates stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent_os.amb.broker import Delivery
from agent_os.amb.errors import TransportError
from agent_os.bus_adapters.redis import RedisBroker
from tests.support import wait_until
from tests.support.cleanup import delete_redis_keys
from tests.support.closing import Closing
from tests.support.servers import REDIS_URL

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]

# A durable consumer in its own process: it acks what it handles and reports on stdout, until the
# test kills it with SIGKILL (no drain, no ack, no goodbye).
_CONSUMER = """
import asyncio, sys
from agent_os.bus_adapters.redis import RedisBroker

async def main(subject, durable):
    broker = RedisBroker(sys.argv[3], read_batch=4, max_pending=8)
    await broker.connect()

    async def handle(delivery):
        print("got", int(delivery.data), flush=True)
        await asyncio.sleep(0.005)
        await delivery.ack()
        print("acked", int(delivery.data), flush=True)

    await broker.subscribe(subject, handle, durable=durable)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_killed_durable_consumer_loses_nothing(closing: Closing) -> None:
    prefix = f"f{uuid.uuid4().hex[:12]}"
    subject, durable, total = f"{prefix}.jobs", f"{prefix}-d", 200
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CONSUMER,
        subject,
        durable,
        REDIS_URL,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    pub = closing(RedisBroker(REDIS_URL))
    survivor = closing(RedisBroker(REDIS_URL, claim_min_idle=0.5))
    got_first: list[int] = []
    acked_first: set[int] = set()
    got_second: list[int] = []
    attempts: dict[int, int] = {}
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.strip() == b"ready"
        await pub.connect()
        for i in range(total):
            await pub.publish(subject, str(i).encode())
        # The first consumer is mid-stream, with a message in hand (got, not acked: it sleeps
        # 5 ms in its handler); killed at once, before it can ack that one.
        while len(acked_first) < 50 or not set(got_first) - acked_first:
            word, n = (await asyncio.wait_for(proc.stdout.readline(), 10)).split()
            (acked_first.add if word == b"acked" else got_first.append)(int(n))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # What it printed before dying still counts; what it got but did not ack must come back.
        for raw in (await proc.stdout.read()).splitlines():
            word, n = raw.split()
            (acked_first.add if word == b"acked" else got_first.append)(int(n))

        async def handle(delivery: Delivery) -> None:
            n = int(delivery.data)
            got_second.append(n)
            attempts[n] = delivery.attempt
            await delivery.ack()

        await survivor.connect()
        await survivor.subscribe(subject, handle, durable=durable)
        everything = set(range(total))
        await wait_until(
            lambda: acked_first | set(got_second) >= everything, timeout=10, what="every message delivered"
        )
        await asyncio.sleep(0.2)
        unacked = set(got_first) - acked_first
        assert unacked, "the consumer died with messages in hand"
        assert unacked <= set(got_second), "pending entries of the dead consumer were reclaimed"
        assert all(attempts[n] >= 2 for n in unacked), "a reclaimed message reports its delivery count"
        duplicates = len(got_first) + len(got_second) - total
        assert 0 <= duplicates <= 8 + 4 + 1, "only what the dead consumer held is delivered twice"
        assert len(got_second) == len(set(got_second)), "the survivor sees each message once"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await survivor.close()
        await pub.close()
        await delete_redis_keys(REDIS_URL, subject_prefix=prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """A redis-server of the test's own that writes every write to its AOF before replying."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[_Server]:
    server = _Server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def restart_clients(own_server: _Server) -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    pub = RedisBroker(own_server.url, reconnect_attempts=40)
    sub = RedisBroker(own_server.url, reconnect_attempts=40, claim_min_idle=1.0)
    await pub.connect()
    await sub.connect()
    yield pub, sub
    await sub.close(timeout=2)
    await pub.close(timeout=2)


async def test_server_restart_loses_no_accepted_publish(
    own_server: _Server, restart_clients: tuple[RedisBroker, RedisBroker]
) -> None:
    pub, sub = restart_clients
    subject = f"f{uuid.uuid4().hex[:12]}.orders"
    received: list[int] = []

    async def handle(delivery: Delivery) -> None:
        received.append(int(delivery.data))
        with contextlib.suppress(TransportError):  # an ack lost to the restart: redelivered later
            await delivery.ack()

    await sub.subscribe(subject, handle, durable="orders")
    accepted: list[int] = []
    failed: list[int] = []
    back: list[int] = []

    async def restart_after(count: int) -> None:
        await wait_until(lambda: len(accepted) >= count, timeout=10, what=f"{count} publishes")
        own_server.kill()
        await asyncio.sleep(0.3)  # publishes meanwhile wait in redis-py's retry backoff
        await asyncio.to_thread(own_server.start)
        back.append(len(accepted) + len(failed))

    restarter = asyncio.ensure_future(restart_after(100))
    for i in range(300):
        try:
            await pub.publish(subject, str(i).encode())
        except TransportError:
            failed.append(i)
        else:
            accepted.append(i)
        await asyncio.sleep(0.002)
    await restarter
    assert back, "the server was restarted"
    assert back[0] < 300, "the server came back while the publisher was still publishing"
    assert len(accepted) >= 250, f"the publisher reconnected (failed: {failed})"
    await wait_until(lambda: set(received) >= set(accepted), timeout=10, what="every accepted publish")
    assert len(received) - len(set(received)) <= 10, "duplicates are bounded"
