"""Prometheus metrics of background tasks, read at scrape time from the counters of task
managers and workers. Names and labels: ``docs/observability.md``. prometheus_client is
imported only when collected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent_os.control_plane.tasks.ledger import IGNORED_REASONS
from agent_os.control_plane.tasks.model import TaskState

if TYPE_CHECKING:
    from agent_os.control_plane.tasks.manager import TaskManager
    from agent_os.control_plane.tasks.worker import TaskWorker

_COMPLETE = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class TaskMetrics:
    """A prometheus_client collector over task managers and workers (register it in a
    ``CollectorRegistry``); series are labelled by queue."""

    def __init__(
        self, managers: list[TaskManager] | None = None, workers: list[TaskWorker] | None = None
    ) -> None:
        self.managers = list(managers or ())
        self.workers = list(workers or ())

    def collect(self) -> Iterator[Any]:
        """The metric families, read now. Raises ImportError without prometheus_client."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        dispatched = CounterMetricFamily(
            "agentos_tasks_dispatched", "Tasks a manager put on the work queue", labels=["queue"]
        )
        completed = CounterMetricFamily(
            "agentos_tasks_completed",
            "Tasks complete from the caller's view, by state",
            labels=["queue", "state"],
        )
        ignored = CounterMetricFamily(
            "agentos_tasks_ignored_statuses",
            "Worker statuses a manager ignored, by reason (duplicate, late, unknown, not_claimant)",
            labels=["queue", "reason"],
        )
        open_tasks = GaugeMetricFamily(
            "agentos_tasks_open", "Tasks dispatched and not complete, by state", labels=["queue", "state"]
        )
        for manager in self.managers:
            queue, ledger = manager.subjects.queue, manager.ledger
            dispatched.add_metric([queue], ledger.dispatched)
            for state in _COMPLETE:
                completed.add_metric([queue, state.value], ledger.completed.get((state.value,), 0))
            for reason in IGNORED_REASONS:
                ignored.add_metric([queue, reason], ledger.ignored.get((reason,), 0))
            for state in (TaskState.PENDING, TaskState.RUNNING):
                open_tasks.add_metric([queue, state.value], ledger.count(state))
        runs = CounterMetricFamily(
            "agentos_task_worker_runs", "Tasks a worker ran to an end, by state", labels=["queue", "state"]
        )
        rejected = CounterMetricFamily(
            "agentos_task_worker_rejected",
            "Work-queue messages a worker dead-lettered, by reason (malformed_task, unknown_handler)",
            labels=["queue", "reason"],
        )
        skipped = CounterMetricFamily(
            "agentos_task_worker_skipped",
            "Tasks a worker did not run: cancelled before they started",
            labels=["queue"],
        )
        for worker in self.workers:
            queue = worker.subjects.queue
            for state in _COMPLETE:
                runs.add_metric([queue, state.value], worker.runs.get((state.value,), 0))
            for reason in ("malformed_task", "unknown_handler"):
                rejected.add_metric([queue, reason], worker.rejected.get((reason,), 0))
            skipped.add_metric([queue], worker.skipped)
        yield from (dispatched, completed, ignored, open_tasks, runs, rejected, skipped)
