"""A rule of a policy, and the decision an evaluation reaches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import PolicyViolationError, RateLimitExceeded
from agent_os.control_plane.policy.patterns import Pattern
from agent_os.control_plane.policy.ratelimit import RateLimit, RateLimiter, SharedRateLimits

Action = Literal["allow", "deny"]

# The event types of the flight-recorder records of violations, one per kind (see
# ``Decision.violation_event``; ``docs/control-plane.md``, Records).
POLICY_VIOLATION: Final = "policy_violation"
"""A policy denied: one of its rules, its default action, a condition it could not decide."""
PERMISSION_DENIED: Final = "permission_denied"
"""The agent's permissions do not cover the operation."""
RATE_LIMIT_EXCEEDED: Final = "rate_limit_exceeded"
"""A rate limit (a rule's, a ``Policy.rate_limit``, a ``register(rate_limit=...)``) had no token."""
ACTION_BLOCKED: Final = "action_blocked"
"""The kernel refused before any policy: an unknown action, a target the provider refused, an
agent acting as another, a killed or finished agent."""
VIOLATION_EVENTS: Final = (POLICY_VIOLATION, PERMISSION_DENIED, RATE_LIMIT_EXCEEDED, ACTION_BLOCKED)
"""Every violation event type: ``recorder.query(event_type=VIOLATION_EVENTS)`` finds every denial."""
DECISION_EVENTS: Final = ("policy_decision", *VIOLATION_EVENTS)
"""The event types of decisions on messages and actions: ``policy_decision`` (allowed) and the
violations."""


@dataclass(slots=True)
class Rule:
    """One rule: ``action`` when ``pattern`` matches, with an optional signal and rate limit."""

    action: Action
    pattern: Pattern
    reason: str = ""
    on_violation: AgentSignal | None = None
    rate_limit: RateLimit | None = None
    name: str = ""
    index: int = -1
    limiter: RateLimiter | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "action": self.action, **self.pattern.to_dict()}
        if self.reason:
            out["reason"] = self.reason
        if self.on_violation is not None:
            out["on_violation"] = self.on_violation.name
        if self.rate_limit is not None:
            out["rate_limit"] = f"{self.rate_limit.limit}/{self.rate_limit.per:g}s"
        return out


@dataclass(slots=True, frozen=True)
class RateCheck:
    """A token still to take from a shared bucket (``store``, ``key``, ``limit``) before an
    allow stands; ``denied`` is the decision when there is none."""

    store: SharedRateLimits
    key: str
    limit: RateLimit
    denied: Decision


@dataclass(slots=True, frozen=True)
class Decision:
    """The outcome of one evaluation.

    ``allowed`` is what the caller must obey; ``action`` is the rule's (or default) action;
    ``rule`` is None when the default applied; ``violation`` is True when a deny was decided,
    also in audit mode where the action still proceeds; ``signal`` is the rule's
    ``on_violation`` signal, to send to the offending agent; ``rate_limited`` marks a deny from
    an empty bucket; ``kind`` is the event type of a violation that is not a rate limit's
    (:data:`POLICY_VIOLATION`, :data:`PERMISSION_DENIED`, :data:`ACTION_BLOCKED`).
    ``rate_checks``: tokens of shared buckets still to take before this allow stands (the
    gate takes them, and records the outcome: see ``Gate.note_record``).
    """

    allowed: bool
    action: str
    reason: str
    policy: str
    rule: Rule | None = None
    violation: bool = False
    signal: AgentSignal | None = None
    rate_limited: bool = False
    rate_checks: tuple[RateCheck, ...] = ()
    kind: str = POLICY_VIOLATION

    @property
    def violation_event(self) -> str:
        """The event type of this decision's record when it is a violation:
        :data:`RATE_LIMIT_EXCEEDED` for an empty bucket, else ``kind``."""
        return RATE_LIMIT_EXCEEDED if self.rate_limited else self.kind

    @property
    def rule_name(self) -> str | None:
        return None if self.rule is None else self.rule.name

    def error(self, operation: str, resource: str) -> PolicyViolationError:
        """The error that refuses ``operation`` on ``resource`` by this (deny) decision:
        RateLimitExceeded when a bucket was empty, else PolicyViolationError."""
        cls = RateLimitExceeded if self.rate_limited else PolicyViolationError
        return cls(f"{operation} on {resource!r} denied: {self.reason}", decision=self)
