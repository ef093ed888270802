"""The manager's book of tasks: the state machine each task follows and the dedupe that makes
every task complete exactly once from the caller's view, however often workers report it.

Pure logic (no bus, no asyncio): :class:`~agent_os.control_plane.tasks.manager.TaskManager`
feeds it and acts on what it returns.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Final

from agent_os.amb.numbers import whole
from agent_os.amb.stats import LabelCounts
from agent_os.control_plane.errors import TaskError, TaskNotFound
from agent_os.control_plane.tasks.model import StatusMessage, TaskState, TaskStatus

_PENDING: Final = TaskState.PENDING
_RUNNING: Final = TaskState.RUNNING
_CANCELLED: Final = TaskState.CANCELLED

IGNORED_REASONS: Final = ("duplicate", "late", "unknown", "not_claimant")
"""Why a status was ignored: ``duplicate``, a second result of a complete task (a worker ran
it again after a redelivery, or finished it as it was cancelled); ``late``, a ``running``
report after the task was complete; ``unknown``, a status for a task this ledger does not
know (another manager's, or forgotten); ``not_claimant``, a status whose sender is not the
worker this manager told to run the task (an impostor, or a worker whose delivery of the task
was given to another)."""


class TaskLedger:
    """Tasks by id and their states.

    Transitions: ``pending -> running | succeeded | failed | cancelled``; ``running ->
    running`` (delivered again, to another worker or agent) ``| succeeded | failed |
    cancelled``. A complete task never changes again: whatever comes after is ignored and
    counted in :attr:`ignored` by reason (:data:`IGNORED_REASONS`), so each task completes
    exactly once. ``keep_finished``: how many complete tasks stay known (the oldest are
    forgotten first); pending and running ones are always kept. Raises TaskError for
    ``keep_finished < 1``.
    """

    def __init__(self, keep_finished: int = 10_000) -> None:
        whole(keep_finished, "keep_finished", error=TaskError)
        self.keep_finished = keep_finished
        self._tasks: dict[str, TaskStatus] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._claimants: dict[str, str] = {}  # task id -> the sender told to run it
        self.ignored = LabelCounts(1, len(IGNORED_REASONS))
        """Statuses ignored, by ``(reason,)``."""
        self.completed = LabelCounts(1, 3)
        """Tasks complete, by ``(state,)``: ``succeeded``, ``failed``, ``cancelled``."""
        self.dispatched = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[TaskStatus]:
        return iter(list(self._tasks.values()))

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def add(self, task_id: str, handler: str) -> TaskStatus:
        """A new pending task. Raises TaskError for an id already known."""
        if task_id in self._tasks:
            raise TaskError(f"task {task_id!r} exists already")
        status = TaskStatus(task_id, handler, _PENDING, dispatched_at=time.time())
        self._tasks[task_id] = status
        self.dispatched += 1
        return status

    def discard(self, task_id: str) -> None:
        """Forget a task whose dispatch failed (it never reached the queue)."""
        if self._tasks.pop(task_id, None) is not None:
            self.dispatched -= 1
        self._claimants.pop(task_id, None)

    def get(self, task_id: str) -> TaskStatus:
        """The task's status. Raises TaskNotFound."""
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFound(f"no task {str(task_id)[:80]!r}") from None

    def claim(self, task_id: str, sender: str) -> bool:
        """A worker (``sender``, as the bus established it) asks to run a known task: True,
        and ``sender`` becomes the only one whose statuses count for it, unless the task is
        complete (False). A later claim (the task delivered again) takes it over. Raises
        TaskNotFound."""
        if self.get(task_id).state.terminal:
            return False
        self._claimants[task_id] = sender
        return True

    def claimant(self, task_id: str) -> str | None:
        """The sender told last to run the task (kept while the task is known), None when
        nobody was."""
        return self._claimants.get(task_id)

    def apply(self, report: StatusMessage, sender: str | None = None) -> TaskStatus | None:
        """Take a worker's report sent by ``sender`` (as the bus established it); return the
        new status when it changes the task (to record and announce), None when it is ignored
        (and counted): among others, a report whose sender is not the task's claimant
        (:meth:`claim`) never changes it."""
        current = self._tasks.get(report.id)
        if current is None:
            self.ignored.add(("unknown",))
            return None
        if sender is None or self._claimants.get(report.id) != sender:
            self.ignored.add(("not_claimant",))
            return None
        if current.state.terminal:
            if report.state is _RUNNING:
                self.ignored.add(("late",))
            elif not (current.state is _CANCELLED and report.state is _CANCELLED):
                # (a worker confirming the cancel the manager made is not a second result)
                self.ignored.add(("duplicate",))
                self._tasks[report.id] = dataclasses.replace(current, duplicates=current.duplicates + 1)
            return None
        if (
            report.state is _RUNNING
            and current.state is _RUNNING
            and (report.worker, report.agent_id, report.attempt)
            == (current.worker, current.agent_id, current.attempt)
        ):
            return None  # the same report again: nothing changed
        changes: dict[str, Any] = {
            "state": report.state,
            "attempt": max(report.attempt, current.attempt),
            "worker": report.worker,
            "agent_id": report.agent_id,
        }
        if report.state.terminal:
            changes.update(result=report.result, error=report.error)
        return self._change(current, changes)

    def cancel(self, task_id: str, reason: str = "cancelled") -> TaskStatus | None:
        """Mark a pending or running task cancelled; the new status, or None when it was
        complete already. Raises TaskNotFound."""
        current = self.get(task_id)
        if current.state.terminal:
            return None
        return self._change(current, {"state": _CANCELLED, "error": reason})

    def _change(self, current: TaskStatus, changes: dict[str, Any]) -> TaskStatus:
        state: TaskState = changes["state"]
        if state.terminal:
            changes["finished_at"] = time.time()
        status = dataclasses.replace(current, **changes)
        self._tasks[status.id] = status
        if state.terminal:
            self.completed.add((state.value,))
            self._finished[status.id] = None
            while len(self._finished) > self.keep_finished:
                old, _ = self._finished.popitem(last=False)
                self._tasks.pop(old, None)
                self._claimants.pop(old, None)
        return status

    def count(self, state: TaskState) -> int:
        """How many known tasks are in ``state`` now."""
        return sum(1 for s in self._tasks.values() if s.state is state)
