"""Background tasks on the bus: :class:`TaskManager` dispatches tasks to a durable work queue
and follows them; :class:`TaskWorker` runs them as kernel agents. See ``docs/tasks.md``."""

from agent_os.control_plane.tasks.ledger import TaskLedger
from agent_os.control_plane.tasks.manager import TaskManager
from agent_os.control_plane.tasks.metrics import TaskMetrics
from agent_os.control_plane.tasks.model import TASK_EVENTS, TaskState, TaskStatus, TaskSubjects
from agent_os.control_plane.tasks.worker import TaskWorker

__all__ = [
    "TASK_EVENTS",
    "TaskLedger",
    "TaskManager",
    "TaskMetrics",
    "TaskState",
    "TaskStatus",
    "TaskSubjects",
    "TaskWorker",
]
