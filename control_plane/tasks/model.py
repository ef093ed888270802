"""What background tasks are made of: their states, their status, their subjects on the bus and
the two messages (a task, a status) with the checks a receiver makes on them.

The rules: ``docs/tasks.md``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent_os.amb.errors import ConfigError, MessageRejected

NAME_OK: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A queue name, a subject prefix token and a task id: letters, digits, ``-`` and ``_``."""
HANDLER_OK: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""A handler name: letters, digits, ``.``, ``-`` and ``_``, at most 128."""
MAX_ERROR: Final = 2000
"""The longest error text a status carries (longer ones are cut)."""


class TaskState(enum.Enum):
    """Where a task is: ``pending`` (dispatched), ``running`` (a worker took it), and the three
    terminal states ``succeeded``, ``failed``, ``cancelled``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for ``succeeded``, ``failed`` and ``cancelled``: the task is complete."""
        return self not in (TaskState.PENDING, TaskState.RUNNING)


TASK_EVENTS: Final = (
    "task_dispatched",
    "task_running",
    "task_succeeded",
    "task_failed",
    "task_cancelled",
)
"""The flight-recorder event types of a TaskManager: one record per state change
(``recorder.query(event_type=TASK_EVENTS)`` finds them all)."""

_EVENT_OF: Final = {
    TaskState.PENDING: "task_dispatched",
    TaskState.RUNNING: "task_running",
    TaskState.SUCCEEDED: "task_succeeded",
    TaskState.FAILED: "task_failed",
    TaskState.CANCELLED: "task_cancelled",
}


def event_type(state: TaskState) -> str:
    """The record event type of a change to ``state``."""
    return _EVENT_OF[state]


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """What a manager knows of one task (a snapshot: later changes make a new one).

    ``attempt`` is the delivery the latest status came from (1 for the first, more after a
    worker died and the task was delivered again); ``worker`` and ``agent_id`` name the worker
    and the kernel agent running it (None while pending); ``result`` is the handler's return
    value once ``succeeded``, ``error`` the reason once ``failed`` or ``cancelled``;
    ``duplicates`` counts the results that came after the task was complete and were ignored.
    """

    id: str
    handler: str
    state: TaskState
    attempt: int = 0
    worker: str | None = None
    agent_id: str | None = None
    result: Any = None
    error: str | None = None
    dispatched_at: float = 0.0
    finished_at: float | None = None
    duplicates: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The status as plain values (``state`` as its name)."""
        return {
            "id": self.id,
            "handler": self.handler,
            "state": self.state.value,
            "attempt": self.attempt,
            "worker": self.worker,
            "agent_id": self.agent_id,
            "result": self.result,
            "error": self.error,
            "dispatched_at": self.dispatched_at,
            "finished_at": self.finished_at,
            "duplicates": self.duplicates,
        }


@dataclass(frozen=True, slots=True)
class TaskSubjects:
    """The subjects of one task queue under ``prefix`` (default ``tasks``):

    - ``<prefix>.<queue>.run``: the durable work queue (one message per task);
    - ``<prefix>.<queue>.status``: the workers' status messages, read by the managers;
    - ``<prefix>.<queue>.claim``: a worker's request, before it runs a task, to the manager
      that dispatched it: run it (not cancelled, not complete) or not.

    ``durable`` names the workers' durable subscription (their queue group).
    Raises ConfigError for a queue or prefix that is not 1-64 letters, digits, ``-``, ``_``."""

    queue: str
    prefix: str = "tasks"

    def __post_init__(self) -> None:
        for what, value in (("queue", self.queue), ("subject prefix", self.prefix)):
            if not isinstance(value, str) or NAME_OK.fullmatch(value) is None:
                raise ConfigError(f"task {what} must be 1-64 letters, digits, '-' or '_', got {value!r}")

    @property
    def run(self) -> str:
        return f"{self.prefix}.{self.queue}.run"

    @property
    def status(self) -> str:
        return f"{self.prefix}.{self.queue}.status"

    @property
    def claim(self) -> str:
        return f"{self.prefix}.{self.queue}.claim"

    @property
    def durable(self) -> str:
        return f"{self.prefix}-{self.queue}"


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """A task as it travels on the work queue: its id, the handler it names, its input."""

    id: str
    handler: str
    input: Any

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "handler": self.handler, "input": self.input}


class MalformedTask(MessageRejected):
    """A message on the work queue that is not a task: dead-lettered with reason ``malformed_task``."""

    reason = "malformed_task"


class UnknownTaskHandler(MessageRejected):
    """A task naming a handler this worker does not have: dead-lettered (``unknown_handler``)."""

    reason = "unknown_handler"


def parse_task(message: Any) -> TaskMessage:
    """The task in a work-queue message. Raises MalformedTask naming what is wrong: not a
    mapping, an ``id`` or ``handler`` missing or not a name, no ``input`` key, other keys."""
    if not isinstance(message, Mapping):
        raise MalformedTask(f"a task is a mapping, got {type(message).__name__}")
    extra = set(message) - {"id", "handler", "input"}
    if extra:
        raise MalformedTask(f"a task has unknown keys: {sorted(map(str, extra))[:5]}")
    task_id, handler = message.get("id"), message.get("handler")
    if not isinstance(task_id, str) or NAME_OK.fullmatch(task_id) is None:
        raise MalformedTask(f"a task id is 1-64 letters, digits, '-' or '_', got {str(task_id)[:80]!r}")
    if not isinstance(handler, str) or HANDLER_OK.fullmatch(handler) is None:
        raise MalformedTask(
            f"a handler name is 1-128 letters, digits, '.', '-' or '_', got {str(handler)[:80]!r}"
        )
    if "input" not in message:
        raise MalformedTask("a task has no input key")
    return TaskMessage(task_id, handler, message["input"])


@dataclass(frozen=True, slots=True)
class StatusMessage:
    """A worker's report on one task."""

    id: str
    state: TaskState
    attempt: int
    worker: str
    agent_id: str | None
    result: Any = None
    error: str | None = None

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "attempt": self.attempt,
            "worker": self.worker,
            "agent_id": self.agent_id,
            "result": self.result,
            "error": None if self.error is None else self.error[:MAX_ERROR],
        }


def parse_status(message: Any) -> StatusMessage:
    """The status in a status message. Raises MalformedTask for anything else (a manager
    dead-letters it: reason ``malformed_task``); ``pending`` is the manager's own state, never
    a worker's."""
    if not isinstance(message, Mapping):
        raise MalformedTask(f"a task status is a mapping, got {type(message).__name__}")
    task_id, state, attempt = message.get("id"), message.get("state"), message.get("attempt")
    worker, agent_id, error = message.get("worker"), message.get("agent_id"), message.get("error")
    if not isinstance(task_id, str) or NAME_OK.fullmatch(task_id) is None:
        raise MalformedTask(f"a task id is 1-64 letters, digits, '-' or '_', got {str(task_id)[:80]!r}")
    try:
        parsed = TaskState(state)
    except ValueError:
        raise MalformedTask(f"unknown task state {str(state)[:40]!r}") from None
    if parsed is TaskState.PENDING:
        raise MalformedTask("a worker never reports a task pending")
    if type(attempt) is not int or attempt < 1:
        raise MalformedTask(f"a status attempt is a positive integer, got {str(attempt)[:40]!r}")
    if not isinstance(worker, str) or not 0 < len(worker) <= 256:
        raise MalformedTask("a status names its worker")
    if agent_id is not None and (not isinstance(agent_id, str) or len(agent_id) > 256):
        raise MalformedTask("a status's agent_id is a string")
    if error is not None and not isinstance(error, str):
        raise MalformedTask("a status's error is a string")
    return StatusMessage(
        task_id,
        parsed,
        attempt,
        worker,
        agent_id,
        message.get("result"),
        None if error is None else error[:MAX_ERROR],
    )
