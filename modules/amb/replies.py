"""Request/reply bookkeeping of the AMB client: the requests waiting for a reply, and which reply
answers which request (the rule is in ``docs/bus.md``, "Request and reply")."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import TYPE_CHECKING, Any, Final

import msgspec

from agent_os.amb.errors import StateError
from agent_os.amb.metadata import Metadata

if TYPE_CHECKING:
    from agent_os.amb.stats import BusStats

log = logging.getLogger("agent_os.amb")

ERROR_HEADER: Final = "amb-error"
"""The header of an error reply: the reason the responder's handler failed."""

Reply = tuple[Any, Metadata]


EARLY_MAX: Final = 64
"""Replies a request keeps that came before its publish returned (its id is not known yet, so
they cannot be checked): any more are dropped and counted as mismatched."""


class PendingRequest(msgspec.Struct):
    """A request waiting for its reply: the future, the agent it was addressed to (if any),
    the task publishing it (until its publish returns: the deadline interrupts that publish)
    and that task's count of cancellation requests when the request began, the request's
    envelope id (set once its publish returned), replies that came before its publish returned,
    checked then, and whether the deadline or a close cancelled the publish. (A struct: made
    without a Python-level ``__init__``.)"""

    future: asyncio.Future[Reply | None]
    recipient: str | None
    publishing: asyncio.Task[Any] | None
    cancelling: int
    request_id: str | None = None
    early: list[Reply] | None = None
    cut: bool = False

    def interrupt(self) -> None:
        """Cancel the task of this request if its publish is still under way (its future is
        done: the deadline passed or the client closed), once; see :meth:`interrupted`."""
        task = self.publishing
        if task is not None and not self.cut and not task.done():
            self.cut = True
            task.cancel()

    def interrupted(self) -> bool:
        """Whether the CancelledError the request's publish raised is the interruption of its
        deadline or of a close (its future then holds the outcome: None, or StateError) and no
        other cancellation of the task came since the request began, as ``asyncio.timeout``
        tells them apart; True also withdraws the cancellation from the task. False: the error
        is the caller's, to be raised on."""
        task = self.publishing
        if not self.cut or task is None:
            return False
        self.publishing = None
        return task.uncancel() <= self.cancelling


class PendingRequests:
    """The requests of one client waiting for replies, by reply subject, and their deadlines.

    One timer serves all deadlines: it is set for the earliest, and a request that ends
    before its deadline costs no timer of its own (no ``call_later`` and ``cancel`` per
    request); the heap of deadlines keeps finished requests only until they reach its top.
    """

    __slots__ = ("_deadlines", "_order", "_stats", "_timer", "_timer_at", "waiting")

    def __init__(self, stats: BusStats) -> None:
        self.waiting: dict[str, PendingRequest] = {}
        """The requests waiting, by reply subject. Others only read it (``reply_subject in
        waiting`` on the reply path, without a call); this class writes it."""
        self._stats = stats
        self._deadlines: list[tuple[float, int, PendingRequest]] = []
        self._order = itertools.count()  # breaks ties between equal deadlines (futures don't order)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        heap = self._deadlines
        now = loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].future.done()):
            pending = heapq.heappop(heap)[2]
            if not pending.future.done():
                pending.future.set_result(None)
                pending.interrupt()
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._on_timer, loop)

    def close(self) -> None:
        """Stop the deadline timer (the client closed; :meth:`fail_all` failed the requests)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()

    def __len__(self) -> int:
        """The number of requests waiting for a reply."""
        return len(self.waiting)

    def add(
        self,
        reply_subject: str,
        future: asyncio.Future[Reply | None],
        recipient: str | None,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any] | None,
    ) -> PendingRequest:
        """Wait for a reply on ``reply_subject`` (one request per reply subject) until loop
        time ``deadline``, ``task`` publishing the request meanwhile. At the deadline the future
        is resolved with None unless it is done, and a publish still under way is interrupted:
        ``task`` is cancelled, and the request's ``except CancelledError`` hands it to
        :meth:`PendingRequest.interrupted`. Call :meth:`published` once the publish returns."""
        cancelling = 0 if task is None else task.cancelling()
        pending = self.waiting[reply_subject] = PendingRequest(future, recipient, task, cancelling)
        heap = self._deadlines
        while heap and heap[0][2].future.done():
            heapq.heappop(heap)
        if len(heap) > 64 and len(heap) > 4 * len(self.waiting):
            # Finished requests below the top (deadlines later than a pending one's): drop them.
            heap[:] = [entry for entry in heap if not entry[2].future.done()]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, next(self._order), pending))
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer, loop)
            self._timer_at = deadline
        return pending

    def published(self, pending: PendingRequest, request_id: str) -> None:
        """Record the request's envelope id once its publish returned (the deadline no longer
        interrupts it) and check the replies that came before."""
        pending.publishing = None
        pending.request_id = request_id
        if pending.early is not None:
            for early in pending.early:
                self._resolve(pending, *early)
            pending.early = None

    def remove(self, reply_subject: str) -> None:
        """Stop waiting on ``reply_subject``; replies that come later count as late."""
        self.waiting.pop(reply_subject, None)

    def fail_all(self, reason: str) -> None:
        """Fail every request still waiting with :class:`~agent_os.amb.StateError` (on close)."""
        for pending in self.waiting.values():
            fut = pending.future
            if not fut.done():
                fut.set_exception(StateError(reason))
                pending.interrupt()

    async def on_reply(self, message: Any, metadata: Metadata) -> None:
        """The handler of the client's reply inbox."""
        self.take(message, metadata)

    def take(self, message: Any, metadata: Metadata) -> None:
        """Give a reply to the request waiting on its subject (:meth:`on_reply`, without a
        coroutine: the inbox's synchronous path)."""
        pending = self.waiting.get(metadata.subject)
        if pending is None:
            self._stats.late_replies += 1
            return
        if pending.request_id is None:
            # The request's publish has not returned yet, so its id is not known here: the
            # reply is checked once it is (see published()).
            if pending.early is None:
                pending.early = []
            if len(pending.early) >= EARLY_MAX:
                self._stats.mismatched_replies += 1
                log.warning(
                    "dropped a reply on %r from %r: %d replies came before the request was sent",
                    metadata.subject,
                    metadata.sender,
                    EARLY_MAX,
                )
                return
            pending.early.append((message, metadata))
            return
        self._resolve(pending, message, metadata)

    def _resolve(self, pending: PendingRequest, message: Any, metadata: Metadata) -> None:
        """Resolve ``pending`` with a reply unless the reply answers another request."""
        stats = self._stats
        if pending.future.done():
            stats.late_replies += 1
            return
        correlation_id = metadata.correlation_id
        if correlation_id is not None and correlation_id != pending.request_id:
            stats.mismatched_replies += 1
            log.warning(
                "dropped a reply on %r from %r: correlation id %r is not the request's %r",
                metadata.subject,
                metadata.sender,
                correlation_id,
                pending.request_id,
            )
            return
        recipient = pending.recipient
        if recipient is not None and metadata.sender != recipient:
            stats.mismatched_replies += 1
            log.warning(
                "dropped a reply on %r from %r: the request was addressed to %r",
                metadata.subject,
                metadata.sender,
                recipient,
            )
            return
        pending.future.set_result((message, metadata))
