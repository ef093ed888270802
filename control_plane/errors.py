"""The errors of the control plane.

Errors that refuse a message derive from :class:`agent_os.amb.errors.MessageRejected`, so the bus
dead-letters an inbound message with their ``reason`` and counts it, and an outbound one
reaches the publisher::

    ControlPlaneError
    ├── PolicyError (ValueError)               a policy cannot be built
    │   ├── PatternError                       a part of a pattern is invalid (the part named)
    │   └── PolicyLoadError                    YAML that is not a valid policy (line and field named)
    ├── SignalError (ValueError)               a signal that cannot be sent or handled this way
    ├── AgentNotFound (KeyError)               no agent with that id
    ├── RecorderError                          the flight recorder cannot store or read records
    │   ├── RecorderConfigError (ValueError)   an unsupported storage, a bad key or option
    │   ├── RecorderKeyError                   encrypted records and no key, or another key
    │   ├── RecorderInUse                      another recorder writes this file or table
    │   ├── HeadError (ValueError)             an exported head that cannot be read
    │   └── TamperDetected                     a record does not decode or authenticate
    ├── InboxBusy (ValueError)                 a reply inbox still waits for another request's reply
    ├── SandboxError                           an OS sandbox cannot start, or its channel broke
    │   ├── SandboxUnavailable                 this host cannot sandbox (no bwrap, not root ...)
    │   ├── ChannelError (ValueError)          a malformed, over-long or truncated channel frame
    │   ├── ChannelClosed                      the other end of a sandbox channel went away
    │   ├── RemoteError                        a call over a sandbox channel failed on the other end
    │   └── SandboxedAgentError                a sandboxed agent ended without a result (the reason)
    ├── KernelError (RuntimeError)             misuse of KernelSpace (unregistered agent, limits)
    └── TaskError                              background tasks (TaskManager, TaskWorker)
        ├── TaskNotFound (KeyError)            no task with that id
        ├── TaskTimeout (TimeoutError)         wait() ran out before the task completed
        ├── UnknownHandler (ValueError)        a task names a handler nobody registered
        └── TaskInputError (TypeError)         a task input the bus cannot serialize

    amb.MessageRejected
    ├── PolicyViolationError (+ControlPlaneError)   policy or permissions denied the action
    │   └── RateLimitExceeded                       a token bucket was empty
    ├── AgentStoppedError (+ControlPlaneError)      the agent was killed or terminated
    │   └── AgentTimeoutError (+TimeoutError)       an execution ran past its timeout
    ├── HoldQueueFull (+ControlPlaneError)          SIGSTOP's bounded hold queue overflowed
    └── VerificationFailed (+ControlPlaneError)     a verifier module (CMVK) rejected a result
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent_os.amb.errors import MessageRejected

if TYPE_CHECKING:
    from agent_os.control_plane.policy.decision import Decision


class ControlPlaneError(Exception):
    """Root of every error the control plane raises."""


class PolicyError(ControlPlaneError, ValueError):
    """A policy, rule or pattern is invalid."""


class PatternError(PolicyError):
    """A pattern is invalid; ``part`` names what is at fault: ``operation``, ``resource``,
    ``match_type``, ``exclude`` or ``conditions`` (the message starts with it)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part


class PolicyLoadError(PolicyError):
    """A YAML policy is invalid; ``line`` (1-based, or None) and ``field`` name the culprit."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.line = line
        self.field = field


class SignalError(ControlPlaneError, ValueError):
    """A signal cannot be used this way (e.g. a handler for SIGKILL)."""


class AgentNotFound(ControlPlaneError, KeyError):
    """No agent is known by that id."""


class InboxBusy(ControlPlaneError, ValueError):
    """A request names a ``reply_to`` that is still waiting for the reply to another request."""


class KernelError(ControlPlaneError, RuntimeError):
    """KernelSpace was used wrongly: an unregistered agent, too many agents at once."""


class SandboxError(ControlPlaneError):
    """An OS sandbox cannot be started or managed, or its channel to the kernel broke."""


class SandboxUnavailable(SandboxError):
    """This host cannot run the sandbox as asked (no bubblewrap, not root, no namespaces); the
    message says what is missing. Raised before anything runs: never a silent fallback."""


class ChannelError(SandboxError, ValueError):
    """A frame on a sandbox channel is malformed, over-long, or cut off."""


class ChannelClosed(SandboxError):
    """The other end of a sandbox channel closed (or died) before answering."""


class RemoteError(SandboxError):
    """A call over a sandbox channel failed on the other end: ``kind`` is the name of the
    exception raised there (``PolicyViolationError`` ...), the message its text."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.text = message


class TaskError(ControlPlaneError):
    """A background task cannot be dispatched, found or waited for (``docs/tasks.md``)."""


class TaskNotFound(TaskError, KeyError):
    """No task with that id was dispatched by this manager (or it was forgotten)."""


class TaskTimeout(TaskError, TimeoutError):
    """``TaskManager.wait`` ran out of time before the task completed; the task goes on."""


class UnknownHandler(TaskError, ValueError):
    """A task names a handler that is not registered (with the manager's ``handlers``, or the
    worker that took it)."""


class TaskInputError(TaskError, TypeError):
    """A task's input cannot be serialized by the bus client (msgpack or JSON values only)."""


class SandboxedAgentError(SandboxError):
    """A sandboxed agent ended without a result: it failed, was killed, ran out of time, or broke
    its channel. ``reason`` is the kernel's one-line account (also in the agent's flight-recorder
    record); ``details`` the record's data (exit status, signal, what the sandbox reported)."""

    def __init__(self, agent_id: str, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"sandboxed agent {agent_id}: {reason}")
        self.agent_id = agent_id
        self.reason = reason
        self.details = dict(details or {})


class RecorderError(ControlPlaneError):
    """The flight recorder cannot store or read its records."""


class RecorderConfigError(RecorderError, ValueError):
    """The recorder cannot be built this way: an unsupported storage, a bad key or option."""


class RecorderKeyError(RecorderError):
    """Records are encrypted and this recorder has no key, or a different one (never garbage)."""


class RecorderInUse(RecorderError):
    """Another recorder (this process or another) holds the file or table: one writer at a time."""


class HeadError(RecorderError, ValueError):
    """An exported chain head that is not one (bad JSON, a missing or malformed field)."""


class TamperDetected(RecorderError):
    """The hash chain is broken; ``sequence`` is the first record that does not verify."""

    def __init__(self, message: str, *, sequence: int | None) -> None:
        super().__init__(message)
        self.sequence = sequence


class PolicyViolationError(MessageRejected, ControlPlaneError):
    """Policy or permissions denied an action; ``decision`` says which rule and why."""

    reason = "policy_denied"

    def __init__(self, message: str, *, decision: Decision | None = None, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.decision = decision


class RateLimitExceeded(PolicyViolationError):
    """A rate limit (per agent, per rule) has no token left."""

    reason = "rate_limited"


class AgentStoppedError(MessageRejected, ControlPlaneError):
    """The agent was killed or terminated: nothing more goes in or out."""

    reason = "agent_killed"


class AgentTimeoutError(AgentStoppedError, TimeoutError):
    """An execution ran past its timeout; SIGALRM was sent and the execution cancelled."""

    reason = "timeout"


class HoldQueueFull(MessageRejected, ControlPlaneError):
    """The agent is stopped (SIGSTOP) and its bounded hold queue is full."""

    reason = "hold_queue_full"


class VerificationFailed(MessageRejected, ControlPlaneError):
    """A verifier module (e.g. CMVK) did not verify an agent's result."""

    reason = "verification_failed"

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result
