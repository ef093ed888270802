"""The ``closing`` fixture's helper closes what a test registered, newest first, even when the
test fails."""

from __future__ import annotations

import contextlib

import pytest

from agent_os.amb import AMB, LifecycleState
from tests.support import memory_url
from tests.support.closing import Closing


class Log:
    def __init__(self) -> None:
        self.closed: list[str] = []


class Managed:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def __aenter__(self) -> Managed:
        raise AssertionError("registering must not enter")

    async def __aexit__(self, *exc: object) -> None:
        self.log.closed.append("__aexit__")


class Closable:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def close(self) -> None:
        self.log.closed.append("close")


class Stoppable:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def stop(self) -> None:
        self.log.closed.append("stop")


async def test_what_a_failing_test_registered_is_closed_newest_first() -> None:
    log = Log()

    async def failing_test() -> None:
        async with contextlib.AsyncExitStack() as stack:
            closing = Closing(stack)
            managed = Managed(log)
            assert closing(managed) is managed
            closing(Closable(log))
            closing(Stoppable(log))
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        await failing_test()
    assert log.closed == ["stop", "close", "__aexit__"]


async def test_a_client_is_closed_whether_or_not_the_test_closed_it() -> None:
    async with contextlib.AsyncExitStack() as stack:
        closing = Closing(stack)
        left_open = closing(AMB("memory", memory_url()))
        closed = closing(AMB("memory", memory_url()))
        await left_open.publish("c.x", 1)
        await closed.publish("c.x", 1)
        await closed.close()
    assert left_open.state is LifecycleState.CLOSED
    assert closed.state is LifecycleState.CLOSED
