"""Control plane: policy, signals and the flight recorder, applied to every message.

- ``policy``, ``patterns``, ``policy_yaml``: the policy engine; ``ratelimit``: token buckets;
- ``signals``: AgentSignal and the SignalDispatcher;
- ``recorder``: the hash-chained flight recorder (memory, SQLite, PostgreSQL);
- ``kernel``: KernelSpace; ``mediator``: the bus middleware.
"""

from agent_os.control_plane.errors import (
    AgentNotFound,
    AgentStoppedError,
    ControlPlaneError,
    HoldQueueFull,
    KernelError,
    PolicyError,
    PolicyLoadError,
    PolicyViolationError,
    RateLimitExceeded,
    RecorderError,
    SignalError,
    TamperDetected,
    VerificationFailed,
)
from agent_os.control_plane.kernel import AgentTimeoutError, KernelSpace
from agent_os.control_plane.mediator import Mediator
from agent_os.control_plane.patterns import Pattern
from agent_os.control_plane.policy import Decision, Policy, PolicySet, Rule
from agent_os.control_plane.process import AgentStatus
from agent_os.control_plane.ratelimit import RateLimit, RateLimiter, TokenBucket
from agent_os.control_plane.recorder import FlightRecorder, Record, VerifyResult
from agent_os.control_plane.signals import AgentSignal, SignalDispatcher, control_subject

__all__ = [
    "AgentNotFound",
    "AgentSignal",
    "AgentStatus",
    "AgentStoppedError",
    "AgentTimeoutError",
    "ControlPlaneError",
    "Decision",
    "FlightRecorder",
    "HoldQueueFull",
    "KernelError",
    "KernelSpace",
    "Mediator",
    "Pattern",
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
    "SignalDispatcher",
    "SignalError",
    "TamperDetected",
    "TokenBucket",
    "VerificationFailed",
    "VerifyResult",
    "control_subject",
]
