"""Control plane: policy, signals and the flight recorder, applied to every message and action.

Read top-down: ``kernel/`` (KernelSpace and its parts) over ``mediation/`` (the bus side) and
``actions/`` (action requests, their registry and providers) over
``process`` (an agent's run-time state) over ``recorder/`` over ``policy/`` (pure) over
``agent_signal`` and ``errors``. ``admin`` serves a kernel over HTTP; ``tasks`` runs background
tasks on the bus over the kernel. See ``docs/control-plane.md``.

The names below load on first use (like the facade's), so that code needing one module
(a sandbox's runtime: ``sandbox.channel``) does not import the whole control plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_os._lazy import lazy_exports

if TYPE_CHECKING:
    from agent_os.control_plane.actions import (
        BUILTIN_TOOLS,
        ActionRequest,
        ActionResult,
        AgentLoop,
        AgentLoopResult,
        BusActions,
        LLMError,
        ToolDef,
        run_agent_loop,
    )
    from agent_os.control_plane.agent_signal import (
        AgentSignal,
    )
    from agent_os.control_plane.errors import (
        AgentNotFound,
        AgentStoppedError,
        AgentTimeoutError,
        ControlPlaneError,
        HoldQueueFull,
        KernelError,
        PatternError,
        PolicyError,
        PolicyLoadError,
        PolicyViolationError,
        RateLimitExceeded,
        RecorderError,
        SandboxedAgentError,
        SignalError,
        TamperDetected,
        TaskError,
        TaskInputError,
        TaskNotFound,
        TaskTimeout,
        UnknownHandler,
        VerificationFailed,
    )
    from agent_os.control_plane.kernel.signals import (
        SignalDispatcher,
    )
    from agent_os.control_plane.kernel.space import (
        KernelSpace,
    )
    from agent_os.control_plane.kernel.submit import (
        ActionDecision,
    )
    from agent_os.control_plane.mediation.control import (
        control_subject,
    )
    from agent_os.control_plane.mediation.mediator import (
        Mediator,
    )
    from agent_os.control_plane.policy.decision import (
        DECISION_EVENTS,
        VIOLATION_EVENTS,
        Decision,
        Rule,
    )
    from agent_os.control_plane.policy.patterns import (
        Pattern,
    )
    from agent_os.control_plane.policy.policy import (
        Policy,
    )
    from agent_os.control_plane.policy.policy_set import (
        PolicySet,
    )
    from agent_os.control_plane.policy.ratelimit import (
        RateLimit,
        RateLimiter,
        SharedRateLimits,
        TokenBucket,
    )
    from agent_os.control_plane.process import (
        AgentStatus,
    )
    from agent_os.control_plane.recorder import (
        FlightRecorder,
        Record,
        VerifyResult,
    )
    from agent_os.control_plane.sandbox import SandboxLimits, SandboxSpec
    from agent_os.control_plane.tasks import TASK_EVENTS, TaskManager, TaskState, TaskStatus, TaskWorker

# Public name -> the module that defines it (loaded on first access).
_LAZY: dict[str, str] = {
    "ActionDecision": "agent_os.control_plane.kernel.submit",
    "ActionRequest": "agent_os.control_plane.actions",
    "ActionResult": "agent_os.control_plane.actions",
    "AgentLoop": "agent_os.control_plane.actions",
    "AgentLoopResult": "agent_os.control_plane.actions",
    "AgentNotFound": "agent_os.control_plane.errors",
    "AgentSignal": "agent_os.control_plane.agent_signal",
    "AgentStatus": "agent_os.control_plane.process",
    "AgentStoppedError": "agent_os.control_plane.errors",
    "AgentTimeoutError": "agent_os.control_plane.errors",
    "BUILTIN_TOOLS": "agent_os.control_plane.actions",
    "BusActions": "agent_os.control_plane.actions",
    "ControlPlaneError": "agent_os.control_plane.errors",
    "DECISION_EVENTS": "agent_os.control_plane.policy.decision",
    "Decision": "agent_os.control_plane.policy.decision",
    "FlightRecorder": "agent_os.control_plane.recorder",
    "HoldQueueFull": "agent_os.control_plane.errors",
    "KernelError": "agent_os.control_plane.errors",
    "KernelSpace": "agent_os.control_plane.kernel.space",
    "LLMError": "agent_os.control_plane.actions",
    "Mediator": "agent_os.control_plane.mediation.mediator",
    "Pattern": "agent_os.control_plane.policy.patterns",
    "PatternError": "agent_os.control_plane.errors",
    "Policy": "agent_os.control_plane.policy.policy",
    "PolicyError": "agent_os.control_plane.errors",
    "PolicyLoadError": "agent_os.control_plane.errors",
    "PolicySet": "agent_os.control_plane.policy.policy_set",
    "PolicyViolationError": "agent_os.control_plane.errors",
    "RateLimit": "agent_os.control_plane.policy.ratelimit",
    "RateLimitExceeded": "agent_os.control_plane.errors",
    "RateLimiter": "agent_os.control_plane.policy.ratelimit",
    "Record": "agent_os.control_plane.recorder",
    "RecorderError": "agent_os.control_plane.errors",
    "Rule": "agent_os.control_plane.policy.decision",
    "SharedRateLimits": "agent_os.control_plane.policy.ratelimit",
    "SandboxLimits": "agent_os.control_plane.sandbox",
    "SandboxSpec": "agent_os.control_plane.sandbox",
    "SandboxedAgentError": "agent_os.control_plane.errors",
    "SignalDispatcher": "agent_os.control_plane.kernel.signals",
    "SignalError": "agent_os.control_plane.errors",
    "TASK_EVENTS": "agent_os.control_plane.tasks",
    "TamperDetected": "agent_os.control_plane.errors",
    "TaskError": "agent_os.control_plane.errors",
    "TaskInputError": "agent_os.control_plane.errors",
    "TaskManager": "agent_os.control_plane.tasks",
    "TaskNotFound": "agent_os.control_plane.errors",
    "TaskState": "agent_os.control_plane.tasks",
    "TaskStatus": "agent_os.control_plane.tasks",
    "TaskTimeout": "agent_os.control_plane.errors",
    "TaskWorker": "agent_os.control_plane.tasks",
    "UnknownHandler": "agent_os.control_plane.errors",
    "TokenBucket": "agent_os.control_plane.policy.ratelimit",
    "ToolDef": "agent_os.control_plane.actions",
    "VIOLATION_EVENTS": "agent_os.control_plane.policy.decision",
    "VerificationFailed": "agent_os.control_plane.errors",
    "VerifyResult": "agent_os.control_plane.recorder",
    "control_subject": "agent_os.control_plane.mediation.control",
    "run_agent_loop": "agent_os.control_plane.actions",
}

__all__ = [
    "BUILTIN_TOOLS",
    "DECISION_EVENTS",
    "TASK_EVENTS",
    "VIOLATION_EVENTS",
    "ActionDecision",
    "ActionRequest",
    "ActionResult",
    "AgentLoop",
    "AgentLoopResult",
    "AgentNotFound",
    "AgentSignal",
    "AgentStatus",
    "AgentStoppedError",
    "AgentTimeoutError",
    "BusActions",
    "ControlPlaneError",
    "Decision",
    "FlightRecorder",
    "HoldQueueFull",
    "KernelError",
    "KernelSpace",
    "LLMError",
    "Mediator",
    "Pattern",
    "PatternError",
    "Policy",
    "PolicyError",
    "PolicyLoadError",
    "PolicySet",
    "PolicyViolationError",
    "RateLimit",
    "RateLimitExceeded",
    "RateLimiter",
    "Record",
    "RecorderError",
    "Rule",
    "SandboxLimits",
    "SandboxSpec",
    "SandboxedAgentError",
    "SharedRateLimits",
    "SignalDispatcher",
    "SignalError",
    "TamperDetected",
    "TaskError",
    "TaskInputError",
    "TaskManager",
    "TaskNotFound",
    "TaskState",
    "TaskStatus",
    "TaskTimeout",
    "TaskWorker",
    "TokenBucket",
    "ToolDef",
    "UnknownHandler",
    "VerificationFailed",
    "VerifyResult",
    "control_subject",
    "run_agent_loop",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
