"""Malformed input on the Redis broker, against the real server: a stream entry or a pub/sub
message the adapter cannot read is dead-lettered (or dropped) with a reason and counted, and the
subscription goes on delivering what follows. Each test uses its own key prefix, deleted after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
from redis.typing import EncodableT, FieldT

from agent_os.amb.broker import Delivery
from agent_os.bus_adapters.redis import RedisBroker
from tests.support import wait_until
from tests.support.brokers import redis_broker

pytestmark = pytest.mark.redis


class Deliveries:
    """A broker-level handler that acks and records what it receives."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.got.append((delivery.subject, delivery.data))
        await delivery.ack()


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[RedisBroker]:
    async with redis_broker(prefix, claim_min_idle=0.2) as broker:
        yield broker


async def _dead_entries(broker: RedisBroker, key: str) -> list[dict[bytes, bytes]]:
    # redis-py annotates xrange for both decode_responses modes (str or bytes, and None); this
    # client does not decode, so the fields are bytes.
    entries = cast(
        "list[tuple[bytes, dict[bytes, bytes]]]", await broker.redis.xrange(f"{broker.key_prefix}dead:{key}")
    )
    return [fields for _id, fields in entries]


@pytest.mark.parametrize(
    "fields",
    [
        {b"junk": b"1"},  # neither subject nor data
        {b"s": b"x.y"},  # no data
        {b"d": b"payload"},  # no subject
        {b"s": b"\xff\xfe", b"d": b"payload"},  # a subject that is not UTF-8
        {b"s": b"not..a..subject", b"d": b"payload"},  # not a valid subject
    ],
)
async def test_malformed_stream_entry_is_dead_lettered_and_the_durable_keeps_delivering(
    broker: RedisBroker, prefix: str, fields: dict[FieldT, EncodableT]
) -> None:
    got = Deliveries()
    sub = await broker.subscribe(f"{prefix}.jobs", got, durable=f"{prefix}-d")
    key = f"{broker.key_prefix}durable:{prefix}-d:{prefix}.jobs"
    await broker.redis.xadd(key, fields)  # written by something other than this adapter
    await broker.publish(f"{prefix}.jobs", b"valid")
    await wait_until(lambda: got.got == [(f"{prefix}.jobs", b"valid")], what="the valid message")
    assert broker.malformed == 1
    assert broker.dead_lettered == 1
    dead = await _dead_entries(broker, key)
    assert len(dead) == 1
    assert dead[0][b"reason"].startswith(b"malformed")
    assert dead[0][b"group"] == f"{prefix}-d".encode()
    for name, value in fields.items():  # the original fields are kept
        assert value in dead[0].values(), name
    # Acked and removed: nothing pending, nothing left in the stream.
    assert (await broker.redis.xpending(key, f"{prefix}-d"))["pending"] == 0
    assert await broker.redis.xlen(key) == 0
    await broker.publish(f"{prefix}.jobs", b"after")
    await wait_until(lambda: len(got.got) == 2, what="a later message")
    await sub.unsubscribe()


async def test_malformed_entry_pending_on_a_dead_consumer_is_dead_lettered_on_claim(
    broker: RedisBroker, prefix: str
) -> None:
    """A poison entry left pending by a consumer that died is claimed by the next member, which
    dead-letters it instead of dying on it (and so does every later member)."""
    got = Deliveries()
    durable, pattern = f"{prefix}-d", f"{prefix}.jobs"
    key = f"{broker.key_prefix}durable:{durable}:{pattern}"
    first = await broker.subscribe(pattern, got, durable=durable)
    await first.unsubscribe()  # the group stays; no member now
    r = broker.redis
    await r.xadd(key, {b"junk": b"1"})
    await r.xadd(key, {b"s": pattern.encode(), b"d": b"pending-valid"})
    # A consumer takes both and dies without acking them.
    await r.xreadgroup(durable, "ghost", {key: ">"}, count=10)
    assert (await r.xpending(key, durable))["pending"] == 2
    await broker.subscribe(pattern, got, durable=durable)
    await wait_until(lambda: got.got == [(pattern, b"pending-valid")], what="the claimed valid entry")
    await wait_until(lambda: broker.malformed == 1, what="the claimed poison entry counted")
    dead = await _dead_entries(broker, key)
    assert [d[b"junk"] for d in dead] == [b"1"]
    await broker.publish(pattern, b"new")
    await wait_until(lambda: len(got.got) == 2, what="a new message")

    async def nothing_pending() -> bool:  # the ack follows the handler's return
        return int((await r.xpending(key, durable))["pending"]) == 0

    await wait_until(nothing_pending, what="every entry acknowledged")


async def test_pubsub_message_on_a_non_utf8_channel_is_dropped_and_counted(
    broker: RedisBroker, prefix: str
) -> None:
    got = Deliveries()
    await broker.subscribe(f"{prefix}.*", got)
    # Matches the PSUBSCRIBE glob, but is no subject this adapter could deliver.
    await broker.redis.publish(f"{prefix}.".encode() + b"\xff", b"junk")
    await broker.publish(f"{prefix}.ok", b"valid")
    await wait_until(lambda: got.got == [(f"{prefix}.ok", b"valid")], what="the valid message")
    assert broker.malformed == 1
