"""Kafka adapter: records of several partitions fetched together keep their partition, offset
and per-key order, on the librdkafka mock cluster (a real Kafka-protocol server in-process)."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest

from agent_os.amb.broker import Delivery
from agent_os.bus_adapters.kafka import KafkaBroker
from tests.support import wait_until
from tests.support.closing import Closing

pytestmark = pytest.mark.kafka


async def test_records_fetched_from_several_partitions_keep_their_own_positions(
    kafka_url: str, closing: Closing
) -> None:
    subject = f"parts{uuid.uuid4().hex[:10]}.jobs"
    publisher, consumer = closing(KafkaBroker(kafka_url)), closing(KafkaBroker(kafka_url))
    seen: list[tuple[str, int, int, int]] = []  # key, sequence, partition, offset

    async def handle(d: Delivery) -> None:
        key, seq = d.data.decode().split(":")
        seen.append((key, int(seq), int(d.extra["partition"]), int(d.extra["offset"])))
        await d.ack()

    try:
        await publisher.connect()
        await consumer.connect()
        await consumer.subscribe(subject, handle, durable=f"parts-{uuid.uuid4().hex[:8]}")
        # Pipelined publishes: all land before the consumer's next fetch, which then brings
        # several partitions at once.
        for seq in range(10):
            for key in "abcdefgh":
                await publisher.publish(subject, f"{key}:{seq}".encode(), key=key)
        await publisher.flush(timeout=10)
        await wait_until(lambda: len(seen) == 80, timeout=15, what="80 deliveries")
    finally:
        await publisher.close(timeout=2)
        await consumer.close(timeout=2)

    positions = [(p, o) for _, _, p, o in seen]
    assert len(set(positions)) == 80, "each record has its own (partition, offset)"
    by_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for key, seq, partition, offset in seen:
        by_key[key].append((seq, partition, offset))
    assert len({p for _, _, p, _ in seen}) > 1, "the keys spread over several partitions"
    for key, records in by_key.items():
        assert [s for s, _, _ in records] == list(range(10)), f"key {key} in publish order"
        assert len({p for _, p, _ in records}) == 1, f"key {key} stays on one partition"
        offsets = [o for _, _, o in records]
        assert offsets == sorted(offsets)
