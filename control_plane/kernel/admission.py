"""Admission of executions: at most ``limit`` at once, the highest priority first."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Admission:
    """A priority gate: ``await admit(priority)`` ... ``release()``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def admit(self, priority: int) -> None:
        if self._running < self.limit and not self._waiters:
            self._running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted just as it was cancelled: give the slot on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the highest-priority waiter
                return
        self._running -= 1

    # -- the gate for other actions ------------------------------------------------------------
