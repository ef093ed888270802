"""What the test suites share, instead of test modules importing each other.

This module: a broker URL of the test's own, waiting for a condition, a collecting handler,
the process's memory. The modules beside it, one concern each: ``servers`` (where the shared
servers are), ``cleanup`` (deleting what tests leave on them), ``brokers`` (the conformance
suite's broker targets and fixtures), ``kafka`` (the librdkafka mock cluster), ``processes``
(services started as processes), ``identities`` (signing keys), ``envelopes``, ``embedders``,
``emk``, ``holds`` and ``queue_group`` (scenarios that a unit test and a server-bound test both
run), ``compose`` (a compose file's Agent OS services run natively). Fixtures live in each
folder's ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import inspect
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent_os.amb import Metadata


def memory_url(name: str = "test") -> str:
    """A URL of an in-memory broker of its own (``memory://<name>-<random>``): nothing the
    test publishes reaches another test's broker."""
    return f"memory://{name}-{uuid.uuid4().hex}"


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Wait until ``condition()`` is true; fail the test after ``timeout`` seconds.

    ``condition`` may be a coroutine function (a query to a server, say): it is awaited on each
    check, and the next check starts once it returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


class Collector:
    """A handler that records what it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.metadata: list[Metadata] = []

    async def __call__(self, message: Any, metadata: Metadata) -> None:
        self.messages.append(message)
        self.metadata.append(metadata)

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        try:
            await wait_until(lambda: len(self.messages) >= count, timeout, f"{count} messages")
        except AssertionError as exc:  # the count when it timed out, not when it started
            raise AssertionError(f"{exc} (have {len(self.messages)})") from None


def rss_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``), after a full collection and
    after glibc's ``malloc_trim`` hands back the free memory it keeps (freed memory an allocator
    holds on to is not a leak; where there is no glibc the figure includes it). Skips the test
    where there is no ``/proc/self/statm``."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pytest.skip("no /proc/self/statm to read the resident set size from")
