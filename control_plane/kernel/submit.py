"""``kernel.submit``: an action request through identity, signals, permissions, policy and rate
limits to its provider, with one record of the decision and one of the outcome.

The order, and why (``docs/control-plane.md``, Actions):

1. identity: the acting agent is the running agent (``agent_id`` None, or its own id or name)
   or, outside agent code, a process the kernel knows by ``agent_id``; anything else is denied;
2. signals: a stopped agent waits here until SIGCONT; a killed (or finished) one is denied;
3. the action: it must be registered, and its provider must accept the target (``resource``);
4. the gate: the agent's permissions, then the policy on (permission, resource) with the
   action's context, then rate-limit tokens (per agent name);
5. a reversible provider's snapshot is taken (``actions.snapshots``; a failure to take one
   blocks the action or lets it go on unprotected, as the store's ``on_failure`` says);
6. the provider runs; its output or its error is the outcome (a snapshot is kept under the
   outcome's record id, for ``kernel.rollback``).

A denial at any step is one ``policy_violation`` record; an allowed action is one
``policy_decision`` record and one ``action_outcome`` record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.errors import AgentStoppedError
from agent_os.control_plane.policy.decision import Decision
from agent_os.control_plane.process import RUNNING_AGENT, AgentProcess

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.kernel.gate import Gate
    from agent_os.control_plane.kernel.processes import ProcessTable

OUTCOME_EVENT = "action_outcome"
KERNEL_POLICY = "kernel"  # the policy name of denials the kernel makes before the policy


class Submitter:
    """Runs ``kernel.submit`` for one kernel: its ``gate``, ``processes`` and ``actions``."""

    def __init__(self, gate: Gate, processes: ProcessTable, actions: ActionRegistry) -> None:
        self.gate = gate
        self.processes = processes
        self.actions = actions

    async def submit(self, request: ActionRequest) -> ActionResult:
        """Decide on ``request``, run it when allowed, and return what came of it. Denials are
        results, not exceptions. Raises RecorderError when a record cannot be stored, and
        CancelledError when the agent's task is cancelled (SIGKILL) while it waits or runs."""
        if not isinstance(request, ActionRequest):
            raise TypeError(f"submit takes an ActionRequest, got {type(request).__name__}")
        data: dict[str, Any] = {"action": request.action, "target": request.target}
        proc, why = self._identify(request)
        if proc is None:
            return await self._deny(None, request.agent_id or "unknown", data, why)
        data["agent_name"] = proc.name
        try:
            await proc.wait_for_continue()
        except AgentStoppedError:
            return await self._deny(proc, proc.id, data, f"agent {proc.name} was killed or has finished")
        spec = self.actions.get(request.action)
        if spec is None:
            return await self._deny(proc, proc.id, data, f"unknown action {request.action!r}")
        data["operation"] = spec.permission
        try:
            resource = spec.provider.resource(request)
        except ActionRefused as exc:
            return await self._deny(proc, proc.id, data, str(exc))
        except Exception as exc:  # a provider's bug refuses, never allows
            return await self._deny(proc, proc.id, data, f"provider error: {type(exc).__name__}: {exc}")
        data["resource"] = resource
        ctx = {
            "agent_id": proc.name,
            "agent_name": proc.name,
            "execution_id": proc.id,
            "action": request.action,
            "target": request.target,
            "params": request.params,
        }
        decision = self.gate.decide(spec.permission, resource, ctx, proc)
        data["rule"] = decision.rule_name
        data["policy"] = decision.policy
        decision, record = await self.gate.record_action(proc, proc.id, data, decision)
        if not decision.allowed:
            return ActionResult(False, None, decision.reason, record.id)
        extra: dict[str, Any] = {}
        store = getattr(spec.provider, "snapshots", None)  # a Reversible provider's store
        snapshot = None
        if store is not None:
            try:
                snapshot = await spec.provider.capture(request)  # type: ignore[attr-defined]
            except Exception as exc:  # recorded; the store's on_failure says what happens next
                extra["snapshot_error"] = str(exc) or type(exc).__name__
                if store.on_failure == "block":
                    error = f"not done: no snapshot ({extra['snapshot_error']}; on_failure=block)"
                    return await self._outcome(proc, data, record.id, extra, None, error)
        try:
            output = await spec.provider.run(request)
        except Exception as exc:
            return await self._outcome(proc, data, record.id, extra, None, str(exc) or type(exc).__name__)
        if snapshot is not None:
            extra["snapshot"] = True
        result = await self._outcome(proc, data, record.id, extra, output, None)
        if snapshot is not None and store is not None and result.record_id is not None:
            store.keep(result.record_id, snapshot, proc.name)
        return result

    async def _outcome(
        self,
        proc: AgentProcess,
        data: dict[str, Any],
        decision_id: str,
        extra: dict[str, Any],
        output: Any,
        error: str | None,
    ) -> ActionResult:
        """Record the outcome of an allowed action (``error`` None: it succeeded)."""
        status = {"status": "ok"} if error is None else {"status": "error", "error": error}
        outcome = {**data, **extra, **status, "decision_id": decision_id}
        severity = "info" if error is None else "error"
        done = await self.gate.recorder.log(
            OUTCOME_EVENT, proc.id, outcome, severity, execution_id=proc.id, plain=True
        )
        return ActionResult(True, output, error, done.id)

    def _identify(self, request: ActionRequest) -> tuple[AgentProcess | None, str]:
        running = RUNNING_AGENT.get()
        claimed = request.agent_id
        if running is not None:
            if claimed is None or claimed in (running.id, running.name):
                return running, ""
            return None, f"agent {running.name} cannot act as {claimed!r}"
        if claimed is None:
            return None, "no agent: outside agent code, an ActionRequest needs an agent_id"
        proc = self.processes.find(claimed)
        if proc is None:
            return None, f"unknown agent {claimed!r}"
        return proc, ""

    async def _deny(
        self, proc: AgentProcess | None, agent_id: str, data: dict[str, Any], reason: str
    ) -> ActionResult:
        decision = Decision(False, "deny", reason, KERNEL_POLICY, violation=True)
        body = {"operation": None, "resource": None, **data, "rule": None, "policy": KERNEL_POLICY}
        decision, record = await self.gate.record_action(proc, agent_id, body, decision)
        return ActionResult(False, None, decision.reason, record.id)
