"""Kafka adapter, on the librdkafka mock cluster: a queue group's key affinity when handlers ack
after the dispatcher has moved on (``concurrency`` > 1).

After 16 deliveries of one key in a row the group consumer waits until their member has acked
them all before the key may move to another member. With ``concurrency`` > 1 the acks come
from the handler tasks, after the dispatcher reported the deliveries handled: the last ack must
wake the consumer, or the group's fetch stops for good (it did: the 17th message of a key never
came).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from tests.support import wait_until

pytestmark = pytest.mark.kafka


async def test_a_hot_key_moves_on_when_concurrent_handlers_ack_its_run(kafka_url: str) -> None:
    subject = f"k{uuid.uuid4().hex[:12]}.jobs"
    got: list[tuple[str, int]] = []
    clients = [AMB("kafka", kafka_url, agent_id=f"member-{i}") for i in range(2)]
    publisher = AMB("kafka", kafka_url, agent_id="publisher")  # its id is every message's key
    try:
        for client in clients:

            async def handle(message: Any, metadata: Metadata, client: AMB = client) -> None:
                got.append((client.agent_id, message))

            await client.subscribe(subject, handle, queue="workers", concurrency=4)
        for n in range(100):
            await publisher.publish(subject, n)
        await wait_until(lambda: len(got) >= 100, timeout=15, what="100 messages of one key")
    finally:
        for client in [publisher, *clients]:
            await client.close(timeout=5)
    assert sorted(n for _, n in got) == list(range(100))
    assert {member for member, _ in got} == {"member-0", "member-1"}, "the key moved between members"
