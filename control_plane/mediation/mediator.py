"""The mediator: the bus middleware that decides on every message of an attached agent.

Over 400 lines: one class; its two hot paths are written out inline (see the comments).

Signals first (a killed agent's messages are dropped, a stopped agent's held), then the
agent's permissions and the policy, then exactly one record per decision; mediated mode adds
the checks of :mod:`agent_os.control_plane.mediation.checks`. The order and its reasons are in
``docs/control-plane.md`` (The mediator).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable
from typing import Any, NoReturn

from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata
from agent_os.amb.middleware import ConsumeNext, Middleware, PublishNext
from agent_os.control_plane.errors import AgentStoppedError, KernelError
from agent_os.control_plane.mediation.checks import mediated_check
from agent_os.control_plane.mediation.control import CONTROL_PREFIX
from agent_os.control_plane.mediation.holds import Holds, ReleaseErrorHook
from agent_os.control_plane.mediation.identity import message_sender
from agent_os.control_plane.mediation.protocols import MediatedKernel
from agent_os.control_plane.mediation.replies import PendingRequest, PendingRequests
from agent_os.control_plane.policy.decision import ACTION_BLOCKED, Decision
from agent_os.control_plane.process import RUNNING_AGENT, AgentProcess, Life

_CONTROL = CONTROL_PREFIX + "."
_STOPPED = Life.STOPPED
_TERMINATED = Life.TERMINATED
_current_task = asyncio.current_task
# asyncio.current_task() asks get_running_loop(), which makes a getpid() system call each time:
# about 0.4 µs of every governed delivery. The mediator finds the handler's task in asyncio's
# table of each loop's running task instead, for the loop it last ran on, once that loop is
# seen running in this very thread (then it is the running loop: one loop runs per thread);
# otherwise (first use, another loop, an asyncio without that table) it asks current_task().
_running_tasks: dict[Any, asyncio.Task[Any]] = getattr(asyncio.tasks, "_current_tasks", {})
_thread_ident = threading.get_ident
# (sender, verified, trust level) of an inbound message
Identity = tuple[str | None, bool, float]
# True while a control message (a signal) is being handled: its reply must not be held by the
# very SIGSTOP it just applied.
_IN_CONTROL: contextvars.ContextVar[bool] = contextvars.ContextVar("in_control", default=False)


class Mediator(Middleware):
    """Signals, policy and recording on every message of one attached agent.

    ``inbound_prefix`` (mediated mode): inbound messages on ``<prefix>.<topic>`` are an
    agent's publish, evaluated as operation ``publish`` (``request`` with a ``reply_to``) on
    ``<topic>`` for their sender; the sender's own signals apply to them here (a stopped
    sender's messages are held by the service, a killed sender's dropped), whether or not the
    agent cooperates. ``reply_prefix`` and ``pending``: replies on ``<prefix>.<inbox>`` are
    evaluated as operation ``reply`` on the request's topic, from the replier to the
    requester. ``inbox_prefix``: requests must carry a ``reply_to`` under
    ``<inbox_prefix>.<sender>.``. ``trust_bus``: whether a message without an IATP result is
    from the sender it claims (``attach`` decides the default). ``on_release_error``: told
    about each held mediated message that did not go through; its own errors are logged.
    ``held_dropped`` and ``release_failures`` count those (dropped before their turn, failed
    after it). ``action_prefix`` (mediated mode, the control-plane service): ingress requests
    on ``<action_prefix>.<action>`` are actions, and replies to them their outcomes: the
    mediator makes its structural checks and applies the sender's signals, but neither asks
    the policy nor records; the handler must (the kernel's action gate,
    ``kernel.decide_action``, and ``kernel.record_action_outcome``). An action that is not a
    request is denied. Raises KernelError for ``reply_prefix`` without ``pending``.
    """

    def __init__(
        self,
        kernel: MediatedKernel,
        process: AgentProcess,
        *,
        inbound_prefix: str | None = None,
        reply_prefix: str | None = None,
        pending: PendingRequests | None = None,
        inbox_prefix: str = "_INBOX",
        trust_bus: bool = False,
        on_release_error: ReleaseErrorHook | None = None,
        action_prefix: str | None = None,
    ) -> None:
        if reply_prefix is not None and pending is None:
            raise KernelError("mediating replies needs the table of pending requests")
        if action_prefix is not None and inbound_prefix is None:
            raise KernelError("actions are mediated on ingress subjects: give inbound_prefix too")
        self.kernel = kernel
        self.process = process
        self.inbound_prefix = inbound_prefix + "." if inbound_prefix else None
        self.reply_prefix = reply_prefix + "." if reply_prefix else None
        self.pending = pending
        self.inbox_prefix = inbox_prefix + "."
        self.action_prefix = action_prefix + "." if action_prefix else None
        self.trust_bus = trust_bus
        self.gate = kernel.gate
        self.holds = Holds(kernel, on_release_error)
        self.decisions = 0
        self._loop: Any = None  # the loop the mediator last handled a message on (see _task)

    @property
    def on_release_error(self) -> ReleaseErrorHook | None:
        return self.holds.on_release_error

    @property
    def held_dropped(self) -> int:
        return self.holds.held_dropped

    @property
    def release_failures(self) -> int:
        return self.holds.release_failures

    async def drop_held(self) -> int:
        """Drop the detached holds (mediated mode) still waiting for their turn, one
        ``message_dropped`` record each, and wait until every detached hold that did not go
        through is accounted for. For a service that stops: call it once its client no longer
        takes messages. Returns how many were dropped."""
        return await self.holds.drop_held()

    # -- outbound ------------------------------------------------------------------------------

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        proc = RUNNING_AGENT.get() or self.process
        life = proc.life
        if life is _STOPPED or life is _TERMINATED or _IN_CONTROL.get():
            await self._publish_signalled(proc, envelope, call_next)
            return
        # The common path: _publish without its own coroutine.
        decision, op, resource, pending = self._decide_publish(proc, envelope)
        if pending is not None:
            await pending
            if decision.allowed and proc.life is _TERMINATED:
                await self._killed_meanwhile(proc, envelope, "publish")
        if not decision.allowed:
            raise decision.error(op, resource)
        env = envelope
        if self.pending is not None and env.reply_to:
            self.pending.add(env.reply_to, env.id, proc.id, env.topic, env.recipient, env.expires_at)
        await call_next(env)

    async def _publish_signalled(
        self, proc: AgentProcess, envelope: Envelope, call_next: PublishNext
    ) -> None:
        if _IN_CONTROL.get():
            await self._publish(proc, envelope, call_next)
            return
        if proc.killed:
            await self.holds.dropped(proc, envelope, "publish")
            raise AgentStoppedError(f"agent {proc.id} was killed: nothing more is published")
        if proc.stopped and not envelope.topic.startswith(_CONTROL):
            await self.holds.hold(proc, envelope, "publish", lambda: self._publish(proc, envelope, call_next))
            return
        await self._publish(proc, envelope, call_next)

    async def _publish(self, proc: AgentProcess, env: Envelope, call_next: PublishNext) -> None:
        decision, op, resource, pending = self._decide_publish(proc, env)
        if pending is not None:
            await pending
            if decision.allowed and proc.life is _TERMINATED:
                await self._killed_meanwhile(proc, env, "publish")
        if not decision.allowed:
            raise decision.error(op, resource)
        if self.pending is not None and env.reply_to:
            # The service's own request (a remote signal): its reply comes back through us.
            self.pending.add(env.reply_to, env.id, proc.id, env.topic, env.recipient, env.expires_at)
        await call_next(env)

    def _decide_publish(
        self, proc: AgentProcess, env: Envelope
    ) -> tuple[Decision, str, str, Awaitable[None] | None]:
        """Decide on an outbound message and record the decision (see ``note_decision``)."""
        topic = env.topic
        if topic.startswith(_CONTROL):
            op, resource = "signal", topic[len(_CONTROL) :]
        else:
            op = "request" if env.reply_to else ("reply" if env.correlation_id else "publish")
            resource = topic
        me = self.process.id
        gate = self.gate
        decision = gate.cached_decision(op, resource, proc, me, env.recipient, True, 1.0)
        if decision is None:
            ctx = {
                "operation": op,
                "topic": topic,
                "agent_id": proc.id,
                "agent_name": proc.name,
                "sender": me,
                "claimed_sender": env.sender,
                "verified": True,
                "trust_level": 1.0,
                "recipient": env.recipient,
                "headers": env.headers,
                "payload": env.payload,
                "priority": env.priority,
            }
            decision = gate.decide(op, resource, ctx, proc)
        self.decisions += 1
        data = {
            "operation": op,
            "resource": resource,
            "decision": decision.action,
            "reason": decision.reason,
            "rule": decision.rule_name,
            "policy": decision.policy,
            "direction": "out",
            "message_id": env.id,
            "sender": me,
        }
        pending = gate.note_record(proc, proc.id, data, decision, "", True)  # plain JSON values
        return decision, op, resource, pending

    # -- inbound -------------------------------------------------------------------------------

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        sender, verified, trust, refusal = message_sender(metadata, self.trust_bus)
        ident: Identity = (sender, verified, trust)
        proc = self.process
        subject = metadata.subject
        route: PendingRequest | None = None
        mediated = False
        if self.reply_prefix is not None and subject.startswith(self.reply_prefix):
            # Mediated mode, a reply: only the instance that forwarded the request decides.
            assert self.pending is not None
            route = self.pending.get(subject[len(self.reply_prefix) :])
            if route is None:
                self.pending.unmatched += 1  # another instance's, or nobody's: not forwarded
                return
            mediated = True
        elif self.inbound_prefix is not None and subject.startswith(self.inbound_prefix):
            mediated = True
        if refusal is None and not verified and self.gate.requires_verified_sender():
            refusal = "sender not verified (require_verified_sender)"
        if refusal is None and mediated and sender is None:
            refusal = f"no established sender (the claim {envelope.sender!r} is not verified by IATP)"
        if refusal is not None:
            # Denied before any state of the (claimed) sender is looked up or created.
            _, pending = self._decide_deliver(proc, envelope, metadata, route, ident, mediated, refusal)
            if pending is not None:
                await pending
            return  # pragma: no cover - a refusal always raises
        if mediated:
            # The message is the sender's publish (or reply): the sender's signals apply.
            assert sender is not None
            proc = self.kernel.external(sender)
        life = proc.life
        if life is _TERMINATED:
            await self.holds.dropped(proc, envelope, "deliver")
            raise AgentStoppedError(f"agent {proc.id} was killed: its messages are dropped")
        if (life is _STOPPED and not envelope.topic.startswith(_CONTROL)) or (
            mediated and self.holds.backlog and proc.id in self.holds.backlog
        ):
            held = proc

            def run() -> Awaitable[None]:
                return self._deliver(held, envelope, metadata, call_next, route, ident, mediated)

            if mediated:
                await self.holds.hold_detached(proc, envelope, metadata, run, life is _STOPPED)
            else:
                await self.holds.hold(proc, envelope, "deliver", run)
            return
        # The common path: _deliver and _handle without their own coroutines.
        op, pending = self._decide_deliver(proc, envelope, metadata, route, ident, mediated)
        if pending is not None:
            await pending  # raises the violation of a deny
            if proc.life is _TERMINATED:
                await self._killed_meanwhile(proc, envelope, "deliver")
        if op == "signal":
            token = _IN_CONTROL.set(True)
            try:
                await call_next(envelope, metadata)
            finally:
                _IN_CONTROL.reset(token)
            return
        task = self._task()
        if task is None:  # pragma: no cover - always inside a task under asyncio
            await call_next(envelope, metadata)
            return
        before = task.cancelling()
        tasks = proc.tasks
        tasks.add(task)
        current = RUNNING_AGENT.set(proc)
        try:
            await call_next(envelope, metadata)
        except asyncio.CancelledError:
            if proc.killed and task.cancelling() > before and task.uncancel() == before:
                raise AgentStoppedError(f"agent {proc.id} was killed while handling {envelope.id}") from None
            raise
        finally:
            RUNNING_AGENT.reset(current)
            tasks.discard(task)

    async def _deliver(
        self,
        proc: AgentProcess,
        env: Envelope,
        meta: Metadata,
        call_next: ConsumeNext,
        route: PendingRequest | None,
        ident: Identity,
        mediated: bool,
    ) -> None:
        op, pending = self._decide_deliver(proc, env, meta, route, ident, mediated)
        if pending is not None:
            await pending  # raises the violation of a deny
            if proc.life is _TERMINATED:
                await self._killed_meanwhile(proc, env, "deliver")
        if op == "signal":
            token = _IN_CONTROL.set(True)
            try:
                await call_next(env, meta)
            finally:
                _IN_CONTROL.reset(token)
            return
        await self._handle(proc, env, meta, call_next)

    def _decide_deliver(
        self,
        proc: AgentProcess,
        env: Envelope,
        meta: Metadata,
        route: PendingRequest | None,
        ident: Identity,
        mediated: bool,
        refusal: str | None = None,
    ) -> tuple[str, Awaitable[None] | None]:
        """Decide on an inbound message and record the decision; returns the operation and
        what to await before going on (None or an awaitable that raises the violation when
        the decision denies; a deny with nothing to await is raised here). ``mediated``: an
        ingress message or a reply passing the service; ``refusal``: deny for this reason
        without asking the policy."""
        sender, verified, trust = ident
        topic = env.topic
        subject = meta.subject
        recipient: str | None = env.recipient or proc.id
        if mediated:
            op, resource, recipient, why = mediated_check(
                env, subject, route, sender, self.inbound_prefix, self.inbox_prefix, self.pending
            )
            if refusal is None:
                refusal = why
            if self.action_prefix is not None and resource.startswith(self.action_prefix):
                if refusal is None and route is None and op != "request":
                    refusal = "an action is a request: it needs a reply_to"
                if refusal is None:
                    # An action or its outcome: the handler decides and records it (the
                    # kernel's action gate), so that each is one decision, one record.
                    if route is not None:
                        route.answered = True  # one reply per request
                    meta.context["control_plane_sender"] = sender
                    return "action", None
        elif topic.startswith(_CONTROL):
            op, resource = "signal", topic[len(_CONTROL) :]
        else:
            op, resource = ("reply" if env.correlation_id and not env.reply_to else "deliver"), topic
        gate = self.gate
        if refusal is not None:
            decision = Decision(False, "deny", refusal, "control-plane", violation=True, kind=ACTION_BLOCKED)
        else:
            cached = gate.cached_decision(op, resource, proc, sender, recipient, verified, trust)
            if cached is not None:
                decision = cached
            else:
                ctx = {
                    "operation": op,
                    "topic": topic,
                    "agent_id": proc.id,
                    "agent_name": proc.name,
                    "sender": sender,
                    "claimed_sender": env.sender,
                    "verified": verified,
                    "trust_level": trust,
                    "recipient": recipient,
                    "headers": env.headers,
                    "payload": env.payload,
                    "priority": env.priority,
                }
                decision = gate.decide(op, resource, ctx, proc)
        if decision.allowed and mediated:
            # Decided before any await, so no other message can slip in between.
            if route is not None:
                route.answered = True  # one reply per request
            elif op == "request" and self.pending is not None:
                assert sender is not None
                assert env.reply_to is not None
                self.pending.add(env.reply_to, env.id, sender, resource, recipient, env.expires_at)
        self.decisions += 1
        data = {
            "operation": op,
            "resource": resource,
            "decision": decision.action,
            "reason": decision.reason,
            "rule": decision.rule_name,
            "policy": decision.policy,
            "direction": "in",
            "message_id": env.id,
            "sender": sender,
            "claimed_sender": env.sender,
            "verified": verified,
            "trust_level": trust,
        }
        if route is not None:
            data.update(reply_to=route.reply_to, request_id=route.request_id, requester=route.requester)
        # Plain JSON values only (strings, booleans, the trust level as a float).
        pending = gate.note_record(proc, proc.id, data, decision, sender if verified else None, True)
        if not decision.allowed:
            violation = decision.error(op, resource)
            if pending is None:
                raise violation
            return op, _raise_after(pending, violation)
        context = meta.context
        context["control_plane"] = decision
        context["control_plane_sender"] = sender
        return op, pending

    def _task(self) -> asyncio.Task[Any] | None:
        """The running task (``asyncio.current_task()``, see ``_running_tasks``)."""
        loop = self._loop
        if loop is not None and getattr(loop, "_thread_id", None) == _thread_ident():
            task = _running_tasks.get(loop)
            if task is not None:
                return task
        task = _current_task()
        if task is not None:
            self._loop = task.get_loop()
        return task

    async def _handle(
        self, proc: AgentProcess, env: Envelope, meta: Metadata, call_next: ConsumeNext
    ) -> None:
        """Run the handler inline in a cancel scope of the agent: while it runs, the current
        task counts as the agent's work, so SIGKILL cancels it mid-work; that cancellation is
        turned into AgentStoppedError here (the bus dead-letters the message) and does not
        leak into the task that called us. A cancellation from anyone else propagates."""
        task = self._task()
        if task is None:  # pragma: no cover - always inside a task under asyncio
            await call_next(env, meta)
            return
        before = task.cancelling()
        proc.tasks.add(task)
        token = RUNNING_AGENT.set(proc)
        try:
            await call_next(env, meta)
        except asyncio.CancelledError:
            if proc.killed and task.cancelling() > before and task.uncancel() == before:
                raise AgentStoppedError(f"agent {proc.id} was killed while handling {env.id}") from None
            raise
        finally:
            RUNNING_AGENT.reset(token)
            proc.tasks.discard(task)

    async def _killed_meanwhile(self, proc: AgentProcess, env: Envelope, op: str) -> NoReturn:
        """An allowed message whose agent was killed while its decision's record was being
        written (the recorder's backpressure): it goes no further. Recorded as dropped (after
        its ``policy_decision``); raises AgentStoppedError (inbound: dead-lettered)."""
        await self.holds.dropped(proc, env, op)
        raise AgentStoppedError(f"agent {proc.id} was killed before its message {env.id} went on")


async def _raise_after(pending: Awaitable[None], error: Exception) -> None:
    await pending
    raise error
