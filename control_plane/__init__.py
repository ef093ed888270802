"""Control plane: policy, signals and the flight recorder, applied to every message and action.

Read top-down: ``kernel/`` (KernelSpace and its parts) over ``mediation/`` (the bus side) and
``actions/`` (action requests, their registry and providers) over
``process`` (an agent's run-time state) over ``recorder/`` over ``policy/`` (pure) over
``agent_signal`` and ``errors``. ``admin`` serves a kernel over HTTP; ``tasks`` runs background
tasks on the bus over the kernel. See ``docs/control-plane.md``.
"""

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
from agent_os.control_plane.agent_signal import AgentSignal
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
    SignalError,
    TamperDetected,
    TaskError,
    TaskInputError,
    TaskNotFound,
    TaskTimeout,
    UnknownHandler,
    VerificationFailed,
)
from agent_os.control_plane.kernel.signals import SignalDispatcher
from agent_os.control_plane.kernel.space import KernelSpace
from agent_os.control_plane.kernel.submit import ActionDecision
from agent_os.control_plane.mediation.control import control_subject
from agent_os.control_plane.mediation.mediator import Mediator
from agent_os.control_plane.policy.decision import DECISION_EVENTS, VIOLATION_EVENTS, Decision, Rule
from agent_os.control_plane.policy.patterns import Pattern
from agent_os.control_plane.policy.policy import Policy
from agent_os.control_plane.policy.policy_set import PolicySet
from agent_os.control_plane.policy.ratelimit import RateLimit, RateLimiter, SharedRateLimits, TokenBucket
from agent_os.control_plane.process import AgentStatus
from agent_os.control_plane.recorder import FlightRecorder, Record, VerifyResult
from agent_os.control_plane.tasks import TASK_EVENTS, TaskManager, TaskState, TaskStatus, TaskWorker

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
