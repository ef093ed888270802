"""Subscriptions of the AMB client: their options, the live subscription, the stream form."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent_os.amb.broker import BrokerSubscription
from agent_os.amb.dispatch import Dispatcher, stop_caller
from agent_os.amb.envelope import Envelope
from agent_os.amb.errors import ConfigError
from agent_os.amb.filters import FilterSpec, Predicate, compile_filter
from agent_os.amb.metadata import Metadata
from agent_os.amb.middleware import ConsumeNext
from agent_os.amb.numbers import seconds, whole
from agent_os.amb.slots import Slots

if TYPE_CHECKING:
    from agent_os.amb.client import AMB

log = logging.getLogger("agent_os.amb.subscription")

Handler = Callable[[Any, Metadata], Awaitable[Any]]
"""A subscription handler: ``async def handler(message, metadata)``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionOptions:
    """How a subscription receives messages (see :meth:`agent_os.amb.AMB.subscribe`); checked on creation."""

    queue: str | None = None
    durable: str | None = None
    filter: Predicate | None = None
    concurrency: int = 1
    max_attempts: int = 1
    retry_delay: float = 0.1
    context: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        # Kept as plain int and float (NumPy numbers, Fractions ... are taken by their value).
        object.__setattr__(self, "concurrency", whole(self.concurrency, "concurrency"))
        object.__setattr__(self, "max_attempts", whole(self.max_attempts, "max_attempts"))
        object.__setattr__(self, "retry_delay", seconds(self.retry_delay, "retry_delay", zero=True))
        if self.queue is not None and not self.queue:
            raise ConfigError("queue group name must be non-empty")
        if self.durable is not None and not self.durable:
            raise ConfigError("durable name must be non-empty")


class Subscription:
    """A live subscription of an :class:`~agent_os.amb.AMB` client.

    Its underscored state is the client's: the client's receive path reads it per message."""

    def __init__(self, client: AMB, pattern: str, handler: Handler, options: SubscriptionOptions) -> None:
        self.client = client
        self.pattern = pattern
        self.handler = handler
        self.options = options
        self.handled = 0
        self.errors = 0
        self._broker_sub: BrokerSubscription | None = None
        self._chain: ConsumeNext | None = None  # the middleware chain; None: call the handler
        self._filter = options.filter
        self._slots = Slots(options.concurrency) if options.concurrency > 1 else None
        self._tasks: set[asyncio.Task[None]] = set()
        # Look-ahead (set on start when a middleware asks for it): prepared deliveries wait
        # for their turn in _ahead; lookahead is its bound (0: none).
        self.lookahead = 0
        self._ahead: Dispatcher[tuple[Any, Any, Metadata, int | None]] | None = None
        self._prepares: tuple[Callable[[Envelope, Metadata], None], ...] = ()
        self._abandons: tuple[Callable[[Envelope, Metadata], None], ...] = ()
        self._turns = 0  # turns taken from _ahead
        self._refill_every = 1  # turns between two chances for arrivals to refill _ahead
        self._active = False
        # Seeds every delivery's metadata.context: the subscription itself, then its context option.
        self.context: dict[str, Any] = {**(options.context or {}), "subscription": self}

    @property
    def active(self) -> bool:
        return self._active

    async def unsubscribe(self) -> None:
        """Stop delivery now; messages still queued for this subscription are dropped. Returns
        once the handlers in progress have finished (called by one of them: the others)."""
        try:
            if self._broker_sub is not None and self._active:
                self._active = False
                if self._slots is not None:  # first: a delivery may wait for a slot the caller holds
                    self._slots.close()
                if self._ahead is not None:  # first: the broker's task may be waiting for room in it
                    self._abandon(await self._ahead.stop(None, drop=True))
                await self._broker_sub.unsubscribe()
                await self._wait_tasks(None)
        finally:  # stopped for good even if the stop raised or was cancelled
            self.client._forget(self)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop receiving, let queued and in-flight messages finish (up to ``timeout``; called by
        a handler, it does not wait for that handler). Raises ConfigError for a ``timeout``
        that is not a finite number of seconds, 0 or more, before anything stops."""
        if timeout is not None:
            timeout = seconds(timeout, "timeout", zero=True)
        if not (self._broker_sub is not None and self._active):
            self.client._forget(self)
            return
        self._active = False
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            if self._ahead is not None and self._ahead.in_handler():
                # Called by the handler, whose turn holds up the queue (and the broker's task
                # waiting for room in it): what waits is dropped, as a broker does from inside.
                self._abandon(await self._ahead.stop(None, drop=True))
            await self._broker_sub.drain(timeout)
            if self._ahead is not None:
                self._abandon(await self._ahead.stop(remaining()))
            await self._wait_tasks(remaining())
        finally:  # stopped for good even if the drain raised or was cancelled
            self.client._forget(self)

    def _abandon(self, items: list[tuple[Any, Any, Metadata, int | None]]) -> None:
        """Tell the middleware that prepared them that ``items`` are dropped before their turn."""
        for _, _, meta, _ in items:
            self._call_hooks(self._abandons, meta, "abandon")

    def _call_hooks(
        self, hooks: tuple[Callable[[Envelope, Metadata], None], ...], meta: Metadata, what: str
    ) -> None:
        """Call look-ahead hooks (``prepare`` or ``abandon``) on a delivery; one that raises is
        logged and skipped (its middleware does the work in the message's turn, if it has one)."""
        envelope = meta.envelope
        for hook in hooks:
            try:
                hook(envelope, meta)
            except Exception:
                log.exception("a middleware's %s raised on %r", what, self.pattern)

    async def _wait_tasks(self, timeout: float | None) -> None:
        """Wait for the handler tasks (``concurrency>1``), cancelling those still running after
        ``timeout``; a handler stopping its own subscription is not waited for."""
        caller = stop_caller()
        tasks = {task for task in self._tasks if task is not caller}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def __repr__(self) -> str:
        return f"Subscription({self.pattern!r}, queue={self.options.queue!r}, active={self._active})"


class MessageStream:
    """An async iterator over the messages of a pattern (``async for message in amb.stream(...)``).

    Subscribes on first use; yields payloads, or ``(payload, metadata)`` pairs with
    ``with_metadata=True``. A bounded buffer (``buffer`` messages) gives backpressure: when the
    consumer falls behind, the broker stops handing over messages. ``aclose()`` (or leaving an
    ``async with`` block, or breaking out of ``async for`` inside one) unsubscribes.
    """

    def __init__(
        self,
        client: AMB,
        pattern: str,
        *,
        queue: str | None,
        filter: FilterSpec | None,
        buffer: int,
        with_metadata: bool,
    ) -> None:
        whole(buffer, "stream buffer")
        self._client = client
        self._pattern = pattern
        self._queue_group = queue
        self._filter = filter
        self._with_metadata = with_metadata
        # None: the end, put there by aclose (and put back by the reader that takes it).
        self._items: asyncio.Queue[tuple[Any, Metadata] | None] = asyncio.Queue(maxsize=buffer)
        self._sub: Subscription | None = None
        self._closed = False

    async def _on_message(self, message: Any, metadata: Metadata) -> None:
        if not self._closed:
            await self._items.put((message, metadata))

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._sub is None:
            await self.start()
        item = await self._items.get()
        if item is None or self._closed:
            self._end()  # for any other reader waiting
            raise StopAsyncIteration
        message, metadata = item
        return (message, metadata) if self._with_metadata else message

    async def start(self) -> None:
        """Subscribe now (otherwise the first ``__anext__`` does)."""
        if self._sub is None:
            options = SubscriptionOptions(queue=self._queue_group, filter=compile_filter(self._filter))
            self._sub = await self._client._subscribe(self._pattern, self._on_message, options)

    async def aclose(self) -> None:
        """Unsubscribe and end the stream: what the buffer holds is dropped, and a reader
        waiting for the next message gets the end. Idempotent."""
        self._closed = True
        # First empty the buffer: the broker's task may be waiting for room in it, and the
        # unsubscribe waits for that task.
        self._drop_buffered()
        if self._sub is not None:
            await self._sub.unsubscribe()
        self._end()

    def _drop_buffered(self) -> None:
        items = self._items
        while not items.empty():
            items.get_nowait()

    def _end(self) -> None:
        """Leave only the end (None) in the buffer, for a reader waiting or to come."""
        self._drop_buffered()
        self._items.put_nowait(None)

    async def __aenter__(self) -> MessageStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
