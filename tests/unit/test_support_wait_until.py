"""The tests' wait_until helper: plain and coroutine conditions, and its timeout; Collector."""

from __future__ import annotations

import asyncio

import pytest

from agent_os.amb import Metadata
from tests.support import Collector, wait_until


async def test_a_plain_condition_is_checked_until_it_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    await wait_until(third_time)
    assert len(calls) == 3


async def test_a_coroutine_condition_is_awaited_on_each_check() -> None:
    calls: list[int] = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    await wait_until(third_time)
    assert len(calls) == 3


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_condition_that_never_holds_fails_naming_what_was_awaited(asynchronous: bool) -> None:
    async def never_async() -> bool:
        return False

    def never() -> bool:
        return False

    with pytest.raises(AssertionError, match=r"timed out after 0.05s waiting for the answer"):
        await wait_until(never_async if asynchronous else never, timeout=0.05, what="the answer")


async def test_collector_timeout_names_the_count_when_it_timed_out() -> None:
    collector = Collector()

    async def arrive_late() -> None:
        await asyncio.sleep(0.02)
        await collector("one", Metadata.__new__(Metadata))

    task = asyncio.get_running_loop().create_task(arrive_late())
    with pytest.raises(AssertionError, match=r"2 messages \(have 1\)"):
        await collector.wait_for(2, timeout=0.2)
    await task
