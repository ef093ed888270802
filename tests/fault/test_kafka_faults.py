"""Faults on the Kafka broker, against the librdkafka mock cluster (no real Kafka runs here).

Each test starts its own mock cluster, so taking its broker down touches nobody else:

- a durable consumer (its own process) killed with SIGKILL mid-stream: the next consumer of the
  group gets exactly the messages at or past the committed offsets, so nothing is lost, and the
  duplicates are exactly what the dead one was handed but had not committed;
- the broker taken down during a publish loop and brought back: the clients reconnect, every
  publish that returned is delivered, and duplicates are bounded;
- produce errors injected by the broker: retriable ones are retried without loss or duplicates,
  a refusal raises ``TransportError`` (the caller knows) and nothing is delivered.

What the mock cannot show is listed in the README ("Kafka: what the mock cluster does not cover"):
the broker going down keeps its log in memory, so this is a restart that keeps its disk, never a
lost disk or a leader failover; and the consumer group has one member at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from agent_os.amb.broker import Delivery
from agent_os.amb.errors import BrokerUnavailable, TransportError
from agent_os.bus_adapters.kafka import KafkaBroker
from tests.support import wait_until
from tests.support.closing import Closing
from tests.support.kafka import MockKafkaCluster, broker_url, committed_offsets

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
PRODUCE, TOPIC_AUTHORIZATION_FAILED, NOT_LEADER_FOR_PARTITION, REQUEST_TIMED_OUT = 0, 29, 6, 7

# A durable consumer in its own process: acks what it handles and reports each step on stdout.
# After ``healthy`` acks it hangs on the next message, as a stuck process would, until the test
# kills it with SIGKILL (no drain, no commit, no goodbye) with that message in hand.
_CONSUMER = """
import asyncio, sys
from agent_os.bus_adapters.kafka import KafkaBroker

async def main(url, subject, durable, healthy):
    broker = KafkaBroker(url)
    await broker.connect()
    acked = 0

    async def handle(delivery):
        nonlocal acked
        print("got", int(delivery.data), flush=True)
        if acked == int(healthy):
            await asyncio.Event().wait()
        await asyncio.sleep(0.005)
        await delivery.ack()
        acked += 1
        print("acked", int(delivery.data), flush=True)

    await broker.subscribe(subject, handle, durable=durable)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


def _accepts_connections(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


async def test_killed_durable_consumer_loses_nothing(
    kafka_cluster: MockKafkaCluster, closing: Closing
) -> None:
    tag = uuid.uuid4().hex[:10]
    subject, durable, total, healthy = f"fault{tag}.jobs", f"fault{tag}-d", 200, 50
    url = broker_url(kafka_cluster)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CONSUMER,
        url,
        subject,
        durable,
        str(healthy),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    publisher, survivor = closing(KafkaBroker(url)), closing(KafkaBroker(url))
    got_first: list[int] = []
    acked_first: set[int] = set()
    got_second: Counter[int] = Counter()
    positions: dict[int, tuple[int, int]] = {}  # message -> (partition, offset), seen by the survivor

    def record(line: bytes) -> None:
        word, n = line.split()
        (acked_first.add if word == b"acked" else got_first.append)(int(n))

    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
        await publisher.connect()
        for i in range(total):
            await publisher.publish(subject, str(i).encode())
        await publisher.flush(timeout=10)  # all acknowledged: any loss is the consumers'
        while len(got_first) <= healthy:  # mid-stream, with a message in hand
            record(await asyncio.wait_for(proc.stdout.readline(), 10))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for line in (await proc.stdout.read()).splitlines():  # what it printed before dying counts
            record(line)
        committed = await asyncio.to_thread(
            committed_offsets, kafka_cluster.bootstrap_servers, durable, subject
        )

        async def handle(delivery: Delivery) -> None:
            n = int(delivery.data)
            got_second[n] += 1
            positions[n] = (int(delivery.extra["partition"]), int(delivery.extra["offset"]))
            await delivery.ack()

        await survivor.connect()
        await survivor.subscribe(subject, handle, durable=durable)
        everything = set(range(total))
        await wait_until(
            lambda: acked_first | set(got_second) >= everything, timeout=20, what="every message delivered"
        )
        await asyncio.sleep(0.3)  # anything still to come would be a duplicate

        unacked = set(got_first) - acked_first
        assert len(acked_first) == healthy, "the consumer died with a message in hand"
        assert len(unacked) == 1
        assert unacked <= set(got_second), "what the dead consumer had not acked comes again"
        assert max(got_second.values()) == 1, "the survivor sees each message once"
        bad = {n: po for n, po in positions.items() if po[1] < committed[po[0]]}
        assert not bad, f"committed offsets delivered again: {bad} (committed: {committed})"
        assert len(got_second) == total - sum(committed.values()), "everything uncommitted comes again"
        duplicates = len(got_first) + len(got_second) - total
        # Exactly what the dead consumer was handed but had not committed: its in-flight message
        # and the acks its last commit (they are coalesced every 50 ms) did not yet cover.
        assert duplicates == len(got_first) - sum(committed.values())
        assert len(unacked) <= duplicates <= 25, f"{duplicates} duplicate deliveries"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for broker in (survivor, publisher):
            with contextlib.suppress(Exception):
                await broker.close(timeout=2)


@pytest.mark.parametrize("confirm", [True, False], ids=["confirmed", "pipelined"])
async def test_broker_down_during_publish_loop_loses_no_confirmed_publish(
    kafka_cluster: MockKafkaCluster, confirm: bool, closing: Closing
) -> None:
    """Confirmed: each publish() returns once Kafka acknowledged it. Pipelined: publish() returns
    once the record is batched, and flush() confirms them all (or raises)."""
    subject = f"fault{uuid.uuid4().hex[:10]}.orders"
    n, outage = 300, 2.0  # longer than the session timeout: the consumer's group membership expires
    publisher = closing(
        KafkaBroker(broker_url(kafka_cluster, request_timeout_ms=8000), confirm_publish=confirm)
    )
    consumer = closing(KafkaBroker(broker_url(kafka_cluster)))
    received: Counter[int] = Counter()
    accepted: list[int] = []
    failed: list[int] = []
    slowest = 0.0
    down_seen: list[bool] = []

    async def handle(delivery: Delivery) -> None:
        received[int(delivery.data)] += 1
        await delivery.ack()

    async def take_down() -> None:
        kafka_cluster.set_broker_down(1)
        down_seen.append(not _accepts_connections(kafka_cluster.bootstrap_servers))
        await asyncio.sleep(outage)
        kafka_cluster.set_broker_up(1)

    try:
        await publisher.connect()
        await consumer.connect()
        await consumer.subscribe(subject, handle, durable=f"fault-{subject}")
        downtime: asyncio.Task[None] | None = None
        for i in range(n):
            if i == n // 4:
                downtime = asyncio.ensure_future(take_down())
                await asyncio.sleep(0)  # the broker is down before the next publish
            started = time.monotonic()
            try:
                await publisher.publish(subject, str(i).encode())
            except TransportError:
                failed.append(i)  # not confirmed: the caller knows it may be lost
            else:
                accepted.append(i)
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.002)
        if not confirm:
            started = time.monotonic()
            await publisher.flush(timeout=20)  # raises if any publish was not acknowledged
            slowest = time.monotonic() - started
        assert downtime is not None
        await downtime
        assert down_seen == [True], "the broker refused connections while down"
        assert slowest >= outage / 4, "the client waited for the broker to come back"
        # The producer retries until request_timeout_ms; the outage is shorter, so none fails.
        assert not failed, f"publishes failed across a {outage}s outage: {failed}"
        assert publisher.publish_failures == 0
        await wait_until(
            lambda: set(received) >= set(accepted),
            timeout=20,
            what=f"every confirmed publish (missing {sorted(set(accepted) - set(received))[:10]})",
        )
        await asyncio.sleep(0.3)
        assert set(received) <= set(range(n)), "nothing was delivered that was not published"
        duplicated = sorted(k for k, count in received.items() if count > 1)
        # Redelivered: what the consumer handled between its last commit before the outage and
        # its rejoin after it (the broker rejects a dropped member's commits), and records the
        # producer resent because the connection dropped before their acknowledgement. One
        # outage, one rejoin: no message comes more than twice.
        assert max(received.values()) <= 2, f"delivered more than twice: {received.most_common(3)}"
        if confirm:
            # Sequential confirmed publishes: the consumer is at most a commit interval behind
            # when the broker goes down, and what is published long after recovery comes once.
            assert len(duplicated) <= n // 4, f"duplicates: {duplicated}"
            assert all(k < n - 50 for k in duplicated), f"duplicates after recovery: {duplicated}"
    finally:
        kafka_cluster.set_broker_up(1)
        for broker in (publisher, consumer):
            with contextlib.suppress(Exception):
                await broker.close(timeout=2)


async def test_produce_errors_are_retried_or_reported(
    kafka_cluster: MockKafkaCluster, closing: Closing
) -> None:
    subject = f"fault{uuid.uuid4().hex[:10]}.events"
    confirmed = closing(KafkaBroker(broker_url(kafka_cluster), confirm_publish=True))
    pipelined = closing(KafkaBroker(broker_url(kafka_cluster)))
    consumer = closing(KafkaBroker(broker_url(kafka_cluster)))
    received: Counter[int] = Counter()

    async def handle(delivery: Delivery) -> None:
        received[int(delivery.data)] += 1
        await delivery.ack()

    try:
        for broker in (confirmed, pipelined, consumer):
            await broker.connect()
        await consumer.subscribe(subject, handle, durable=f"fault-{subject}")
        await confirmed.publish(subject, b"0")  # the topic and its leader are known from here on
        await pipelined.publish(subject, b"1")
        await pipelined.flush(timeout=10)

        # Retriable: the producer refreshes metadata, backs off and sends again.
        kafka_cluster.push_request_errors(
            PRODUCE, REQUEST_TIMED_OUT, NOT_LEADER_FOR_PARTITION, REQUEST_TIMED_OUT
        )
        await confirmed.publish(subject, b"2")
        # Not retriable: the publish fails loudly instead of vanishing.
        kafka_cluster.push_request_errors(PRODUCE, TOPIC_AUTHORIZATION_FAILED)
        with pytest.raises(TransportError) as refused:
            await confirmed.publish(subject, b"3")
        assert not isinstance(refused.value, BrokerUnavailable), "a refusal is not an outage"
        await confirmed.publish(subject, b"4")  # the client is still usable
        # Pipelined, the refusal is counted and raised by the next flush (or publish).
        kafka_cluster.push_request_errors(PRODUCE, TOPIC_AUTHORIZATION_FAILED)
        await pipelined.publish(subject, b"5")
        with pytest.raises(TransportError):
            await pipelined.flush(timeout=10)
        assert pipelined.publish_failures == 1
        await pipelined.publish(subject, b"6")
        await pipelined.flush(timeout=10)

        accepted = {0, 1, 2, 4, 6}
        await wait_until(lambda: accepted <= set(received), timeout=10, what="the accepted publishes")
        await asyncio.sleep(0.3)
        assert received == Counter(dict.fromkeys(accepted, 1)), "each accepted publish once, refused never"
    finally:
        kafka_cluster.clear_request_errors(PRODUCE)
        for broker in (confirmed, pipelined, consumer):
            with contextlib.suppress(Exception):
                await broker.close(timeout=2)
