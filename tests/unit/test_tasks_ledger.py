"""The task state machine and its dedupe (TaskLedger), and the checks on task and status
messages: pure logic, no bus."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent_os.amb.errors import ConfigError
from agent_os.control_plane import TaskNotFound, TaskState
from agent_os.control_plane.errors import TaskError
from agent_os.control_plane.tasks import TaskLedger, TaskSubjects
from agent_os.control_plane.tasks.model import (
    MalformedTask,
    StatusMessage,
    TaskStatus,
    parse_status,
    parse_task,
)


def report(state: TaskState, attempt: int = 1, worker: str = "w1", result: object = None) -> StatusMessage:
    return StatusMessage("t1", state, attempt, worker, f"agent-{worker}-{attempt}", result, None)


def apply(ledger: TaskLedger, status: StatusMessage) -> TaskStatus | None:
    """A status as sent on the bus by the worker it names."""
    return ledger.apply(status, status.worker)


def test_a_task_goes_pending_running_succeeded_once() -> None:
    ledger = TaskLedger()
    assert ledger.add("t1", "square").state is TaskState.PENDING
    assert ledger.claim("t1", "w1") is True
    running = apply(ledger, report(TaskState.RUNNING))
    assert running is not None
    assert (running.state, running.worker, running.attempt) == (TaskState.RUNNING, "w1", 1)
    assert apply(ledger, report(TaskState.RUNNING)) is None  # the same report again
    done = apply(ledger, report(TaskState.SUCCEEDED, result=4))
    assert done is not None
    assert (done.state, done.result, done.finished_at is not None) == (TaskState.SUCCEEDED, 4, True)
    assert ledger.completed == {("succeeded",): 1}
    assert ledger.claim("t1", "w2") is False  # complete: nobody runs it again


def test_a_redelivered_task_completes_once_and_late_results_are_counted() -> None:
    ledger = TaskLedger()
    ledger.add("t1", "square")
    ledger.claim("t1", "w1")
    apply(ledger, report(TaskState.RUNNING, 1, "w1"))
    ledger.claim("t1", "w2")  # w1 died; w2 got it again and claimed it: it takes the task over
    moved = apply(ledger, report(TaskState.RUNNING, 2, "w2"))
    assert moved is not None
    assert (moved.worker, moved.attempt) == ("w2", 2)
    assert apply(ledger, report(TaskState.SUCCEEDED, 2, "w2", result="first")) is not None
    assert apply(ledger, report(TaskState.FAILED, 1, "w1")) is None  # w1 was not dead after all
    assert apply(ledger, report(TaskState.SUCCEEDED, 2, "w2", result="again")) is None
    assert apply(ledger, report(TaskState.RUNNING, 2, "w2")) is None
    assert ledger.claim("t1", "w3") is False
    assert apply(ledger, report(TaskState.SUCCEEDED, 3, "w3", result="forged")) is None
    status = ledger.get("t1")
    assert (status.state, status.result, status.duplicates) == (TaskState.SUCCEEDED, "first", 1)
    assert ledger.completed == {("succeeded",): 1}
    assert ledger.ignored == {("duplicate",): 1, ("late",): 1, ("not_claimant",): 2}


def test_a_result_may_come_before_its_running_report() -> None:
    ledger = TaskLedger()
    ledger.add("t1", "square")
    ledger.claim("t1", "w1")
    assert apply(ledger, report(TaskState.FAILED, 1, "w1")) is not None
    assert apply(ledger, report(TaskState.RUNNING, 1, "w1")) is None
    assert ledger.get("t1").state is TaskState.FAILED


def test_cancel_wins_over_what_the_worker_reports_after_it() -> None:
    ledger = TaskLedger()
    ledger.add("t1", "sleep")
    ledger.claim("t1", "w1")
    apply(ledger, report(TaskState.RUNNING))
    cancelled = ledger.cancel("t1")
    assert cancelled is not None
    assert (cancelled.state, cancelled.error) == (TaskState.CANCELLED, "cancelled")
    assert ledger.cancel("t1") is None
    assert apply(ledger, report(TaskState.CANCELLED)) is None  # the worker's confirmation
    assert apply(ledger, report(TaskState.SUCCEEDED, result=1)) is None  # it finished meanwhile
    assert ledger.ignored == {("duplicate",): 1}
    assert ledger.completed == {("cancelled",): 1}
    assert ledger.claimant("t1") == "w1", "kept: its late running report names the agent to kill"


def test_only_the_claimant_s_statuses_count() -> None:
    ledger = TaskLedger()
    ledger.add("t1", "square")
    # before any claim, nobody's status counts: not even one naming a worker
    assert apply(ledger, report(TaskState.SUCCEEDED, result="forged")) is None
    ledger.claim("t1", "w1")
    assert ledger.apply(report(TaskState.SUCCEEDED, result="forged"), "impostor") is None
    assert ledger.apply(report(TaskState.SUCCEEDED, result="forged"), None) is None
    assert ledger.get("t1").state is TaskState.PENDING
    assert ledger.ignored == {("not_claimant",): 3}
    assert apply(ledger, report(TaskState.SUCCEEDED, result=9)) is not None
    assert ledger.get("t1").result == 9


def test_unknown_tasks_and_bounds() -> None:
    ledger = TaskLedger(keep_finished=2)
    assert ledger.apply(report(TaskState.RUNNING)) is None
    assert ledger.ignored == {("unknown",): 1}
    with pytest.raises(TaskNotFound):
        ledger.get("t1")
    with pytest.raises(TaskNotFound):
        ledger.cancel("t1")
    for n in range(3):
        ledger.add(f"d{n}", "square")
        ledger.cancel(f"d{n}")
    ledger.add("open", "square")
    assert [s.id for s in ledger] == ["d1", "d2", "open"]  # the oldest complete one forgotten
    with pytest.raises(TaskError):
        ledger.add("open", "square")
    ledger.discard("open")
    assert "open" not in ledger
    assert ledger.dispatched == 3
    with pytest.raises(TaskError):
        TaskLedger(keep_finished=0)


@pytest.mark.parametrize(
    "message",
    [
        "text",
        [],
        {"id": "t1", "handler": "square"},
        {"id": "t 1", "handler": "square", "input": 1},
        {"id": "x" * 65, "handler": "square", "input": 1},
        {"id": "t1", "handler": "a/b", "input": 1},
        {"id": "t1", "handler": 3, "input": 1},
        {"id": "t1", "handler": "square", "input": 1, "extra": 2},
    ],
)
def test_malformed_tasks_are_refused_with_their_reason(message: object) -> None:
    with pytest.raises(MalformedTask) as caught:
        parse_task(message)
    assert caught.value.reason == "malformed_task"


def test_a_task_and_a_status_read_back() -> None:
    task = parse_task({"id": "t-1_a", "handler": "reports.summarize", "input": {"a": [1]}})
    assert (task.id, task.handler, task.input) == ("t-1_a", "reports.summarize", {"a": [1]})
    wire = StatusMessage("t1", TaskState.FAILED, 2, "w", None, None, "e" * 5000).wire()
    status = parse_status(wire)
    assert (status.state, status.attempt, len(status.error or "")) == (TaskState.FAILED, 2, 2000)


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "pending"},
        {"state": "done"},
        {"attempt": 0},
        {"attempt": True},
        {"worker": ""},
        {"error": 3},
    ],
)
def test_malformed_statuses_are_refused(changes: dict[str, object]) -> None:
    wire = {**StatusMessage("t1", TaskState.RUNNING, 1, "w", "a").wire(), **changes}
    with pytest.raises(MalformedTask):
        parse_status(wire)


def test_subjects_of_a_queue() -> None:
    subjects = TaskSubjects("reports")
    assert (subjects.run, subjects.status, subjects.claim, subjects.durable) == (
        "tasks.reports.run",
        "tasks.reports.status",
        "tasks.reports.claim",
        "tasks-reports",
    )
    for bad in ("", "a.b", "a b", "x" * 65, ">"):
        with pytest.raises(ConfigError):
            TaskSubjects(bad)


def test_the_task_metrics_are_the_documented_ones() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from agent_os.amb.stats import LabelCounts
    from agent_os.control_plane.tasks import TaskMetrics

    ledger = TaskLedger()
    ledger.add("t1", "square")
    ledger.add("t2", "square")
    ledger.claim("t2", "w")
    ledger.apply(StatusMessage("t2", TaskState.SUCCEEDED, 1, "w", "a", 4), "w")
    # Stand-ins with the attributes the collector reads (a manager's and a worker's counters).
    manager = SimpleNamespace(subjects=TaskSubjects("q"), ledger=ledger)
    runs = LabelCounts(1)
    runs.add(("succeeded",), 3)
    worker = SimpleNamespace(subjects=TaskSubjects("q"), runs=runs, rejected=LabelCounts(1), skipped=2)
    registry = CollectorRegistry()
    registry.register(TaskMetrics([manager], [worker]))  # type: ignore[list-item]
    text = generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    page = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    section = page.split("### Background tasks", 1)[1].split("\n## ", 1)[0]
    assert names == set(re.findall(r"`(agentos_[a-z_]+)", section))
    assert 'agentos_tasks_completed_total{queue="q",state="succeeded"} 1.0' in text
    assert 'agentos_tasks_open{queue="q",state="pending"} 1.0' in text
    assert 'agentos_task_worker_runs_total{queue="q",state="succeeded"} 3.0' in text
    assert 'agentos_task_worker_skipped_total{queue="q"} 2.0' in text
