"""``kernel.submit``: an action request through identity, signals, permissions, policy and rate
limits to its provider, with one record of the decision and one of the outcome.

The order, and why (``docs/control-plane.md``, Actions):

1. identity: the acting agent is the running agent (``agent_id`` None, or its own id or name)
   or, outside agent code, a process the kernel knows by ``agent_id``; anything else is denied;
2. signals: a stopped agent waits here until SIGCONT; a killed (or finished) one is denied;
3. the action: it must be registered, and its provider must accept the target (``resource``);
4. the gate: the agent's permissions (the action's, or the provider's ``permission(request)``),
   then the policy on (operation, resource) with the action's context (and the provider's
   ``context(request)`` fields), then rate-limit tokens (per agent name);
5. a reversible provider's snapshot is taken (``actions.snapshots``; a failure to take one
   blocks the action or lets it go on unprotected, as the store's ``on_failure`` says);
6. the provider runs; its output or its error is the outcome (a snapshot is kept under the
   outcome's record id, for ``kernel.rollback``).

A denial at any step is one record whose event type says its kind: ``action_blocked`` (steps
1-3), ``permission_denied``, ``policy_violation`` or ``rate_limit_exceeded`` (step 4); an
allowed action is one ``policy_decision`` record and one ``action_outcome`` record.

Steps 1 to 4 are :meth:`Submitter.decide` (without the wait of step 2), step 5 is
:meth:`Submitter.run`: in mediated mode the control-plane service decides and records, and a
tool service in another process runs the provider (``docs/services.md``, "The tool service").
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb import tracing as _tracing
from agent_os.control_plane.actions.provider import (
    NO_FIELDS,
    ActionFailed,
    ActionRefused,
    request_context,
    request_permission,
)
from agent_os.control_plane.actions.request import ActionRequest, ActionResult, action_result
from agent_os.control_plane.errors import AgentStoppedError, KernelError
from agent_os.control_plane.kernel.gate import KERNEL_POLICY
from agent_os.control_plane.policy.decision import ACTION_BLOCKED, Decision
from agent_os.control_plane.process import RUNNING_AGENT, AgentProcess, Life
from agent_os.control_plane.recorder.records import TRACE_EVENT

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry, ActionSpec
    from agent_os.control_plane.kernel.gate import Gate
    from agent_os.control_plane.kernel.processes import ProcessTable
    from agent_os.control_plane.recorder import Record

OUTCOME_EVENT = "action_outcome"


@dataclass(frozen=True, slots=True)
class ActionDecision:
    """The recorded decision on one action request (:meth:`KernelSpace.decide_action`).

    ``request``; ``agent`` (the acting agent's process id, or what it claimed when it is
    unknown); ``spec`` (the action, None when denied before it was found); ``data`` (the
    fields the decision record and the outcome record share: ``action``, ``target``,
    ``agent_name``, ``operation``, ``resource``, ``rule``, ``policy``); ``decision``;
    ``record_id`` (the ``policy_decision`` record, or the denial's record)."""

    request: ActionRequest
    agent: str
    spec: ActionSpec | None
    data: Mapping[str, Any]
    decision: Decision
    record_id: str

    @property
    def allowed(self) -> bool:
        """Whether the action may run."""
        return self.decision.allowed

    def denial(self) -> ActionResult:
        """The result of a denied action: ``allowed=False``, the reason in ``error``."""
        return action_result(False, None, self.decision.reason, self.record_id)


_new: Final = object.__new__
# ActionDecision is frozen: kernel.submit, which makes one per action, sets its fields through
# their slot descriptors, as its __init__ does through object.__setattr__, at half the cost.
_set_request: Final = getattr(ActionDecision, "request").__set__  # noqa: B009 (mypy sees the field's type)
_set_agent: Final = getattr(ActionDecision, "agent").__set__  # noqa: B009
_set_spec: Final = getattr(ActionDecision, "spec").__set__  # noqa: B009
_set_data: Final = getattr(ActionDecision, "data").__set__  # noqa: B009
_set_decision: Final = getattr(ActionDecision, "decision").__set__  # noqa: B009
_set_record_id: Final = getattr(ActionDecision, "record_id").__set__  # noqa: B009


def action_decision(
    request: ActionRequest,
    agent: str,
    spec: ActionSpec | None,
    data: Mapping[str, Any],
    decision: Decision,
    record_id: str,
) -> ActionDecision:
    """``ActionDecision(request, agent, spec, data, decision, record_id)``, built without the
    dataclass ``__init__``."""
    decided: ActionDecision = _new(ActionDecision)
    _set_request(decided, request)
    _set_agent(decided, agent)
    _set_spec(decided, spec)
    _set_data(decided, data)
    _set_decision(decided, decision)
    _set_record_id(decided, record_id)
    return decided


class Submitter:
    """Runs ``kernel.submit`` for one kernel: its ``gate``, ``processes`` and ``actions``."""

    def __init__(self, gate: Gate, processes: ProcessTable, actions: ActionRegistry) -> None:
        self.gate = gate
        self.processes = processes
        self.actions = actions

    def submit(self, request: ActionRequest) -> Awaitable[ActionResult]:
        """Decide on ``request``, run it when allowed, and return what came of it (awaitable).
        Denials are results, not exceptions. Raises RecorderError when a record cannot be
        stored, and CancelledError when the agent's task is cancelled (SIGKILL) while it waits
        or runs. While tracing is on, the whole of it is the span ``action <action>``."""
        # Not a coroutine itself: with tracing off, no second coroutine per action.
        return self._submit(request) if not _tracing.active else self._traced(request)

    async def _traced(self, request: ActionRequest) -> ActionResult:
        with _tracing.span(f"action {request.action}", action_attributes(request)) as span:
            result = await self._submit(request)
            if span is not None:
                trace_result(span, result)
            return result

    async def _submit(self, request: ActionRequest) -> ActionResult:
        if type(request) is not ActionRequest:
            _check(request)
        proc, why = self._identify(request)
        if proc is not None and proc.life is not Life.RUNNING:  # stopped, killed or waiting
            try:
                await proc.wait_for_continue()
            except AgentStoppedError:
                why = f"agent {proc.name} was killed or has finished"
        decided = await self._decide(request, proc, why)
        if not decided.decision.allowed:
            return decided.denial()
        return await self.run(decided)

    async def decide(
        self,
        request: ActionRequest,
        refusal: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> ActionDecision:
        """Steps 1, 3 and 4 of :meth:`submit` and their one record, without waiting for the
        agent's signals (a killed or finished agent is denied) or running the provider. For a
        caller that has applied the agent's signals itself (the control-plane service in
        mediated mode). ``refusal``: deny for this reason once the agent is identified (the
        caller's own check failed); ``context``: more fields for the policy (of a request that
        came as a message: ``sender``, ``verified``, ``trust_level``), under the action's own.
        Raises RecorderError."""
        _check(request)
        proc, why = self._identify(request)
        if proc is not None and proc.killed:
            why = f"agent {proc.name} was killed or has finished"
        return await self._decide(request, proc, why or refusal or "", context)

    async def run(self, decided: ActionDecision) -> ActionResult:
        """Steps 5 and 6: take a reversible provider's snapshot, run the provider of an allowed
        decision and record the outcome (keeping the snapshot under its record id). Raises
        KernelError for a decision that did not allow the action, RecorderError."""
        spec = decided.spec
        if not decided.decision.allowed or spec is None:
            raise KernelError("only an allowed action runs")
        request = decided.request
        extra: dict[str, Any] = {}
        store = getattr(spec.provider, "snapshots", None)  # a reversible provider's store
        snapshot = None
        if store is not None:
            try:
                snapshot = await spec.provider.capture(request)  # type: ignore[attr-defined]
            except Exception as exc:  # recorded; the store's on_failure says what happens next
                extra["snapshot_error"] = str(exc) or type(exc).__name__
                if store.on_failure == "block":
                    error = f"not done: no snapshot ({extra['snapshot_error']}; on_failure=block)"
                    done = await self.record_outcome(decided, error, extra)
                    return action_result(True, None, error, done.id)
        try:
            output = await spec.provider.run(request)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            done = await self.record_outcome(decided, error, extra)
            partial = exc.output if isinstance(exc, ActionFailed) else None
            return action_result(True, partial, error, done.id)
        if snapshot is not None:
            extra["snapshot"] = True
        done = await self.record_outcome(decided, None, extra)
        if snapshot is not None and store is not None:
            store.keep(done.id, snapshot, decided.data["agent_name"])
        return action_result(True, output, None, done.id)

    async def record_outcome(
        self, decided: ActionDecision, error: str | None = None, extra: Mapping[str, Any] | None = None
    ) -> Record:
        """Record the outcome of an allowed action (``action_outcome``: the decision's data,
        ``extra`` (a snapshot's note), ``status`` ``ok`` or ``error``, ``error``,
        ``decision_id``). Raises RecorderError."""
        agent = decided.agent
        outcome = {**decided.data, **extra} if extra else {**decided.data}
        if error is None:
            outcome["status"], severity = "ok", "info"
        else:
            outcome["status"], outcome["error"], severity = "error", error, "error"
        outcome["decision_id"] = decided.record_id
        if _tracing.active:
            _tracing.add_event(
                TRACE_EVENT,
                {"agent_os.recorder.event": OUTCOME_EVENT, "agent_os.action.status": outcome["status"]},
            )
        recorder = self.gate.recorder
        if not recorder.ready:
            return await recorder.log(OUTCOME_EVENT, agent, outcome, severity, execution_id=agent, plain=True)
        record = recorder.append(OUTCOME_EVENT, agent, outcome, severity, agent, True)
        if recorder.batch_full:
            await recorder.backpressure()
        return record

    async def _decide(
        self,
        request: ActionRequest,
        proc: AgentProcess | None,
        why: str,
        context: Mapping[str, Any] | None = None,
    ) -> ActionDecision:
        data: dict[str, Any] = {"action": request.action, "target": request.target}
        if proc is None:
            return await self._deny(request, None, request.agent_id or "unknown", data, why)
        data["agent_name"] = proc.name
        if why:
            return await self._deny(request, proc, proc.id, data, why)
        spec = self.actions.get(request.action)
        if spec is None:
            return await self._deny(request, proc, proc.id, data, f"unknown action {request.action!r}")
        data["operation"] = spec.operation
        try:
            resource = spec.provider.resource(request)
            permission = request_permission(spec.provider, request, spec.permission)
            extra = request_context(spec.provider, request)
        except ActionRefused as exc:
            return await self._deny(request, proc, proc.id, data, str(exc))
        except Exception as exc:  # a provider's bug refuses, never allows
            why = f"provider error: {type(exc).__name__}: {exc}"
            return await self._deny(request, proc, proc.id, data, why)
        data["resource"] = resource
        if permission != spec.operation:
            data["permission"] = permission
        # Without fields beyond the kernel's own (a provider without a context method, no
        # caller's context), a cached decision needs no context built.
        decision = None
        if extra is NO_FIELDS and context is None:
            decision = self.gate.cached_action(spec.operation, resource, proc, permission)
        if decision is None:
            ctx = {
                **extra,  # the provider's fields (host, argv ...), under the caller's and the kernel's
                **(context or {}),
                "agent_id": proc.name,
                "agent_name": proc.name,
                "execution_id": proc.id,
                "action": request.action,
                "target": request.target,
                "params": request.params,
            }
            decision = self.gate.decide(spec.operation, resource, ctx, proc, permission=permission)
        data["rule"] = decision.rule_name
        data["policy"] = decision.policy
        decision, record = await self.gate.record_action(proc, proc.id, data, decision)
        return action_decision(request, proc.id, spec, data, decision, record.id)

    def _identify(self, request: ActionRequest) -> tuple[AgentProcess | None, str]:
        running = RUNNING_AGENT.get()
        claimed = request.agent_id
        if running is not None:
            if claimed is None or claimed in (running.id, running.name):
                return running, ""
            # Denied, and recorded against the agent that tried (not the one it named).
            return running, f"agent {running.name} cannot act as {claimed!r}"
        if claimed is None:
            return None, "no agent: outside agent code, an ActionRequest needs an agent_id"
        proc = self.processes.find(claimed)
        if proc is None:
            return None, f"unknown agent {claimed!r}"
        return proc, ""

    async def _deny(
        self,
        request: ActionRequest,
        proc: AgentProcess | None,
        agent_id: str,
        data: dict[str, Any],
        reason: str,
    ) -> ActionDecision:
        decision = Decision(False, "deny", reason, KERNEL_POLICY, violation=True, kind=ACTION_BLOCKED)
        body = {"operation": None, "resource": None, **data, "rule": None, "policy": KERNEL_POLICY}
        decision, record = await self.gate.record_action(proc, agent_id, body, decision)
        return action_decision(request, agent_id, None, body, decision, record.id)


def _check(request: object) -> None:
    if not isinstance(request, ActionRequest):
        raise TypeError(f"submit takes an ActionRequest, got {type(request).__name__}")


def action_attributes(request: ActionRequest) -> dict[str, Any]:
    """The attributes of an action's span: its name, its target and the agent it names."""
    return {
        "agent_os.action.name": request.action,
        "agent_os.action.target": request.target,
        "agent_os.agent.id": request.agent_id,
    }


def trace_result(span: Any, result: ActionResult) -> None:
    """Put an action's result on its span: allowed or not, and the error (status ERROR when
    the action ran and failed)."""
    span.set_attribute("agent_os.action.allowed", result.allowed)
    if result.record_id is not None:
        span.set_attribute("agent_os.recorder.record_id", result.record_id)
    if result.error is not None:
        span.set_attribute("agent_os.action.error", result.error[: _tracing.MAX_ATTRIBUTE])
        if result.allowed:
            _tracing.set_error(span, result.error)
