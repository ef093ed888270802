"""The tests' wait_until helper: plain and coroutine conditions, and its timeout."""

from __future__ import annotations

import pytest

from tests.support import wait_until


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
