"""Stopping the Redis adapter's stream reader: a cancellation lost inside redis-py (Python 3.11's
``asyncio.wait_for`` drops one that comes as its inner call finishes) must not leave a reader
running, nor ``close()`` waiting for ever (``tests/unit/test_adapter_stop_task.py`` tests
``stop_task`` itself)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from tests.support.cleanup import delete_redis_keys
from tests.support.servers import REDIS_URL


async def _ignore(message: Any, metadata: Metadata) -> None:
    return None


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["durable", "queue"])
async def test_redis_client_closes_at_once_right_after_subscribing(kind: str) -> None:
    """The stream reader's first commands are in flight when close() cancels it (this hung for
    ever: the lost cancellation left the reader looping on XREADGROUP)."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        for _ in range(5):
            client = AMB(backend="redis", connection_string=REDIS_URL)
            await client.connect()
            if kind == "durable":
                await client.subscribe(f"{prefix}.jobs", _ignore, durable=f"{prefix}-d")
            else:
                await client.subscribe(f"{prefix}.jobs", _ignore, queue="workers")
            start = time.monotonic()
            await asyncio.wait_for(client.close(), 10)
            assert time.monotonic() - start < 2.0
    finally:
        await delete_redis_keys(REDIS_URL, subject_prefix=prefix)
