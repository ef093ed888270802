"""Closing what a test opens, whether it passed or failed: the ``closing`` fixture's helper.

A test hands each client, kernel, recorder, broker or service it builds to ``closing``, which
returns it unchanged; after the test, newest first, each is closed as ``async with`` would
(its ``__aexit__``), else by its ``close()`` (the broker adapters) or its ``stop()`` (the admin
API). Closing twice is harmless: every class here closes idempotently, so a test may still
close something itself, to assert on what closing did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar, runtime_checkable


@runtime_checkable
class Closable(Protocol):
    def close(self) -> Awaitable[object]: ...


@runtime_checkable
class Stoppable(Protocol):
    def stop(self) -> Awaitable[object]: ...


T = TypeVar("T", bound=AbstractAsyncContextManager[Any] | Closable | Stoppable)


class Closing:
    """Registers what a test opened on ``stack``; see the module docstring."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    def __call__(self, thing: T) -> T:
        if isinstance(thing, AbstractAsyncContextManager):
            self._stack.push_async_exit(thing)
        elif isinstance(thing, Closable):
            self._stack.push_async_callback(thing.close)
        else:
            self._stack.push_async_callback(thing.stop)
        return thing
