"""The mediator: the bus middleware that applies signals, policy and recording to every message.

Attach it with :meth:`KernelSpace.attach(client) <control_plane.kernel.KernelSpace.attach>`
*after* the IATP middleware, so it sees verified messages inbound and IATP signs what it lets
out::

    publish: app -> Mediator.on_publish -> IATP sign -> broker
    deliver: broker -> IATP verify -> Mediator.on_consume -> handler

For each message, in this order:

1. **Signals.** A killed agent's messages are dropped (``AgentStoppedError``: outbound it
   reaches the publisher, inbound the bus dead-letters it with reason ``agent_killed``). A
   stopped agent's messages wait in its hold queue (``HoldQueueFull`` past the bound) and go
   on, in order, at SIGCONT; SIGKILL drops those still waiting. Control messages
   (``_ctl.signal.<id>``) are never held. How a hold waits depends on the mode:

   - *embedded* (an agent's own client): the held publish or delivery waits where it is. The
     publisher's ``await publish(...)`` returns (or raises the policy's verdict) once the
     message is released, and raises ``AgentStoppedError`` when SIGKILL drops it; a held
     delivery keeps the stopped agent's own subscription waiting (one handler at a time, the
     broker's backpressure and acknowledgement as usual), which is what stopping it means.
   - *mediated* (``inbound_prefix``/``reply_prefix``: the service, which carries every
     agent's messages on one subscription): the message is queued and the handler returns at
     once, so one stopped agent does not stall everyone else's traffic through the instance.
     Its delivery is settled then (acknowledged: a held message lives in the instance's
     memory). At SIGCONT the agent's held messages are decided and forwarded in arrival
     order; a message of the agent that arrives while earlier ones are still queued goes
     behind them (FIFO per agent). A held message that then fails (denied by policy, the
     forward failed) is logged, counted in ``release_failures`` and handed to
     ``on_release_error`` (the service dead-letters it); one that SIGKILL drops is recorded
     as ``message_dropped``, counted in ``held_dropped`` and handed on the same way;
     :meth:`Mediator.drop_held` records the rest as dropped when the service stops.
2. **Policy.** The operation is ``publish``, ``request`` (has ``reply_to``), ``reply`` (has a
   ``correlation_id`` and no ``reply_to``), ``deliver`` (inbound), or ``signal`` (a control
   message; the resource is then the target agent id); the resource is the topic. The agent's
   permissions are checked first (see :mod:`agent_os.control_plane.kernel`).
3. **Recording.** Exactly one record per decision: a ``policy_decision`` per message and
   direction, or a ``message_dropped`` (reason ``agent killed (SIGKILL)`` or
   ``hold_queue_full``) when signals refused it; a held message gets a ``message_held`` record
   and then, when released, its ``policy_decision``, or a ``message_dropped`` when SIGKILL
   (or, mediated, the service stopping) drops it before its turn. An allowed message waits
   while its record is written when the recorder applies backpressure; if SIGKILL comes
   meanwhile, it goes no further (``AgentStoppedError``; inbound: dead-lettered) and gets a
   ``message_dropped`` after its ``policy_decision``: nothing of a killed agent is published,
   handled or forwarded after the kill.

**Who the sender is** (:mod:`agent_os.control_plane.identity`). Outbound, this process is the
authority: the sender is the attached agent. Inbound:

- a valid IATP result in ``metadata.context["iatp"]`` names the sender (``verified=True``, its
  trust level);
- an IATP result that is present but not valid is **denied at once** (reason ``the message's
  IATP verification is not valid (...)``), before any per-sender state is touched: no hold
  queue, no rate bucket, no external process is keyed by the claimed name;
- with no result, the envelope's claimed sender counts only when the mediator trusts the bus
  (``trust_bus``; the default, None, trusts only the in-process ``memory`` broker, whose
  clients all live in this process; pass True for a broker whose ACLs authenticate senders):
  then ``sender`` is the claim with ``verified=False`` and trust 0. Otherwise ``sender`` is
  None and the claim is only ``claimed_sender``, so a condition on ``sender`` cannot be met by
  claiming a name;
- ``require_verified_sender`` (enforced by any policy of the kernel) denies an unverified
  message before anything else is looked up for its sender.

A rule's ``on_violation`` signal on an inbound message goes to the sender only when verified: a
forged sender id must not get another agent killed.

**Mediated mode** (the control-plane service; ``inbound_prefix``/``reply_prefix``): a message
is recognised by the subject it arrived on, and its envelope's (signed) topic must be that
subject, or it is denied (``... is not its subject``): the subject decides where the service
forwards it, so the two may not differ. A message with no established sender is denied (the
service acts *for* a sender: its signals, its rate limits). A request's ``reply_to`` must be an
inbox of its own sender, ``<inbox_prefix>.<sender>.…`` (so nobody can have replies sent to
another agent's inbox), and not one already waiting for a reply; the allowed request is noted
in :class:`~agent_os.control_plane.replies.PendingRequests`. A reply (``<reply_prefix>.<inbox>``) is
checked only by the instance holding the request; see :mod:`agent_os.services.control_plane_service`.

Handlers run as tasks of the receiving agent, so SIGKILL cancels a handler mid-work.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata
from agent_os.amb.middleware import ConsumeNext, Middleware, PublishNext
from agent_os.control_plane.errors import AgentStoppedError, HoldQueueFull, KernelError
from agent_os.control_plane.identity import message_sender
from agent_os.control_plane.kernel_gate import _CURRENT, _violation
from agent_os.control_plane.kernel_gate import log as kernel_log
from agent_os.control_plane.policy import Decision
from agent_os.control_plane.process import AgentProcess, Life
from agent_os.control_plane.replies import PendingRequest, PendingRequests
from agent_os.control_plane.signals import CONTROL_PREFIX

if TYPE_CHECKING:
    from agent_os.control_plane.kernel import KernelSpace

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
_TOKEN: Final = re.compile(r"[^.*>\s]+")  # an agent id usable as one subject token
# (sender, verified, trust level) of an inbound message
Identity = tuple[str | None, bool, float]
# True while a control message (a signal) is being handled: its reply must not be held by the
# very SIGSTOP it just applied.
_IN_CONTROL: contextvars.ContextVar[bool] = contextvars.ContextVar("in_control", default=False)


ReleaseErrorHook = Callable[[Envelope, Metadata, Exception], Awaitable[None]]
"""Told about a detached hold (mediated mode) that did not go through: the envelope, its
delivery's metadata and the error (AgentStoppedError when SIGKILL dropped it while held)."""


@dataclass(eq=False, slots=True)
class _HeldMessage:
    """One message in a hold queue; ``started`` once its turn came (its decision is then
    recorded: a failure after it is not a drop)."""

    proc: AgentProcess
    env: Envelope
    meta: Metadata | None
    run: Callable[[], Awaitable[Any]]
    started: bool = False
    future: asyncio.Future[Any] | None = None

    async def start(self) -> Any:
        self.started = True
        return await self.run()


def _operation(env: Envelope) -> str:
    if env.reply_to:
        return "request"
    if env.correlation_id:
        return "reply"
    return "publish"


class Mediator(Middleware):
    """Signals, policy and recording on every message of one attached agent (see module doc).

    ``inbound_prefix`` (mediated mode): inbound messages on ``<prefix>.<topic>`` are an
    agent's publish, evaluated as operation ``publish`` (``request`` with a ``reply_to``) on
    ``<topic>`` for their sender; the sender's own signals apply to them here (a stopped
    sender's messages are held by the service, a killed sender's dropped), whether or not the
    agent cooperates. ``reply_prefix`` and ``pending``: replies on ``<prefix>.<inbox>`` are
    evaluated as operation ``reply`` on the request's topic, from the replier to the
    requester. ``inbox_prefix``: requests must carry a ``reply_to`` under
    ``<inbox_prefix>.<sender>.``. ``trust_bus``: whether a message without an IATP result is
    from the sender it claims (see the module docstring; ``attach`` decides the default).
    ``on_release_error``: told about each held mediated message that did not go through (see
    the module docstring, *Signals*); its own errors are logged. Raises KernelError for
    ``reply_prefix`` without ``pending``.
    """

    def __init__(
        self,
        kernel: KernelSpace,
        process: AgentProcess,
        *,
        inbound_prefix: str | None = None,
        reply_prefix: str | None = None,
        pending: PendingRequests | None = None,
        inbox_prefix: str = "_INBOX",
        trust_bus: bool = False,
        on_release_error: ReleaseErrorHook | None = None,
    ) -> None:
        if reply_prefix is not None and pending is None:
            raise KernelError("mediating replies needs the table of pending requests")
        self.kernel = kernel
        self.process = process
        self.inbound_prefix = inbound_prefix + "." if inbound_prefix else None
        self.reply_prefix = reply_prefix + "." if reply_prefix else None
        self.pending = pending
        self.inbox_prefix = inbox_prefix + "."
        self.trust_bus = trust_bus
        self.on_release_error = on_release_error
        self.decisions = 0
        self.held_dropped = 0
        self.release_failures = 0
        self._backlog: dict[str, int] = {}  # agent id -> its detached holds not yet done
        self._detached: dict[_HeldMessage, None] = {}  # in arrival order
        self._settling: set[asyncio.Task[None]] = set()
        self._loop: Any = None  # the loop the mediator last handled a message on (see _task)

    # -- outbound ------------------------------------------------------------------------------

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        proc = _CURRENT.get() or self.process
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
            raise _violation(decision, op, resource)
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
            await self._dropped(proc, envelope, "publish")
            raise AgentStoppedError(f"agent {proc.id} was killed: nothing more is published")
        if proc.stopped and not envelope.topic.startswith(_CONTROL):
            await self._hold(proc, envelope, "publish", lambda: self._publish(proc, envelope, call_next))
            return
        await self._publish(proc, envelope, call_next)

    async def _publish(self, proc: AgentProcess, env: Envelope, call_next: PublishNext) -> None:
        decision, op, resource, pending = self._decide_publish(proc, env)
        if pending is not None:
            await pending
            if decision.allowed and proc.life is _TERMINATED:
                await self._killed_meanwhile(proc, env, "publish")
        if not decision.allowed:
            raise _violation(decision, op, resource)
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
        kernel = self.kernel
        decision = kernel.cached_decision(op, resource, proc, me, env.recipient, True, 1.0)
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
            decision = kernel.decide(op, resource, ctx, proc)
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
        pending = kernel.note_record(proc, proc.id, data, decision, "", True)  # plain JSON values
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
        if refusal is None and not verified and self.kernel.requires_verified_sender():
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
            await self._dropped(proc, envelope, "deliver")
            raise AgentStoppedError(f"agent {proc.id} was killed: its messages are dropped")
        if (life is _STOPPED and not envelope.topic.startswith(_CONTROL)) or (
            mediated and self._backlog and proc.id in self._backlog
        ):
            held = proc

            def run() -> Awaitable[None]:
                return self._deliver(held, envelope, metadata, call_next, route, ident, mediated)

            if mediated:
                await self._hold_detached(proc, envelope, metadata, run, life is _STOPPED)
            else:
                await self._hold(proc, envelope, "deliver", run)
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
        current = _CURRENT.set(proc)
        try:
            await call_next(envelope, metadata)
        except asyncio.CancelledError:
            if proc.killed and task.cancelling() > before and task.uncancel() == before:
                raise AgentStoppedError(f"agent {proc.id} was killed while handling {envelope.id}") from None
            raise
        finally:
            _CURRENT.reset(current)
            tasks.discard(task)

    def _mediated(
        self, env: Envelope, subject: str, route: PendingRequest | None, sender: str | None
    ) -> tuple[str, str, str | None, str | None]:
        """Operation, resource, recipient and a structural reason to deny (or None) of an
        ingress message or a reply passing the service."""
        recipient: str | None
        if route is not None:
            op, resource, recipient = "reply", route.topic, route.requester
        else:
            assert self.inbound_prefix is not None
            op, resource, recipient = _operation(env), subject[len(self.inbound_prefix) :], env.recipient
        why = None
        if env.topic != subject:
            why = f"the envelope's topic {env.topic!r} is not its subject {subject!r}"
        elif route is not None:
            if env.reply_to:
                why = "a reply cannot ask for a reply"
            elif env.correlation_id != route.request_id:
                why = "the reply's correlation id does not match the request"
            elif route.recipient is not None and sender != route.recipient:
                why = f"the request was addressed to {route.recipient}, not {sender}"
            elif route.answered:
                why = "the request was already answered"
            elif route.expired():
                why = "the request expired"
        elif op == "request" and self.pending is not None:
            why = self._inbox_refusal(env.reply_to, sender)
        return op, resource, recipient, why

    def _inbox_refusal(self, reply_to: str | None, sender: str | None) -> str | None:
        """Why a request's ``reply_to`` is refused (None: it is the sender's own free inbox)."""
        if sender is None or _TOKEN.fullmatch(sender) is None:
            return f"reply_to needs a sender usable as an inbox token, not {sender!r}"
        own = f"{self.inbox_prefix}{sender}."
        if reply_to is None or not reply_to.startswith(own):
            return f"reply_to must be an inbox of the sender ({own}...)"
        assert self.pending is not None
        if self.pending.waiting(reply_to):
            return "reply_to is already waiting for the reply to another request"
        return None

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
            op, resource, recipient, why = self._mediated(env, subject, route, sender)
            if refusal is None:
                refusal = why
        elif topic.startswith(_CONTROL):
            op, resource = "signal", topic[len(_CONTROL) :]
        else:
            op, resource = ("reply" if env.correlation_id and not env.reply_to else "deliver"), topic
        kernel = self.kernel
        if refusal is not None:
            decision = Decision(False, "deny", refusal, "control-plane", violation=True)
        else:
            cached = kernel.cached_decision(op, resource, proc, sender, recipient, verified, trust)
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
                decision = kernel.decide(op, resource, ctx, proc)
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
        pending = kernel.note_record(proc, proc.id, data, decision, sender if verified else None, True)
        if not decision.allowed:
            violation = _violation(decision, op, resource)
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
        token = _CURRENT.set(proc)
        try:
            await call_next(env, meta)
        except asyncio.CancelledError:
            if proc.killed and task.cancelling() > before and task.uncancel() == before:
                raise AgentStoppedError(f"agent {proc.id} was killed while handling {env.id}") from None
            raise
        finally:
            _CURRENT.reset(token)
            proc.tasks.discard(task)

    # -- records for what signals did ----------------------------------------------------------

    async def _hold(
        self, proc: AgentProcess, env: Envelope, op: str, run: Callable[[], Awaitable[Any]]
    ) -> None:
        """Embedded mode: queue ``run`` in the stopped agent's hold queue and wait for it (a
        publish returns, or raises, with its released outcome). One record when it is held:
        ``message_held``, or ``message_dropped`` (``hold_queue_full``) when the queue is full;
        and a ``message_dropped`` when SIGKILL drops it before its turn (AgentStoppedError)."""
        item = _HeldMessage(proc, env, None, run)
        try:
            waiting = proc.enqueue(item.start)  # the slot is taken now, before any await
        except HoldQueueFull:
            await self._dropped(proc, env, op, "hold_queue_full")
            raise
        await self._held(proc, env, op)
        try:
            await waiting
        except AgentStoppedError:
            if not item.started:  # dropped from the queue, not killed while being handled
                await self._dropped(proc, env, op)
            raise

    async def _hold_detached(
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
        :meth:`_settle_detached`."""
        item = _HeldMessage(proc, env, meta, run)
        try:
            item.future = proc.enqueue(item.start)  # the slot is taken now, before any await
        except HoldQueueFull:
            await self._dropped(proc, env, "deliver", "hold_queue_full")
            raise
        self._backlog[proc.id] = self._backlog.get(proc.id, 0) + 1
        self._detached[item] = None
        item.future.add_done_callback(lambda _: self._detached_done(item))
        if stopped:
            await self._held(proc, env, "deliver")

    def _detached_done(self, item: _HeldMessage) -> None:
        self._detached.pop(item, None)
        left = self._backlog.get(item.proc.id, 0) - 1
        if left > 0:
            self._backlog[item.proc.id] = left
        else:
            self._backlog.pop(item.proc.id, None)
        assert item.future is not None
        if item.future.cancelled() or item.future.exception() is not None:
            task = asyncio.get_running_loop().create_task(self._settle_detached(item))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle_detached(self, item: _HeldMessage) -> None:
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
                self.held_dropped += 1
                kernel_log.warning("held message %s of %s dropped: the service stopped", env.id, proc.id)
                await self._dropped(proc, env, "deliver", "service stopped")
                return
            error = item.future.exception()
            assert isinstance(error, Exception)
            if not item.started:
                self.held_dropped += 1
                kernel_log.warning("held message %s of %s dropped: %s", env.id, proc.id, error)
                await self._dropped(proc, env, "deliver")
            else:
                self.release_failures += 1
                kernel_log.warning(
                    "held message %s of %s failed after its release: %r", env.id, proc.id, error
                )
            if self.on_release_error is not None:
                await self.on_release_error(env, item.meta, error)
        except Exception:
            kernel_log.exception("could not account for held message %s of %s", env.id, proc.id)

    async def drop_held(self) -> int:
        """Drop the detached holds (mediated mode) still waiting for their turn, one
        ``message_dropped`` record each, and wait until every detached hold that did not go
        through is accounted for. For a service that stops: call it once its client no longer
        takes messages. Returns how many were dropped."""
        waiting = [item for item in self._detached if not item.started]
        for item in waiting:
            assert item.future is not None
            item.future.cancel()
        await asyncio.sleep(0)  # the futures' done callbacks (scheduled by cancel) start the settling
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        return len(waiting)

    async def _held(self, proc: AgentProcess, env: Envelope, op: str) -> None:
        if self.kernel.debug:
            kernel_log.debug("message_held %s: %s %s on %r", proc.id, op, env.id, env.topic)
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

    async def _killed_meanwhile(self, proc: AgentProcess, env: Envelope, op: str) -> NoReturn:
        """An allowed message whose agent was killed while its decision's record was being
        written (the recorder's backpressure): it goes no further. Recorded as dropped (after
        its ``policy_decision``); raises AgentStoppedError (inbound: dead-lettered)."""
        await self._dropped(proc, env, op)
        raise AgentStoppedError(f"agent {proc.id} was killed before its message {env.id} went on")

    async def _dropped(
        self, proc: AgentProcess, env: Envelope, op: str, reason: str = "agent killed (SIGKILL)"
    ) -> None:
        if self.kernel.debug:
            kernel_log.debug("message_dropped %s: %s %s on %r (%s)", proc.id, op, env.id, env.topic, reason)
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


async def _raise_after(pending: Awaitable[None], error: Exception) -> None:
    await pending
    raise error
