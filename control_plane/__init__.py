"""Control plane: policy, signals and the flight recorder, applied to every message.

- :mod:`control_plane.policy` / :mod:`control_plane.patterns` / :mod:`control_plane.policy_yaml`:
  the policy engine; :mod:`control_plane.ratelimit`: token buckets;
- :mod:`control_plane.signals`: AgentSignal and the SignalDispatcher;
- :mod:`control_plane.recorder`: the hash-chained flight recorder (memory, SQLite, PostgreSQL);
- :mod:`control_plane.kernel`: KernelSpace; :mod:`control_plane.mediator`: the bus middleware.
"""

from control_plane.errors import (
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
from control_plane.kernel import AgentTimeoutError, KernelSpace
from control_plane.mediator import Mediator
from control_plane.patterns import Pattern
from control_plane.policy import Decision, Policy, PolicySet, Rule
from control_plane.process import AgentStatus
from control_plane.ratelimit import RateLimit, RateLimiter, TokenBucket
from control_plane.recorder import FlightRecorder, Record, VerifyResult
from control_plane.signals import AgentSignal, SignalDispatcher, control_subject

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
