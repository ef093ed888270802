"""Stopping adapters' background tasks: a cancellation lost inside a client library (Python
3.11's ``asyncio.wait_for`` drops one that comes as its inner call finishes; redis-py sends
every command through it) must not leave a reader running, nor ``close()`` waiting for ever.
``tests/integration/test_adapter_stop_task_redis.py`` closes a Redis client right after subscribing."""

from __future__ import annotations

import asyncio

import pytest

from agent_os.amb.dispatch import stop_task


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
