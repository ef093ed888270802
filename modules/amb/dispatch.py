"""The per-subscription dispatcher every broker adapter uses to feed a handler.

A :class:`Dispatcher` keeps the Broker contract (one delivery at a time, in order; a handler's
error never stops the subscription; drain within a timeout), fed queued or inline;
:class:`LocalDelivery` redelivers locally for brokers that cannot (see ``docs/bus.md``).

Over 400 lines: :class:`Dispatcher` is one class whose queued and inline paths, requeue and
drain share its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec

from agent_os.amb.errors import ConfigError
from agent_os.amb.numbers import whole
from agent_os.amb.subjects import validate_name

log = logging.getLogger("agent_os.amb.dispatch")

NO_EXTRA: Final[Mapping[str, Any]] = MappingProxyType({})
"""The ``extra`` of a first local delivery: shared by all of them, so read-only."""


# Tasks started by stop_together, each mapped to the task that called it; a task leaves the map
# when it ends. Not a context variable: tasks those stops start in turn (NATS finishing an
# unsubscribe once the handler has returned) must not pass for the caller.
_stop_callers: dict[asyncio.Task[Any], asyncio.Task[Any] | None] = {}


def stop_caller() -> asyncio.Task[Any] | None:
    """The task that called the stop (unsubscribe, drain, close) running now: the current task,
    or the caller of :func:`stop_together` in a task it started."""
    me = asyncio.current_task()
    if me is not None and me in _stop_callers:
        return _stop_callers[me]
    return me


def is_stop_caller(task: asyncio.Task[Any] | None) -> bool:
    """True when ``task`` called the stop running now (see :func:`stop_caller`). A stop never
    waits for, nor cancels, its caller: a handler stopping its own subscription would wait for
    itself."""
    return task is not None and (task is asyncio.current_task() or task is stop_caller())


async def stop_together(stops: Iterable[Coroutine[Any, Any, None]]) -> list[BaseException | None]:
    """Run ``stops`` concurrently, each in a task that acts for the caller (see
    :func:`stop_caller`); return what each raised (None: nothing), once all have ended."""
    caller = stop_caller()
    tasks = [asyncio.ensure_future(stop) for stop in stops]
    for task in tasks:
        _stop_callers[task] = caller
        task.add_done_callback(_forget_stop)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [result if isinstance(result, BaseException) else None for result in results]


def _forget_stop(task: asyncio.Task[Any]) -> None:
    _stop_callers.pop(task, None)


class _Stoppable(Protocol):
    async def drain(self, timeout: float | None = None) -> None: ...


class SourceMessage(Protocol):
    """What :meth:`Dispatcher.deliver_message` needs of a source's message (a nats-py Msg)."""

    subject: str
    data: bytes


T = TypeVar("T")


class InstantHandler(Generic[T]):
    """A delivery handler with a synchronous first try: ``now(item)`` handles a delivery at
    once, in the task that offers it, and returns True, or returns False to have it queued for
    ``call`` as usual. A :class:`Dispatcher` tries ``now`` only when nothing is queued or being
    handled (the order holds). ``now`` never awaits, so it cannot wait on the task that offers
    the delivery; it saves that delivery a hop through the event loop (the bus's reply inbox:
    a reply resolves its request in the replier's task, see ``docs/bus.md``).
    """

    __slots__ = ("call", "now")

    def __init__(self, call: Callable[[T], Awaitable[None]], now: Callable[[T], bool]) -> None:
        self.call = call
        self.now = now

    def __call__(self, item: T) -> Awaitable[None]:
        return self.call(item)


class Dispatcher(Generic[T]):
    """Feeds ``handler`` one delivery at a time from a bounded queue or inline (see the module).

    ``max_pending`` bounds the queue (``put`` waits for room; ``requeue`` may exceed it: those
    messages were counted once already). ``on_handled`` is called after each handler call (a
    source uses it to ask for more). ``handler_errors`` counts handler exceptions. An
    :class:`InstantHandler` gets its synchronous try from :meth:`offer` (and so :meth:`put`).
    """

    __slots__ = (
        "__weakref__",
        "_busy",
        "_current",
        "_getter",
        "_idle",
        "_items",
        "_loop",
        "_now",
        "_putters",
        "_runner",
        "_source_task",
        "_stopping",
        "_timers",
        "handle",
        "handler",
        "handler_errors",
        "max_pending",
        "name",
        "on_handled",
    )

    def __init__(
        self,
        handler: Callable[[T], Awaitable[None]],
        *,
        max_pending: int,
        name: str,
        on_handled: Callable[[], object] | None = None,
    ) -> None:
        whole(max_pending, "max_pending")
        self.handler = handler
        self.max_pending = max_pending
        self.name = name
        self.on_handled = on_handled
        self.handler_errors = 0
        self.handle = DispatcherHandle(self)
        """What this dispatcher's :class:`LocalDelivery` objects refer to (weakly, to it)."""
        self._now = handler.now if isinstance(handler, InstantHandler) else None
        self._items: deque[T] = deque()
        self._busy = False  # a handler call is in progress (in the runner or inline)
        self._current: asyncio.Task[Any] | None = None  # the task inside the handler
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._getter: asyncio.Future[None] | None = None  # the parked runner
        self._idle: asyncio.Future[None] | None = None  # waiters for the end of an inline call
        # Publishes waiting for room; a wake-up's result is the dispatcher that gave it.
        self._putters: deque[asyncio.Future[Dispatcher[Any]]] = deque()
        self._timers: set[asyncio.TimerHandle] = set()
        self._source_task: asyncio.Task[Any] | None = None  # the task calling deliver_message
        # The loop, for asyncio.current_task(loop): without it every call asks the running
        # loop, which costs a getpid() system call on CPython.
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    # -- state ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Deliveries queued (not counting the one being handled)."""
        return len(self._items)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def busy(self) -> bool:
        """A handler call is in progress."""
        return self._busy

    def in_handler(self) -> bool:
        """True when called from inside this dispatcher's handler (directly, or through a stop
        it started in other tasks: see :func:`stop_together`)."""
        return is_stop_caller(self._current)

    def has_room(self) -> bool:
        return len(self._items) < self.max_pending

    # -- queued entry -----------------------------------------------------------------------

    def offer(self, item: T) -> bool:
        """Enqueue without waiting; False when the queue is full or the dispatcher stopped."""
        items = self._items
        if len(items) >= self.max_pending or self._stopping:
            return False
        if self._now is not None and not items and not self._busy and self._instant(item):
            return True
        items.append(item)
        if self._getter is not None or self._runner is None:  # else the runner is busy: it will see it
            self._wake_runner()
        return True

    async def put(self, item: T) -> bool:
        """Enqueue, waiting while the queue is full. False (the item dropped) once stopping."""
        waited = False
        while not self.offer(item):
            if self._stopping:
                return False
            await room_in_any((self,))
            waited = True
        if waited:
            self.pass_on_room()  # an item handled inline takes no room: there may be some left
        return True

    def requeue(self, item: T, delay: float | None = None) -> None:
        """Put ``item`` back after ``delay`` seconds, beyond the bound; dropped once stopped."""
        if delay:
            handle: asyncio.TimerHandle

            def fire() -> None:
                self._timers.discard(handle)
                self.requeue(item)

            handle = asyncio.get_running_loop().call_later(delay, fire)
            self._timers.add(handle)
            return
        self.push(item)

    def push(self, item: T) -> None:
        """Enqueue ignoring the bound (for a source that bounds itself); dropped once stopped."""
        if self._stopping and (self._runner is None or self._runner.done()) and not self._busy:
            return
        self._items.append(item)
        self._wake_runner()

    # -- inline entry -----------------------------------------------------------------------

    async def deliver(self, item: T) -> None:
        """Run the handler on ``item`` in this task if the dispatcher is idle, else queue it.

        Meant for a source with one task per subscription that awaits each call (nats-py's
        callback task): that task is the backpressure. Dropped once stopping.
        """
        if self._busy or self._items:
            await self.put(item)
            return
        if self._stopping:
            return
        # The per-message path of callback sources (see "the handler call" below).
        self._busy = True
        self._current = asyncio.current_task(self._loop)
        try:
            await self.handler(item)
        except Exception:
            self.handler_errors += 1
            log.exception("%s: handler raised", self.name)
        except asyncio.CancelledError:
            if self._cancelled():
                raise
        finally:
            self._busy = False
            self._current = None
            if self._idle is not None:
                self._release_idle()
        if self.on_handled is not None:
            self.on_handled()
        if self._items:
            self._wake_runner()

    async def deliver_message(self: Dispatcher[Any], message: SourceMessage) -> None:
        """:meth:`deliver` a first delivery of ``message`` as a :class:`LocalDelivery`.

        Usable as the source's callback itself (nats-py's ``cb``), saving the source a coroutine
        per message. The source must call it from one task for the dispatcher's whole life (as
        nats-py calls a subscription's callbacks from that subscription's task): the task is
        looked up once, not per message.
        """
        item = LocalDelivery(message.subject, message.data, 1, self.handle)
        if self._busy or self._items:
            await self.put(item)
            return
        if self._stopping:
            return
        self._busy = True
        task = self._source_task
        if task is None:
            task = self._source_task = asyncio.current_task(self._loop)
        self._current = task
        try:
            await self.handler(item)
        except Exception:
            self.handler_errors += 1
            log.exception("%s: handler raised", self.name)
        except asyncio.CancelledError:
            if self._cancelled():
                raise
        finally:
            self._busy = False
            self._current = None
            if self._idle is not None:
                self._release_idle()
        if self.on_handled is not None:
            self.on_handled()
        if self._items:
            self._wake_runner()

    def new_source(self) -> None:
        """The source now calls :meth:`deliver_message` from another task (a subscription made
        again on a new connection): forget the task looked up once."""
        self._source_task = None

    def _instant(self, item: T) -> bool:
        """The handler's synchronous try (see :class:`InstantHandler`); an error in it counts
        as a handler error and the delivery as handled, as in the queued path (``on_handled``
        follows either way)."""
        assert self._now is not None  # checked by the caller
        try:
            if not self._now(item):
                return False
        except Exception:
            self.handler_errors += 1
            log.exception("%s: handler raised", self.name)
        if self.on_handled is not None:
            self.on_handled()
        return True

    # -- the handler call -------------------------------------------------------------------
    # deliver(), deliver_message() and _run() each carry the handler call inline (a coroutine
    # less per message); keep the three copies in step.

    def _cancelled(self) -> bool:
        """After a handler raised CancelledError: True when the task running the handler is
        being cancelled (stop, drain past its timeout, the source shutting down), so the error
        goes on. False otherwise: the handler let out the CancelledError of something it awaited
        (a cancelled future or task), counted and logged like any handler error. Re-raising that
        one would end the runner task (or nats-py's callback loop) and the subscription with it."""
        task = self._current
        if task is None or task.cancelling():
            return True
        self.handler_errors += 1
        log.error("%s: handler raised CancelledError without being cancelled", self.name, exc_info=True)
        return False

    def _release_idle(self) -> None:
        idle = self._idle
        self._idle = None
        if idle is not None and not idle.done():
            idle.set_result(None)

    def _wake_runner(self) -> None:
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)
        elif self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"dispatch:{self.name}")

    def wake_putters(self) -> None:
        """Wake every publish waiting for room here, to look again: on stopping, and for a
        memory queue group, whose publishes wait in all its members' lines
        (:func:`room_in_any`), when a member joins."""
        putters = self._putters
        while putters:
            fut = putters.popleft()
            if not fut.done():
                fut.set_result(self)

    def pass_on_room(self) -> None:
        """Wake the next publish waiting for room here if there is room: for a waiter that was
        woken and did not take it (it took room elsewhere, its item was handled inline, or it
        was cancelled). Each wake-up stands for one room."""
        if len(self._items) < self.max_pending:
            self._wake_putter()

    def _wake_putter(self) -> None:
        putters = self._putters
        while putters:
            fut = putters.popleft()
            if not fut.done():
                fut.set_result(self)
                return

    async def _wait_idle(self) -> None:
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await self._idle

    async def _run(self) -> None:
        items = self._items
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        handler, putters = self.handler, self._putters  # set once, in __init__
        while True:
            while items:
                if self._busy:  # an inline call is in progress: queued items come after it
                    await self._wait_idle()
                    continue
                # Busy from the first queued item to the last: the flags are set once a batch.
                self._busy = True
                self._current = me
                try:
                    while items:
                        item = items.popleft()
                        if putters:
                            self._wake_putter()
                        try:
                            await handler(item)
                        except Exception:
                            # The handler is the bus's and should never raise; the subscription
                            # survives.
                            self.handler_errors += 1
                            log.exception("%s: handler raised", self.name)
                        except asyncio.CancelledError:
                            if self._cancelled():
                                raise
                        if self.on_handled is not None:  # a source may set it after __init__
                            self.on_handled()
                finally:
                    self._busy = False
                    self._current = None
                    if self._idle is not None:
                        self._release_idle()
            if self._stopping:
                return
            fut = loop.create_future()
            self._getter = fut
            await fut

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self, timeout: float | None, *, drop: bool = False) -> list[T]:
        """Stop taking deliveries and return those that will not be handled.

        ``drop``: queued deliveries are returned at once (unsubscribe). Otherwise they are
        handled first, for up to ``timeout`` seconds (drain); past it the handler in progress is
        cancelled and the rest returned. Called from inside the handler, it does not wait for
        that handler (the subscription ends after it returns). Idempotent.
        """
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.wake_putters()
        left: list[T] = []
        if drop:
            left.extend(self._items)
            self._items.clear()
        self._wake_runner_to_exit()
        if self.in_handler():
            return left  # stopping from inside the handler: nothing to wait for
        try:
            async with asyncio.timeout(timeout):
                await self._until_done()
        except TimeoutError:
            await self._cancel()
        left.extend(self._items)
        self._items.clear()
        return left

    def _wake_runner_to_exit(self) -> None:
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    async def _until_done(self) -> None:
        while True:
            runner = self._runner
            if runner is not None and not runner.done():
                await asyncio.shield(runner)
            elif self._busy:
                await self._wait_idle()
            elif self._items:  # queued during an inline call, no runner yet
                self._runner = None
                self._wake_runner()
            else:
                return

    async def _cancel(self) -> None:
        for task in (self._runner, self._current):
            if task is not None and not task.done() and not is_stop_caller(task):
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)


class DispatcherHandle:
    """A :class:`Dispatcher` held weakly: what its :class:`LocalDelivery` objects refer to.

    A delivery is not traversed by the garbage collector, so a strong reference from it to its
    dispatcher would hide a reference cycle through the dispatcher (its runner task, a
    traceback kept there, a frame holding the delivery) and keep the whole of it alive."""

    __slots__ = ("_dispatcher",)

    def __init__(self, dispatcher: Dispatcher[Any]) -> None:
        self._dispatcher = weakref.ref(dispatcher)

    @property
    def dispatcher(self) -> Dispatcher[Any] | None:
        """The dispatcher, or None once it was collected."""
        return self._dispatcher()


class LocalDelivery(msgspec.Struct, gc=False, eq=False):
    """A delivery redelivered by the client itself: ``nack(delay)`` hands the same bytes to the
    same subscription again after ``delay`` with ``attempt + 1``; ``ack`` is a no-op.

    For brokers that keep no record of a message once delivered (core NATS, Redis pub/sub, the
    memory broker): a local redelivery is lost if the process ends first.

    Built per message, so built cheaply: a msgspec struct (its constructor runs in C) that the
    garbage collector does not track, so a backlog of queued deliveries triggers no
    collections. Equality is identity. Because it is not traversed, nothing it refers to may
    close a reference cycle: its dispatcher only through ``dispatcher.handle`` (weak), and
    ``extra`` holding plain values.
    """

    subject: str
    data: bytes
    attempt: int
    owner: DispatcherHandle
    extra: Mapping[str, Any] = NO_EXTRA

    async def ack(self) -> None:
        return None

    async def nack(self, delay: float | None = None) -> None:
        dispatcher = self.owner.dispatcher
        if dispatcher is not None:  # else its subscription is gone: nothing to hand it to
            dispatcher.requeue(
                LocalDelivery(self.subject, self.data, self.attempt + 1, self.owner, self.extra), delay
            )

    def __repr__(self) -> str:  # never the payload, which may be a secret
        return f"LocalDelivery(subject={self.subject!r:.200}, attempt={self.attempt})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # msgspec's own would show the payload
        return [("subject", self.subject), ("attempt", self.attempt)]


async def room_in_any(dispatchers: Sequence[Dispatcher[Any]]) -> None:
    """Wait until one of ``dispatchers`` has room for an item or stops: for an item that may
    go to any of several queues (a memory queue group whose members are all full). Each queue
    wakes one waiter when an item leaves it, as for :meth:`Dispatcher.put`; this one waits in
    all of them at once and, woken by one, leaves the others' lines. Cancelled after its
    wake-up, it passes the room on to the next waiter."""
    fut: asyncio.Future[Dispatcher[Any]] = asyncio.get_running_loop().create_future()
    for dispatcher in dispatchers:
        dispatcher._putters.append(fut)
    try:
        await fut
    except BaseException:
        if fut.done() and not fut.cancelled():
            fut.result().pass_on_room()
        raise
    finally:
        if not fut.done():
            fut.cancel()
        # The queue that woke it has taken it out of its line already (no scan there).
        waker = None if fut.cancelled() else fut.result()
        for dispatcher in dispatchers:
            if dispatcher is not waker:
                with contextlib.suppress(ValueError):
                    dispatcher._putters.remove(fut)


def check_group_names(queue: str | None, durable: str | None) -> None:
    """Raise ConfigError for an empty (or blank) queue group or durable name, InvalidSubject
    for one that is too long or holds whitespace or control characters."""
    for what, value in (("queue group", queue), ("durable", durable)):
        if value is not None and (not value or value.isspace()):
            raise ConfigError(f"{what} name must be non-empty, got {value!r}")
        if value is not None:
            validate_name(value, what)


async def stop_task(task: asyncio.Task[Any], *, again_every: float = 0.02) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``again_every``
    seconds while it runs on.

    For the background loops of adapters (readers, heartbeats): a cancellation can be lost
    inside a client library, and a loop that does not see it runs on for ever. On Python 3.11,
    ``asyncio.wait_for`` returns the result of an inner call that finished just as the
    cancellation came and drops the cancellation (CPython gh-86296; redis-py writes every
    command through it). An exception the task ended with is logged, not raised; a
    cancellation of the caller is raised as usual.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=again_every)
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())


async def drain_all(subscriptions: Iterable[_Stoppable], timeout: float | None) -> None:
    """Drain ``subscriptions`` concurrently (each up to ``timeout``); one failing stops no other."""
    subs = list(subscriptions)
    if not subs:
        return
    for result in await stop_together(s.drain(timeout) for s in subs):
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
        if isinstance(result, Exception):
            log.warning("draining a subscription failed: %r", result)
