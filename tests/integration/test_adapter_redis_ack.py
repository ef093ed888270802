"""Settling a handled stream entry on the Redis broker, against the real server: the ack removes
the entry from the group's pending list and from the stream (one command a message), also after
the server has forgotten the script, and an entry whose handler did not ack stays pending."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent_os.amb.broker import Delivery
from agent_os.bus_adapters.redis import RedisBroker
from tests.support import wait_until
from tests.support.brokers import redis_broker

pytestmark = pytest.mark.redis


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[RedisBroker]:
    async with redis_broker(prefix, claim_min_idle=30.0) as broker:
        yield broker


async def _settled(broker: RedisBroker, key: str, group: str) -> tuple[int, int]:
    """(entries pending on the group, entries left in the stream)."""
    return int((await broker.redis.xpending(key, group))["pending"]), int(await broker.redis.xlen(key))


async def test_handled_entries_are_acked_and_deleted_even_after_a_script_flush(
    broker: RedisBroker, prefix: str
) -> None:
    got: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.data)
        await delivery.ack()

    sub = await broker.subscribe(f"{prefix}.jobs", handler, durable=f"{prefix}-d")
    key = f"{broker.key_prefix}durable:{prefix}-d:{prefix}.jobs"
    try:
        for i in range(20):
            await broker.publish(f"{prefix}.jobs", b"m%d" % i)
        await wait_until(lambda: len(got) == 20, what="the first messages")

        async def all_settled() -> bool:
            return await _settled(broker, key, f"{prefix}-d") == (0, 0)

        await wait_until(all_settled, what="every entry acked and deleted")
        # A server that lost its script cache (restart, SCRIPT FLUSH): the ack loads it again.
        await broker.redis.script_flush()
        await broker.publish(f"{prefix}.jobs", b"after")
        await wait_until(lambda: len(got) == 21, what="a message after the flush")
        await wait_until(all_settled, what="the entry after the flush acked and deleted")
    finally:
        await sub.unsubscribe()


async def test_an_entry_not_acked_stays_pending_and_in_the_stream(broker: RedisBroker, prefix: str) -> None:
    seen = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.set()  # no ack

    sub = await broker.subscribe(f"{prefix}.jobs", handler, durable=f"{prefix}-n")
    key = f"{broker.key_prefix}durable:{prefix}-n:{prefix}.jobs"
    try:
        await broker.publish(f"{prefix}.jobs", b"kept")
        await asyncio.wait_for(seen.wait(), 10)
        assert await _settled(broker, key, f"{prefix}-n") == (1, 1)
    finally:
        await sub.unsubscribe()
