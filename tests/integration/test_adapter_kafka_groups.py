"""Kafka adapter, on the librdkafka mock cluster: the consumer group of a fan-out subscriber and
the per-client reply topic.

- A fan-out subscription's group is ``amb.<client-id>.<n>.<pattern>`` (``n`` counts the client's
  fan-out subscriptions): a client with a fixed ``client_id`` that comes back (a new client
  object, after a restart) and subscribes again gets the same group, so it resumes from what its
  predecessor committed; every fan-out subscriber still has a group of its own, so each gets
  every message. Without a ``client_id`` a client's id is random: each client is a new group.
- Reply subjects ``_INBOX.<client>.…`` all map to one topic per client, ``_INBOX.<client>``:
  requests never add topics after the first one, nor does a reconnect or a new client with
  the same ``client_id``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from agent_os.amb import AMB, Metadata
from agent_os.amb.broker import Delivery
from agent_os.bus_adapters.kafka import KafkaBroker, topic_for
from tests.support import wait_until
from tests.support.closing import Closing
from tests.support.kafka import MockKafkaCluster, committed_offsets

pytestmark = pytest.mark.kafka


class Deliveries:
    """A broker-level handler that acks and records the payloads it receives."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.got.append(delivery.data)
        await delivery.ack()

    async def wait_for(self, expected: list[bytes], what: str) -> None:
        """Wait until exactly ``expected`` has arrived, in that order."""
        await wait_until(lambda: self.got == expected, timeout=15, what=what)


@pytest.fixture
def subject() -> str:
    return f"k{uuid.uuid4().hex[:12]}.events"


@pytest.fixture
async def publisher(kafka_url: str) -> AsyncIterator[KafkaBroker]:
    broker = KafkaBroker(kafka_url)
    await broker.connect()
    yield broker
    await broker.close(timeout=2)


async def fan_out(
    kafka_url: str, subject: str, client_id: str | None = None
) -> tuple[KafkaBroker, Deliveries]:
    """A connected client (with ``client_id`` when given) and its first fan-out subscription."""
    options: dict[str, Any] = {} if client_id is None else {"client_id": client_id}
    broker = KafkaBroker(kafka_url, **options)
    await broker.connect()
    got = Deliveries()
    await broker.subscribe(subject, got)
    return broker, got


async def publish(publisher: KafkaBroker, subject: str, *payloads: bytes) -> None:
    # One key: one partition, so every message lands where the group's committed offset is.
    for payload in payloads:
        await publisher.publish(subject, payload, key="k")
    await publisher.flush(timeout=10)


# -- the group of a fan-out subscriber -------------------------------------------------------------


async def test_a_returning_client_id_gets_the_same_fan_out_group_and_resumes_from_its_commits(
    kafka_cluster: MockKafkaCluster, kafka_url: str, subject: str, publisher: KafkaBroker
) -> None:
    client_id = f"svc-{uuid.uuid4().hex[:8]}"
    first, got = await fan_out(kafka_url, subject, client_id)
    try:
        await publish(publisher, subject, b"before")
        await got.wait_for([b"before"], "the first message")
    finally:
        await first.close(timeout=5)  # commits what was acked, leaves the group
    # The group of the documented name holds the commit (read by a client of its own).
    group = f"amb.{client_id}.1.{subject}"
    committed = await asyncio.to_thread(
        committed_offsets, kafka_cluster.bootstrap_servers, group, topic_for(subject)
    )
    assert sum(committed.values()) == 1, committed

    await publish(publisher, subject, b"while away")
    second, again = await fan_out(kafka_url, subject, client_id)
    try:
        await publish(publisher, subject, b"after")
        # Same group: it starts from the commit, so what came while nobody listened arrives too.
        await again.wait_for([b"while away", b"after"], "the missed and the new message")
    finally:
        await second.close(timeout=5)
    committed = await asyncio.to_thread(
        committed_offsets, kafka_cluster.bootstrap_servers, group, topic_for(subject)
    )
    assert sum(committed.values()) == 3, committed


async def test_without_a_client_id_a_new_client_is_a_new_group_and_starts_at_the_end(
    kafka_url: str, subject: str, publisher: KafkaBroker
) -> None:
    first, got = await fan_out(kafka_url, subject)
    try:
        await publish(publisher, subject, b"before")
        await got.wait_for([b"before"], "the first message")
    finally:
        await first.close(timeout=5)
    await publish(publisher, subject, b"while away")
    second, again = await fan_out(kafka_url, subject)
    try:
        assert second.client_id != first.client_id
        await publish(publisher, subject, b"after")
        await again.wait_for([b"after"], "the new message only")
    finally:
        await second.close(timeout=5)


async def test_every_fan_out_subscriber_has_a_group_of_its_own(
    kafka_cluster: MockKafkaCluster, kafka_url: str, subject: str, publisher: KafkaBroker
) -> None:
    """Two fan-out subscriptions of one client and one of another client with the same pattern:
    each gets every message (subscribers sharing a group would split them) and commits in
    its own group."""
    client_id = f"svc-{uuid.uuid4().hex[:8]}"
    one, got_one = await fan_out(kafka_url, subject, client_id)
    other, got_other = await fan_out(kafka_url, subject, f"{client_id}-other")
    try:
        got_two = Deliveries()
        await one.subscribe(subject, got_two)
        payloads = [f"m{i}".encode() for i in range(5)]
        await publish(publisher, subject, *payloads)
        for name, got in (("first", got_one), ("second", got_two), ("other client's", got_other)):
            await got.wait_for(payloads, f"every message at the {name} subscriber")
    finally:
        await one.close(timeout=5)
        await other.close(timeout=5)
    for group in (
        f"amb.{client_id}.1.{subject}",
        f"amb.{client_id}.2.{subject}",
        f"amb.{client_id}-other.1.{subject}",
    ):
        committed = await asyncio.to_thread(
            committed_offsets, kafka_cluster.bootstrap_servers, group, topic_for(subject)
        )
        assert sum(committed.values()) == len(payloads), (group, committed)


# -- the reply topic -------------------------------------------------------------------------------


async def test_the_reply_topic_is_created_once_per_client(
    kafka_cluster: MockKafkaCluster, kafka_url: str, subject: str, closing: Closing
) -> None:
    client_id = f"req-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_cluster.bootstrap_servers)
    await admin.start()
    responder = closing(AMB("kafka", kafka_url, agent_id="responder"))

    async def answer(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, f"re: {message}")

    async def ask(client: AMB, count: int) -> None:
        for i in range(count):
            assert await client.request(subject, i, timeout=15) == f"re: {i}"

    async def topics() -> set[str]:
        return set(await admin.list_topics())

    requester = closing(
        AMB("kafka", kafka_url, agent_id="requester", broker_options={"client_id": client_id})
    )
    again: AMB | None = None
    try:
        await responder.subscribe(subject, answer)
        await ask(requester, 1)
        inbox = requester.broker.inbox_prefix()
        assert inbox == f"_INBOX.{client_id}"
        after_first = await topics()
        assert {t for t in after_first if t.startswith("_INBOX")} == {inbox}

        await ask(requester, 5)  # five more reply subjects, one topic
        assert await topics() == after_first

        # The broker drops every connection and comes back: the clients reconnect.
        kafka_cluster.set_broker_down(1)
        kafka_cluster.set_broker_up(1)
        await ask(requester, 3)
        assert await topics() == after_first

        # A new client with the same identity replies through the same topic.
        await requester.close(timeout=5)
        again = AMB("kafka", kafka_url, agent_id="requester", broker_options={"client_id": client_id})
        await ask(again, 3)
        assert again.broker.inbox_prefix() == inbox
        assert await topics() == after_first
    finally:
        if again is not None:
            await again.close(timeout=5)
        await requester.close(timeout=5)
        await responder.close(timeout=5)
        await admin.close()
