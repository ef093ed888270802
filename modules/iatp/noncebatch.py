"""Coalescing of shared nonce claims: the claims made while a round trip is out go in the next one.

Each claim still waits for its own answer; a failed round trip fails every claim in it
(``docs/trust.md``, "Shared replay protection").
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from agent_os.amb.numbers import seconds, whole

SendBatch = Callable[[Sequence[bytes], Sequence[int]], Awaitable[Sequence[bool]]]
"""One round trip: claim ``keys`` with their TTLs (ms); one answer per key, in order."""


class ClaimBatcher:
    """Sends claims through ``send``, one round trip at a time, each carrying every claim made
    while the one before was out (at most ``max_batch``).

    ``claim`` returns that claim's own answer, or raises what its round trip raised (an answer
    of the wrong length raises RuntimeError): never an answer from another round trip. A claim
    whose caller is cancelled is still sent if its batch was, and its answer dropped.
    """

    __slots__ = ("_closed", "_queue", "_runner", "batches", "failures", "max_batch", "send", "timeout")

    def __init__(self, send: SendBatch, *, timeout: float, max_batch: int = 1024) -> None:
        whole(max_batch, "max_batch", error=ValueError)
        seconds(timeout, "timeout", error=ValueError)
        self.send = send
        self.timeout = timeout
        self.max_batch = max_batch
        self.batches = 0  # round trips made (for tests and benchmarks)
        self.failures = 0  # claims failed: their round trip raised, or the batcher was closed
        self._queue: deque[tuple[bytes, int, asyncio.Future[bool]]] = deque()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called: every claim fails from then on."""
        return self._closed

    @property
    def waiting(self) -> int:
        """Claims waiting for a round trip (not counting those in the one out)."""
        return len(self._queue)

    async def claim(self, key: bytes, ttl_ms: int) -> bool:
        """Claim ``key`` for ``ttl_ms``: True if first, False if claimed before. Raises what the
        round trip raised (TimeoutError after ``timeout`` seconds)."""
        return await self.start(key, ttl_ms)

    def start(self, key: bytes, ttl_ms: int) -> asyncio.Future[bool]:
        """:meth:`claim` without waiting: the claim is queued now and the future gets its
        answer (or what its round trip raised). Needs a running event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if self._closed:  # fail closed: nothing is sent (or reconnected) once closed
            self._fail([(key, ttl_ms, future)], RuntimeError("the nonce store was closed"))
            return future
        self._queue.append((key, ttl_ms, future))
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        queue = self._queue
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                await self._round_trip(batch)
        finally:
            self._runner = None
            if queue:  # cancelled (closing): nothing will answer the rest
                self._fail(list(queue), RuntimeError("the nonce store was closed"))
                queue.clear()

    async def _round_trip(self, batch: list[tuple[bytes, int, asyncio.Future[bool]]]) -> None:
        self.batches += 1
        try:
            async with asyncio.timeout(self.timeout):
                answers = await self.send([k for k, _, _ in batch], [t for _, t, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers to {len(batch)} claims")
        except asyncio.CancelledError:
            self._fail(batch, RuntimeError("the nonce store was closed"))
            raise
        except Exception as exc:
            self._fail(batch, exc)
            return
        for (_, _, future), answer in zip(batch, answers, strict=True):
            if not future.done():
                future.set_result(bool(answer))

    def _fail(self, batch: list[tuple[bytes, int, asyncio.Future[bool]]], exc: BaseException) -> None:
        for _, _, future in batch:
            if not future.done():
                self.failures += 1
                future.set_exception(exc)
                future.exception()  # retrieved: a claim whose message was dropped logs nothing

    async def aclose(self) -> None:
        """Stop sending: claims not answered yet fail, and so does every later one."""
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._fail(list(self._queue), RuntimeError("the nonce store was closed"))
        self._queue.clear()
