"""The kernel's gate: permissions and policy decisions, and the record of each, for messages and actions.

One :class:`Gate` per kernel (``kernel.gate``). The mediator asks it about every message, and
``kernel.authorize`` about every other action.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from agent_os.amb import tracing as _tracing
from agent_os.amb.stats import LabelCounts
from agent_os.control_plane.policy.content import argument_texts
from agent_os.control_plane.policy.decision import PERMISSION_DENIED, Decision
from agent_os.control_plane.policy.policy import ABSENT, RUN_OPERATION, Policy
from agent_os.control_plane.policy.policy_set import PolicySet
from agent_os.control_plane.process import RUNNING_AGENT, AgentProcess
from agent_os.control_plane.recorder.records import TRACE_EVENT

if TYPE_CHECKING:
    from agent_os.control_plane.agent_signal import AgentSignal
    from agent_os.control_plane.policy.ratelimit import RateLimiter
    from agent_os.control_plane.recorder import FlightRecorder, Record

log = logging.getLogger(__name__)
KERNEL_POLICY: Final = "kernel"  # the policy name of denials the kernel makes itself
_COVERS: Final = {"publish": "write", "request": "write", "reply": "write", "deliver": "read"}
DECISION_LABELS: Final = ("operation", "action", "rule", "event")
"""What :attr:`Gate.decisions` counts by: the operation (``publish``, ``deliver``, ``read``, ...;
``-`` for an action refused before it had one), the decision's action (``allow``,
``deny``), its rule's name (``-``: none, the policy's default or the kernel's own refusal) and
the event type of its record (``policy_decision``, ``policy_violation``, ...)."""


class SignalSender(Protocol):
    """What the gate needs to send a rule's ``on_violation`` signal (a SignalDispatcher)."""

    async def send(
        self, agent_id: str, signal: AgentSignal | str | int, *, sender: str | None = None
    ) -> bool: ...


class Gate:
    """Decides on actions by the agent's permissions and the policy, and records each decision.

    ``policy``: a Policy or a PolicySet (the kernel's; replaced in place by a reload);
    ``recorder``: where decisions are recorded; ``signals``: where a denying rule's
    ``on_violation`` signal is sent; ``debug``: log every decision. ``decisions`` counts the
    recorded decisions by :data:`DECISION_LABELS` (a bounded set: see
    :class:`~agent_os.amb.stats.LabelCounts`).
    """

    def __init__(
        self,
        policy: Policy | PolicySet,
        recorder: FlightRecorder,
        signals: SignalSender,
        debug: bool = False,
    ) -> None:
        self.policy = policy
        self.recorder = recorder
        self.signals = signals
        self.debug = debug
        self.rate_store_failures = 0
        self.decisions = LabelCounts(len(DECISION_LABELS))

    def decide(
        self,
        operation: str,
        resource: str,
        context: Mapping[str, Any] | None = None,
        proc: AgentProcess | None = None,
        *,
        permission: str | None = None,
    ) -> Decision:
        """The policy's decision, after the agent's permissions (no recording, no raising).
        ``proc``: the acting agent (default: the running agent, if any); ``permission``: the
        permission checked (default: the operation; an action judged as another operation,
        like ``sql.query``, passes its own)."""
        proc = proc if proc is not None else RUNNING_AGENT.get()
        needed = operation if permission is None else permission
        if proc is not None and not permitted(proc, needed):
            return Decision(
                False,
                "deny",
                f"agent {proc.name} lacks permission for {needed}",
                self.policy.name,
                violation=True,
                kind=PERMISSION_DENIED,
            )
        return self.policy.evaluate(operation, resource, context)

    def requires_verified_sender(self) -> bool:
        """Whether the policy (any policy of a set, in enforce mode) denies every message whose
        sender IATP has not verified (``require_verified_sender``)."""
        policy = self.policy
        if type(policy) is Policy:
            return policy.require_verified_sender and policy.mode == "enforce"
        policies = policy.policies if isinstance(policy, PolicySet) else (policy,)
        return any(p.require_verified_sender and p.mode == "enforce" for p in policies)

    def cached_decision(
        self,
        operation: str,
        resource: str,
        proc: AgentProcess,
        sender: str | None,
        recipient: str | None,
        verified: bool,
        trust_level: float,
    ) -> Decision | None:
        """The decision :meth:`decide` would return for a message of ``proc`` whose context
        has these values (and ``agent_id`` = ``proc.id``), if the policy has it cached and the
        agent's permissions are not restricted; None otherwise (then build the context and
        call :meth:`decide`)."""
        policy = self.policy
        if type(policy) is not Policy or proc.permissions is not None or proc.restrictions:
            return None
        return policy.cached(operation, resource, sender, recipient, verified, trust_level, proc.id)

    def cached_action(
        self, operation: str, resource: str, proc: AgentProcess, permission: str
    ) -> Decision | None:
        """The decision :meth:`decide` would return for an action of ``proc`` needing
        ``permission``, whose context has no :data:`~agent_os.control_plane.policy.policy.KEY_FIELDS`
        value but ``agent_id`` (the agent's name, as ``kernel.submit`` builds it), if the
        agent holds the permission and the policy has the decision cached; None otherwise (then
        build the context and call :meth:`decide`). Never raises."""
        policy = self.policy
        if type(policy) is not Policy or not permitted(proc, permission):
            return None
        try:
            return policy.cached(operation, resource, ABSENT, ABSENT, ABSENT, ABSENT, proc.name)
        except Exception:  # a resource that cannot be hashed or compared: decide() denies it
            return None

    async def authorize(
        self, operation: str, resource: str, context: Mapping[str, Any] | None = None
    ) -> Decision:
        """The gate for actions that are not messages: check, record, and raise when denied.

        Waits while the running agent is stopped. Raises PolicyViolationError (or
        RateLimitExceeded), AgentStoppedError when the agent was killed.
        """
        proc = RUNNING_AGENT.get()
        if proc is not None:
            await proc.wait_for_continue()
        ctx = {
            "agent_id": proc.id if proc else None,
            "agent_name": proc.name if proc else None,
            **(context or {}),
        }
        decision = self.decide(operation, resource, ctx, proc)
        await self.record_decision(proc, operation, resource, decision, ctx.get("agent_name") or "kernel")
        if not decision.allowed:
            raise decision.error(operation, resource)
        return decision

    async def record_decision(
        self,
        proc: AgentProcess | None,
        operation: str,
        resource: str,
        decision: Decision,
        agent_id: str,
        extra: Mapping[str, Any] | None = None,
        *,
        signal_to: str | None = "",
    ) -> None:
        """Record one decision, count it on the agent, and on a deny send the rule's signal to
        ``signal_to`` (default: the agent itself; None: nobody)."""
        pending = self.note_decision(
            proc, operation, resource, decision, agent_id, extra, signal_to=signal_to
        )
        if pending is not None:
            await pending

    def note_decision(
        self,
        proc: AgentProcess | None,
        operation: str,
        resource: str,
        decision: Decision,
        agent_id: str,
        extra: Mapping[str, Any] | None = None,
        *,
        signal_to: str | None = "",
        plain: bool = False,
    ) -> Awaitable[None] | None:
        """:meth:`record_decision` without a coroutine on the common path: the record is
        appended and the agent counted now; returns None, or an awaitable the caller must
        await before going on (the recorder must open first, its batch is full, or a signal
        is to be sent). ``plain=True`` promises that every value (the arguments and ``extra``)
        is plain JSON, as the mediator's are (see ``FlightRecorder.append``). Raises
        RecorderError as ``record_decision`` does."""
        data = {
            "operation": operation,
            "resource": resource,
            "decision": decision.action,
            "reason": decision.reason,
            "rule": decision.rule_name,
            "policy": decision.policy,
            **(extra or {}),
        }
        return self.note_record(proc, agent_id, data, decision, signal_to, plain)

    def note_record(
        self,
        proc: AgentProcess | None,
        agent_id: str,
        data: dict[str, Any],
        decision: Decision,
        signal_to: str | None = "",
        plain: bool = False,
    ) -> Awaitable[None] | None:
        """:meth:`note_decision` with the record's data already built (``operation``,
        ``resource``, ``decision``, ``reason``, ``rule``, ``policy`` and any extra fields).

        An allow that still has shared rate-limit tokens to take (``decision.rate_checks``)
        returns an awaitable that takes them, records the final decision, and raises its
        violation (RateLimitExceeded) when a bucket was empty or the store failed (fail
        closed; ``rate_store_failures`` counts those)."""
        if decision.rate_checks:
            return self._settle_rate(proc, agent_id, data, decision, signal_to, plain)
        violation = decision.violation
        event = decision.violation_event if violation else "policy_decision"
        if self.debug:
            log.debug("%s %s: %s", event, proc.id if proc is not None else agent_id, data)
        self._count(str(data.get("operation") or "-"), decision, event)
        severity = "warning" if violation else "info"
        if _tracing.active:
            trace_decision(proc.id if proc is not None else agent_id, data, event, severity)
        target = (proc.id if proc is not None else None) if signal_to == "" else signal_to
        signal = decision.signal if violation and target is not None else None
        recorder = self.recorder
        if not recorder.ready:
            return self._record_slowly(proc, agent_id, data, decision, target, signal)
        recorder.append(event, proc.id if proc else agent_id, data, severity, None, plain)
        if proc is not None:
            if violation:
                proc.violations_count += 1
            else:
                proc.actions_count += 1
        if signal is not None or recorder.batch_full:
            return self._after_record(recorder.batch_full, target, signal)
        return None

    def _count(self, operation: str, decision: Decision, event: str) -> None:
        self.decisions.add((operation, decision.action, decision.rule_name or "-", event))

    async def _settle_rate(
        self,
        proc: AgentProcess | None,
        agent_id: str,
        data: dict[str, Any],
        decision: Decision,
        signal_to: str | None,
        plain: bool,
    ) -> None:
        final, stands = await self.settle(decision)
        if not stands:
            data = {**data, "decision": final.action, "reason": final.reason}
        pending = self.note_record(proc, agent_id, data, final, signal_to, plain)
        if pending is not None:
            await pending
        if not final.allowed:
            raise final.error(str(data.get("operation")), str(data.get("resource")))

    async def settle(self, decision: Decision) -> tuple[Decision, bool]:
        """Take the shared rate-limit tokens an allow still needs (``decision.rate_checks``):
        the final decision (without rate checks), and whether the allow stood. An empty
        bucket, or a store that fails (fail closed; ``rate_store_failures`` counts those),
        turns it into the rule's rate-limit deny. Never raises."""
        final = dataclasses.replace(decision, rate_checks=())
        for check in decision.rate_checks:
            try:
                taken = await check.store.take(check.key, check.limit)
            except Exception as exc:
                self.rate_store_failures += 1
                log.error("rate-limit store failed, denying: %r", exc)
                why = f"rate limit store unavailable ({type(exc).__name__}): denied"
                return dataclasses.replace(check.denied, reason=why), False
            if not taken:
                return check.denied, False
        return final, True

    async def authorize_run(
        self,
        proc: AgentProcess,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        extra: Mapping[str, Any],
        limiter: RateLimiter | None = None,
    ) -> Decision:
        """The decision on running ``proc``'s agent (``kernel.execute``) with these arguments,
        recorded, and raised when denied.

        Operation ``run``, resource the agent's name, context ``agent_id`` and ``agent_name``
        (the name), ``execution_id``, ``content`` (the texts of the arguments, see
        :func:`~agent_os.control_plane.policy.content.argument_texts`), ``content_complete``
        and ``context`` (``extra["context"]``); the policies' default does not deny
        (registration is the grant to run), their rules and rate limits do; then a token of
        ``limiter`` (``register(rate_limit=...)``) per agent name. One record: ``execute``
        (with ``extra``) when allowed, else of the violation's kind. Raises
        PolicyViolationError or RateLimitExceeded when denied, RecorderError."""
        name = proc.name
        texts, complete = argument_texts(args, kwargs)
        ctx = {
            "agent_id": name,
            "agent_name": name,
            "execution_id": proc.id,
            "content": texts,
            "content_complete": complete,
            "context": extra.get("context") or {},
        }
        decision = self.policy.evaluate(RUN_OPERATION, name, ctx, default="allow")
        if decision.rate_checks:
            decision, _ = await self.settle(decision)
        if decision.allowed and limiter is not None and not limiter.take(name):
            why = f"agent {name} exceeded {limiter.limit.limit} runs per minute (register rate_limit)"
            decision = Decision(False, "deny", why, KERNEL_POLICY, violation=True, rate_limited=True)
        violation = decision.violation
        event = decision.violation_event if violation else "execute"
        self._count(RUN_OPERATION, decision, event)
        data = {
            "name": name,
            "operation": RUN_OPERATION,
            "resource": name,
            "decision": decision.action,
            "reason": decision.reason,
            "rule": decision.rule_name,
            "policy": decision.policy,
            **extra,
        }
        if self.debug:
            log.debug("%s %s: %s", event, proc.id, data)
        severity = "warning" if violation else "info"
        if _tracing.active:
            trace_decision(proc.id, data, event, severity)
        await self.recorder.log(event, proc.id, data, severity, execution_id=proc.id)
        if violation:
            proc.violations_count += 1
            if decision.signal is not None:
                await self.signals.send(proc.id, decision.signal, sender="policy")
        if not decision.allowed:
            raise decision.error(RUN_OPERATION, name)
        return decision

    async def record_action(
        self,
        proc: AgentProcess | None,
        agent_id: str,
        data: Mapping[str, Any],
        decision: Decision,
    ) -> tuple[Decision, Record]:
        """Record the decision on an action (``kernel.submit``) and return the final decision
        (shared rate-limit tokens taken, see :meth:`settle`) with its record.

        One record: when the decision is a violation (a deny, or an audit-mode allow of what a
        rule denies), of the event type of its kind (``Decision.violation_event``:
        ``policy_violation``, ``permission_denied``, ``rate_limit_exceeded``,
        ``action_blocked``), else ``policy_decision``; ``data`` gets
        the final ``decision`` and ``reason``. Counts the decision on the agent and, on a
        violation, sends the rule's ``on_violation`` signal to the agent. Raises RecorderError
        when the recorder refuses the record."""
        if decision.rate_checks:
            decision, _ = await self.settle(decision)
        body = {**data, "decision": decision.action, "reason": decision.reason}
        violation = decision.violation
        event = decision.violation_event if violation else "policy_decision"
        self._count(str(data.get("operation") or "-"), decision, event)
        if self.debug:
            log.debug("%s %s: %s", event, agent_id, body)
        execution = proc.id if proc is not None else None
        severity = "warning" if violation else "info"
        if _tracing.active:
            trace_decision(agent_id, body, event, severity)
        recorder = self.recorder
        if recorder.ready:  # the hot path: no coroutine per record (as in note_record)
            record = recorder.append(event, agent_id, body, severity, execution, True)
            if recorder.batch_full:
                await recorder.backpressure()
        else:
            record = await recorder.log(event, agent_id, body, severity, execution_id=execution, plain=True)
        _count(proc, violation)
        if violation and decision.signal is not None and proc is not None:
            await self.signals.send(proc.id, decision.signal, sender="policy")
        return decision, record

    async def _record_slowly(
        self,
        proc: AgentProcess | None,
        agent_id: str,
        data: dict[str, Any],
        decision: Decision,
        target: str | None,
        signal: AgentSignal | None,
    ) -> None:
        violation = decision.violation
        event = decision.violation_event if violation else "policy_decision"
        severity = "warning" if violation else "info"
        await self.recorder.log(event, proc.id if proc else agent_id, data, severity)
        _count(proc, violation)
        if signal is not None and target is not None:
            await self.signals.send(target, signal, sender="policy")

    async def _after_record(self, full: bool, target: str | None, signal: AgentSignal | None) -> None:
        if full:
            await self.recorder.backpressure()
        if signal is not None and target is not None:
            await self.signals.send(target, signal, sender="policy")


def trace_decision(agent_id: str, data: Mapping[str, Any], event: str, severity: str) -> None:
    """Record the span of one decision while tracing is on: ``policy <operation>``, with the
    decision's fields as attributes and its flight-recorder record as an event
    (``flight_recorder.append``: one event per record, no span per append). The span marks the
    moment of the decision (its evaluation takes microseconds), under the current span."""
    _tracing.record(
        f"policy {data.get('operation') or 'action'}",
        _tracing.now(),
        {
            "agent_os.agent.id": agent_id,
            "agent_os.policy.operation": data.get("operation"),
            "agent_os.policy.resource": data.get("resource"),
            "agent_os.policy.action": data.get("decision"),
            "agent_os.policy.rule": data.get("rule"),
            "agent_os.policy.name": data.get("policy"),
            "agent_os.policy.reason": data.get("reason"),
            "agent_os.message.id": data.get("message_id"),
            "agent_os.action.name": data.get("action"),
        },
        events={TRACE_EVENT: {"agent_os.recorder.event": event, "agent_os.recorder.severity": severity}},
    )


def _count(proc: AgentProcess | None, violation: bool) -> None:
    if proc is not None:
        if violation:
            proc.violations_count += 1
        else:
            proc.actions_count += 1


def permitted(proc: AgentProcess, operation: str) -> bool:
    """Whether the agent's permissions cover ``operation`` (None: no restriction)."""
    covering = _COVERS.get(operation, "\0")
    if operation in proc.restrictions or covering in proc.restrictions:
        return False
    perms = proc.permissions
    return perms is None or operation in perms or covering in perms
