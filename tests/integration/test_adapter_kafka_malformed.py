"""Malformed records on the Kafka broker, on the librdkafka mock cluster: records written by
something other than this adapter (a null or undecodable ``amb-subject`` header, a null
``amb-published-ns``) never end a group's fetch task; those that cannot be delivered are
dead-lettered with a reason, counted, and committed past, so they are not delivered again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from aiokafka import AIOKafkaProducer

from agent_os.amb.broker import Delivery
from agent_os.bus_adapters.kafka import KafkaBroker, dead_letter_topic, topic_for
from tests.support import wait_until
from tests.support.closing import Closing
from tests.support.kafka import MockKafkaCluster

pytestmark = pytest.mark.kafka


class Deliveries:
    """A broker-level handler that acks and records what it receives."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        await delivery.ack()

    @property
    def data(self) -> list[bytes]:
        return [d.data for d in self.got]


@pytest.fixture(scope="module")
def kafka_cluster() -> Iterator[MockKafkaCluster]:
    """One cluster for the module's tests (none takes it down): each test uses its own subject."""
    with MockKafkaCluster(brokers=1) as cluster:
        yield cluster


@pytest.fixture
async def raw(kafka_cluster: MockKafkaCluster) -> AsyncIterator[AIOKafkaProducer]:
    """A plain aiokafka producer: writes records the adapter did not shape."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_cluster.bootstrap_servers, acks="all")
    await producer.start()
    yield producer
    await producer.stop()


@pytest.fixture
def subject() -> str:
    return f"k{uuid.uuid4().hex[:12]}.jobs"


async def test_null_subject_header_is_ignored_and_the_group_keeps_fetching(
    kafka_url: str, raw: AIOKafkaProducer, subject: str, closing: Closing
) -> None:
    broker = closing(KafkaBroker(kafka_url))
    await broker.connect()
    got = Deliveries()
    try:
        await broker.subscribe(subject, got, durable=f"d-{uuid.uuid4().hex[:8]}")
        # A null header value is valid Kafka: the header counts as absent (the topic is the subject).
        await raw.send_and_wait(topic_for(subject), b"null-header", headers=[("amb-subject", None)])
        await broker.publish(subject, b"valid")
        await wait_until(lambda: got.data == [b"null-header", b"valid"], timeout=15, what="both records")
        assert [d.subject for d in got.got] == [subject, subject]
        assert broker.malformed == 0
    finally:
        await broker.close(timeout=2)


async def test_null_published_header_on_several_partitions_is_ignored(
    kafka_url: str, raw: AIOKafkaProducer, subject: str, closing: Closing
) -> None:
    """Records of several partitions fetched together are merged by their publish time; a null
    ``amb-published-ns`` falls back to the record's timestamp."""
    broker = closing(KafkaBroker(kafka_url))
    await broker.connect()
    got = Deliveries()
    topic = topic_for(subject)
    try:
        await broker._ensure_topic(topic)
        for partition in range(4):  # the mock makes 4 partitions per topic
            await raw.send_and_wait(
                topic,
                f"p{partition}".encode(),
                partition=partition,
                headers=[("amb-subject", subject.encode()), ("amb-published-ns", None)],
            )
        # A durable group reads its topic from the start: the four arrive in one fetch.
        await broker.subscribe(subject, got, durable=f"d-{uuid.uuid4().hex[:8]}")
        await wait_until(lambda: len(got.got) == 4, timeout=15, what="the four records")
        assert sorted(got.data) == [b"p0", b"p1", b"p2", b"p3"]
        await broker.publish(subject, b"valid")
        await wait_until(lambda: got.data[-1:] == [b"valid"], timeout=15, what="a later record")
    finally:
        await broker.close(timeout=2)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\xff\xfe", "malformed: the amb-subject header is not UTF-8"),
        (b"not a subject", "malformed: "),
    ],
)
async def test_record_with_a_bad_subject_header_is_dead_lettered_and_committed(
    kafka_url: str, raw: AIOKafkaProducer, subject: str, header: bytes, reason: str, closing: Closing
) -> None:
    durable = f"d-{uuid.uuid4().hex[:8]}"
    dead_topic = dead_letter_topic(topic_for(subject))
    broker = closing(KafkaBroker(kafka_url))
    await broker.connect()
    got, dead = Deliveries(), Deliveries()
    try:
        await broker._ensure_topic(dead_topic)
        await broker.subscribe(dead_topic, dead)
        await broker.subscribe(subject, got, durable=durable)
        await raw.send_and_wait(topic_for(subject), b"poison", key=b"k", headers=[("amb-subject", header)])
        await broker.publish(subject, b"valid")
        await wait_until(lambda: got.data == [b"valid"], timeout=15, what="the valid record")
        await wait_until(lambda: len(dead.got) == 1, timeout=15, what="the dead letter")
        assert broker.malformed == 1
        assert broker.dead_lettered == 1
        letter = dead.got[0]
        assert letter.data == b"poison"
        assert letter.subject == dead_topic
        headers = dict(letter.extra["headers"])
        assert headers["amb-dead-reason"].decode().startswith(reason)
        assert headers["amb-dead-topic"] == topic_for(subject).encode()
        assert headers["amb-dead-group"] == durable.encode()
        assert headers["amb-dead-subject"] == header
    finally:
        await broker.close(timeout=2)
    # The poison record was committed past: the durable's next member does not see it again.
    again = closing(KafkaBroker(kafka_url))
    await again.connect()
    later = Deliveries()
    try:
        await again.subscribe(subject, later, durable=durable)
        await again.publish(subject, b"after")
        await wait_until(lambda: later.data == [b"after"], timeout=15, what="only the new record")
        assert again.malformed == 0
    finally:
        await again.close(timeout=2)
