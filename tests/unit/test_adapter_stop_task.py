"""Stopping adapters' background tasks: a cancellation lost inside a client library (Python
3.11's ``asyncio.wait_for`` drops one that comes as its inner call finishes; redis-py sends
every command through it) must not leave a reader running, nor ``close()`` waiting for ever."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from agent_os.amb.dispatch import stop_task
from tests.conformance.cleanup import REDIS_URL, delete_redis_keys


async def test_stop_task_cancels_again_a_task_that_lost_its_cancellation() -> None:
    rounds = 0

    async def loses_the_first_cancellation() -> None:
        nonlocal rounds
        lost = False
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True  # as a library that drops it would: the loop goes on

    task = asyncio.get_running_loop().create_task(loses_the_first_cancellation())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(stop_task(task), 2)
    assert task.cancelled()


async def test_stop_task_logs_the_exception_a_task_ended_with(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("broken reader")

    task = asyncio.get_running_loop().create_task(fails(), name="reader")
    await asyncio.sleep(0)
    await stop_task(task)
    assert "broken reader" in caplog.text


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
