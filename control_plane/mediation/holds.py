"""Hold queues: what the mediator does with the messages of a stopped agent, and their records.

Embedded, a held message waits where it is; mediated, it is queued and the handler returns at
once (``docs/control-plane.md``, Signals: holding messages). Each hold and each drop is one
flight-recorder record (``message_held``, ``message_dropped``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent_os.amb import tracing as _tracing
from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata
from agent_os.control_plane.errors import AgentStoppedError, HoldQueueFull
from agent_os.control_plane.mediation.protocols import MediatedKernel
from agent_os.control_plane.process import AgentProcess
from agent_os.control_plane.recorder.records import TRACE_EVENT

log = logging.getLogger(__name__)

ReleaseErrorHook = Callable[[Envelope, Metadata, Exception], Awaitable[None]]
"""Told about a detached hold (mediated mode) that did not go through: the envelope, its
delivery's metadata and the error (AgentStoppedError when SIGKILL dropped it while held)."""


@dataclass(eq=False, slots=True)
class HeldMessage:
    """One message in a hold queue; ``started`` once its turn came (its decision is then
    recorded: a failure after it is not a drop)."""

    proc: AgentProcess
    env: Envelope
    meta: Metadata | None
    run: Callable[[], Awaitable[Any]]
    started: bool = False
    future: asyncio.Future[Any] | None = None
    op: str = "deliver"
    trace: _tracing.Detached | None = None  # the span of the hold, while tracing is on

    def __post_init__(self) -> None:
        if _tracing.active:
            self.trace = _tracing.detached(f"hold {self.op}", self._attributes())

    def _attributes(self) -> dict[str, Any]:
        return {
            "agent_os.agent.id": self.proc.id,
            "agent_os.message.id": self.env.id,
            "messaging.destination.name": self.env.topic,
        }

    async def start(self) -> Any:
        self.started = True
        trace = self.trace
        if trace is None:
            return await self.run()
        # The hold ends; its release (the decision, the forward) is a span beside it.
        trace.end({"agent_os.hold.outcome": "released"})
        with _tracing.span(f"release {self.op}", self._attributes(), parent=trace.parent):
            return await self.run()

    def dropped(self, reason: str) -> None:
        """End the hold's span (tracing on) as dropped before its turn."""
        if self.trace is not None:
            self.trace.end({"agent_os.hold.outcome": "dropped"}, error=reason)


class Holds:
    """The holds of one mediator: waiting ones (embedded) and detached ones (mediated).

    ``backlog``: agent id -> its detached holds not yet done (a message of such an agent goes
    behind them); ``detached``: the detached holds, in arrival order; ``messages_held``:
    messages held for a stopped agent (one per ``message_held`` record); ``held_dropped`` and
    ``release_failures``: detached holds dropped before their turn, and failed after it.
    """

    def __init__(self, kernel: MediatedKernel, on_release_error: ReleaseErrorHook | None = None) -> None:
        self.kernel = kernel
        self.on_release_error = on_release_error
        self.messages_held = 0
        self.held_dropped = 0
        self.release_failures = 0
        self.backlog: dict[str, int] = {}
        self.detached: dict[HeldMessage, None] = {}
        self._settling: set[asyncio.Task[None]] = set()

    async def hold(
        self, proc: AgentProcess, env: Envelope, op: str, run: Callable[[], Awaitable[Any]]
    ) -> None:
        """Embedded mode: queue ``run`` in the stopped agent's hold queue and wait for it (a
        publish returns, or raises, with its released outcome). One record when it is held:
        ``message_held``, or ``message_dropped`` (``hold_queue_full``) when the queue is full;
        and a ``message_dropped`` when SIGKILL drops it before its turn (AgentStoppedError)."""
        item = HeldMessage(proc, env, None, run, op=op)
        try:
            waiting = proc.enqueue(item.start)  # the slot is taken now, before any await
        except HoldQueueFull:
            item.dropped("hold_queue_full")
            await self.dropped(proc, env, op, "hold_queue_full")
            raise
        await self.held(proc, env, op)
        try:
            await waiting
        except AgentStoppedError:
            if not item.started:  # dropped from the queue, not killed while being handled
                item.dropped("agent killed (SIGKILL)")
                await self.dropped(proc, env, op)
            raise
        finally:
            item.dropped("not released")  # (cancelled while held; nothing once its span ended)

    async def hold_detached(
        self,
        proc: AgentProcess,
        env: Envelope,
        meta: Metadata,
        run: Callable[[], Awaitable[Any]],
        stopped: bool,
    ) -> None:
        """Mediated mode: queue ``run`` in the agent's hold queue and return at once, so the
        service's subscription goes on with everyone else's messages. ``stopped``: the agent is
        stopped (record ``message_held``); otherwise it runs but earlier messages of it are
        still queued or being released, and this one goes behind them (FIFO per agent), with
        no record until its decision. Raises HoldQueueFull (recorded as ``message_dropped``)
        when the queue is full. What happens to the message later is settled by
        :meth:`_settle`."""
        item = HeldMessage(proc, env, meta, run)
        try:
            item.future = proc.enqueue(item.start)  # the slot is taken now, before any await
        except HoldQueueFull:
            item.dropped("hold_queue_full")
            await self.dropped(proc, env, "deliver", "hold_queue_full")
            raise
        self.backlog[proc.id] = self.backlog.get(proc.id, 0) + 1
        self.detached[item] = None
        item.future.add_done_callback(lambda _: self._detached_done(item))
        if stopped:
            await self.held(proc, env, "deliver")

    def _detached_done(self, item: HeldMessage) -> None:
        self.detached.pop(item, None)
        left = self.backlog.get(item.proc.id, 0) - 1
        if left > 0:
            self.backlog[item.proc.id] = left
        else:
            self.backlog.pop(item.proc.id, None)
        assert item.future is not None
        if item.future.cancelled() or item.future.exception() is not None:
            task = asyncio.get_running_loop().create_task(self._settle(item))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, item: HeldMessage) -> None:
        """Account for a detached hold that did not go through. Dropped before its turn: a
        ``message_dropped`` record (SIGKILL, or the service stopping) and ``held_dropped``;
        failed after its release (denied by policy, the forward failed, killed while
        forwarded; its decision is recorded already): ``release_failures``. Both are logged;
        both except the service stopping go to ``on_release_error`` (the service dead-letters
        them). Never raises."""
        assert item.future is not None
        assert item.meta is not None
        proc, env = item.proc, item.env
        try:
            if item.future.cancelled():
                item.dropped("service stopped")
                self.held_dropped += 1
                log.warning("held message %s of %s dropped: the service stopped", env.id, proc.id)
                await self.dropped(proc, env, "deliver", "service stopped")
                return
            error = item.future.exception()
            assert isinstance(error, Exception)
            if not item.started:
                item.dropped(str(error) or type(error).__name__)
                self.held_dropped += 1
                log.warning("held message %s of %s dropped: %s", env.id, proc.id, error)
                await self.dropped(proc, env, "deliver")
            else:
                self.release_failures += 1
                log.warning("held message %s of %s failed after its release: %r", env.id, proc.id, error)
            if self.on_release_error is not None:
                await self.on_release_error(env, item.meta, error)
        except Exception:
            log.exception("could not account for held message %s of %s", env.id, proc.id)

    async def drop_held(self) -> int:
        """Drop the detached holds still waiting for their turn, one ``message_dropped`` record
        each, and wait until every detached hold that did not go through is accounted for.
        Returns how many were dropped."""
        waiting = [item for item in self.detached if not item.started]
        for item in waiting:
            assert item.future is not None
            item.future.cancel()
        await asyncio.sleep(0)  # the futures' done callbacks (scheduled by cancel) start the settling
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        return len(waiting)

    async def held(self, proc: AgentProcess, env: Envelope, op: str) -> None:
        """Record that the stopped agent's message is held (``message_held``)."""
        self.messages_held += 1
        if self.kernel.debug:
            log.debug("message_held %s: %s %s on %r", proc.id, op, env.id, env.topic)
        _tracing.add_event(TRACE_EVENT, {"agent_os.recorder.event": "message_held"})
        await self.kernel.recorder.log(
            "message_held",
            proc.id,
            {
                "operation": op,
                "resource": env.topic,
                "message_id": env.id,
                "decision": "hold",
                "reason": "agent stopped (SIGSTOP)",
                "queued": proc.held,
            },
        )

    async def dropped(
        self, proc: AgentProcess, env: Envelope, op: str, reason: str = "agent killed (SIGKILL)"
    ) -> None:
        """Record that the agent's message is dropped (``message_dropped``)."""
        if self.kernel.debug:
            log.debug("message_dropped %s: %s %s on %r (%s)", proc.id, op, env.id, env.topic, reason)
        _tracing.add_event(
            TRACE_EVENT, {"agent_os.recorder.event": "message_dropped", "agent_os.reason": reason}
        )
        await self.kernel.recorder.log(
            "message_dropped",
            proc.id,
            {
                "operation": op,
                "resource": env.topic,
                "message_id": env.id,
                "decision": "drop",
                "reason": reason,
            },
            "warning",
        )
