"""The Redis broker's bounded streams, against the real server: a group's stream and its
dead-letter stream keep at most about ``stream_maxlen`` entries (``XADD ... MAXLEN ~``), dropping
the oldest. Each test uses its own key prefix, deleted after.

Redis trims ``MAXLEN ~ N`` by whole stream nodes only: it never trims below N entries, and it
removes the oldest node as soon as the rest still hold N, so a trimmed stream holds fewer than
N + ``stream-node-max-entries`` (a server setting, 100 by default) entries. That is the bound
checked here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest

from agent_os.amb.broker import BrokerSubscription, Delivery
from agent_os.bus_adapters.redis import RedisBroker
from tests.support import wait_until
from tests.support.brokers import redis_broker

pytestmark = pytest.mark.redis

MAXLEN = 50


class Deliveries:
    """A broker-level handler that acks and records the payloads it receives."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.got.append(delivery.data)
        await delivery.ack()


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[RedisBroker]:
    async with redis_broker(prefix, stream_maxlen=MAXLEN) as broker:
        yield broker


async def node_max_entries(broker: RedisBroker) -> int:
    """The server's ``stream-node-max-entries``: how far above the bound ``MAXLEN ~`` may stay."""
    config = await broker.redis.config_get("stream-node-max-entries")
    return int(str(config["stream-node-max-entries"]))


async def field_values(broker: RedisBroker, key: str, field: bytes) -> list[bytes]:
    """``field`` of every entry of the stream ``key``, oldest first."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await broker.redis.xrange(key))
    return [fields[field] for _id, fields in entries]


async def join(
    broker: RedisBroker, kind: str, pattern: str, name: str, got: Deliveries
) -> BrokerSubscription:
    """Subscribe ``got`` as a member of the durable or queue group ``name``."""
    if kind == "durable":
        return await broker.subscribe(pattern, got, durable=name)
    return await broker.subscribe(pattern, got, queue=name)


@pytest.mark.parametrize("kind", ["durable", "queue"])
async def test_a_groups_stream_stays_within_stream_maxlen_and_keeps_the_newest(
    broker: RedisBroker, prefix: str, kind: str
) -> None:
    pattern, name = f"{prefix}.jobs", f"{prefix}-g"
    key = f"{broker.key_prefix}{kind}:{name}:{pattern}"
    slack = await node_max_entries(broker)
    # A member joins and leaves: the group stays (its lease runs on), nobody reads its stream,
    # so every publish lands in it and only trimming bounds it.
    first = await join(broker, kind, pattern, name, Deliveries())
    await first.unsubscribe()
    total = MAXLEN + 3 * slack
    longest = 0
    for i in range(total):
        await broker.publish(pattern, str(i).encode())
        longest = max(longest, await broker.redis.xlen(key))
    length = await broker.redis.xlen(key)
    assert MAXLEN <= length < MAXLEN + slack
    assert longest < MAXLEN + slack, f"the stream reached {longest} entries on the way"
    # Trimmed from the head only: what is left is the newest messages, in publish order.
    kept = await field_values(broker, key, b"d")
    assert kept == [str(i).encode() for i in range(total - length, total)]
    # The retained backlog is what the group delivers once a member is back.
    got = Deliveries()
    await join(broker, kind, pattern, name, got)
    await wait_until(lambda: len(got.got) == length, what=f"the {length} retained messages")
    assert got.got == kept


async def test_the_dead_letter_stream_stays_within_stream_maxlen(broker: RedisBroker, prefix: str) -> None:
    pattern, durable = f"{prefix}.jobs", f"{prefix}-d"
    key = f"{broker.key_prefix}durable:{durable}:{pattern}"
    dead_key = f"{broker.key_prefix}dead:{key}"
    slack = await node_max_entries(broker)
    got = Deliveries()
    await broker.subscribe(pattern, got, durable=durable)
    # Entries this adapter cannot read (no subject): each one is dead-lettered.
    total = MAXLEN + 3 * slack
    for i in range(total):
        await broker.redis.xadd(key, {b"junk": str(i).encode()})
    await wait_until(lambda: broker.dead_lettered == total, timeout=15, what=f"{total} dead letters")
    assert broker.malformed == total
    assert got.got == []
    length = await broker.redis.xlen(dead_key)
    assert MAXLEN <= length < MAXLEN + slack
    kept = await field_values(broker, dead_key, b"junk")
    assert kept == [str(i).encode() for i in range(total - length, total)]
