"""The test helpers that delete what durable subscriptions leave on the shared servers delete
exactly the test's own: its JetStream stream (and consumer), its Redis streams, groups and
registry entries, and nothing of another prefix."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from tests.support.cleanup import delete_nats_streams, delete_redis_keys
from tests.support.servers import NATS_URL, REDIS_URL


async def _ignore(message: Any, metadata: Metadata) -> None:
    return None


async def _leave_durables(backend: str, url: str, prefixes: list[str]) -> None:
    client = AMB(backend=backend, connection_string=url)
    await client.connect()
    for prefix in prefixes:
        await client.subscribe(f"{prefix}.jobs", _ignore, durable=f"{prefix}-d")
        await client.subscribe(f"{prefix}.work", _ignore, queue="workers")
        await client.publish(f"{prefix}.jobs", 1)
    await client.close()


@pytest.mark.nats
async def test_nats_streams_of_the_prefix_are_deleted() -> None:
    import nats

    mine, other = f"t{uuid.uuid4().hex[:12]}", f"t{uuid.uuid4().hex[:12]}"
    await _leave_durables("nats", NATS_URL, [mine, other])

    async def streams() -> set[str]:
        nc = await nats.connect(NATS_URL)
        try:
            return {
                s
                for info in await nc.jsm().streams_info()
                for s in info.config.subjects or ()
                if s[:13] in (mine, other)
            }
        finally:
            await nc.close()

    assert await streams() == {f"{mine}.jobs", f"{other}.jobs"}
    assert await delete_nats_streams(mine, min_idle=3600) == [], "a stream just used is kept"
    assert len(await delete_nats_streams(mine)) == 1
    assert await streams() == {f"{other}.jobs"}
    await delete_nats_streams(other)
    assert await streams() == set()


@pytest.mark.redis
async def test_redis_keys_of_the_prefix_are_deleted() -> None:
    import redis.asyncio as aioredis

    mine, other = f"t{uuid.uuid4().hex[:12]}", f"t{uuid.uuid4().hex[:12]}"
    await _leave_durables("redis", REDIS_URL, [mine, other])
    r = aioredis.Redis.from_url(REDIS_URL)
    try:

        async def keys(prefix: str) -> set[str]:
            return {k.decode() async for k in r.scan_iter(match=f"amb:*{prefix}*")}

        assert f"amb:groups:{mine}" in await keys(mine)
        assert f"amb:durable:{mine}-d:{mine}.jobs" in await keys(mine)
        await delete_redis_keys(REDIS_URL, subject_prefix=mine)
        assert await keys(mine) == set()
        assert f"amb:durable:{other}-d:{other}.jobs" in await keys(other)
        await delete_redis_keys(REDIS_URL, subject_prefix=other)
        assert await keys(other) == set()
    finally:
        await r.aclose()
