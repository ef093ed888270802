"""The handler slots of a subscription with ``concurrency`` above 1.

A semaphore that can be closed: unsubscribing closes it, so a delivery waiting for a slot (in
the broker's task, or the look-ahead queue's) is dropped at once instead of waiting for a
handler, perhaps the very handler that is unsubscribing.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """At most ``size`` handler calls at once; see the module."""

    __slots__ = ("_closed", "_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._closed = False
        # Waiting takers, first come first served; a release hands its slot to the first one
        # still waiting (a cancelled one stays here, done, until then).
        self._waiters: deque[asyncio.Future[bool]] = deque()

    async def take(self) -> bool:
        """Take a slot, waiting for one while all are taken. False (no slot taken) once closed."""
        if self._closed:
            return False
        if self._free:
            self._free -= 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # The waiter is done: cancelled with its taker, or given a slot (or the close)
            # just before the taker was cancelled. A slot given is passed on.
            if not waiter.cancelled() and waiter.result():
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back: to the first taker waiting, if any."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1

    def close(self) -> None:
        """From now on :meth:`take` returns False, at once, and so do the takers waiting."""
        self._closed = True
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)
