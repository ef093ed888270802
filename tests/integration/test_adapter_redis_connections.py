"""Redis adapter, against the real server: a client with more commands in flight than it has
connections makes them wait for a free one instead of failing them.

redis-py's default connection pool raises ``MaxConnectionsError`` once all of its connections
(100) are in use, which reached callers as ``BrokerUnavailable``: 300 concurrent publishes from
one client failed 201 of them, and a request/reply soak with 128 requests in flight failed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent_os.amb import AMB, ConfigError, Metadata
from agent_os.bus_adapters.redis import RedisBroker
from tests.support import wait_until
from tests.support.servers import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("redis_subjects")]


async def test_more_concurrent_publishes_than_connections_all_go_through(prefix: str) -> None:
    got: list[Any] = []

    async def record(message: Any, metadata: Metadata) -> None:
        got.append(message)

    receiver = AMB("redis", REDIS_URL)
    sender = AMB("redis", REDIS_URL, broker_options={"max_connections": 4})
    try:
        await receiver.subscribe(f"{prefix}.x", record)
        await receiver.subscribe(f"{prefix}.x", record, queue="workers")  # a stream too
        results = await asyncio.gather(
            *(sender.publish(f"{prefix}.x", n) for n in range(300)), return_exceptions=True
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        await wait_until(lambda: len(got) >= 600, timeout=15, what="300 messages to each subscription")
    finally:
        await sender.close()
        await receiver.close()
    assert sorted(got) == sorted([*range(300), *range(300)])
    pool = sender.broker.redis.connection_pool  # type: ignore[attr-defined]
    assert pool.max_connections == 4


def test_max_connections_below_two_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        RedisBroker(REDIS_URL, max_connections=1)
