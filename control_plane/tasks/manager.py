"""TaskManager: the caller's side of background tasks. It dispatches tasks to the durable work
queue of a queue on the bus, follows the workers' status messages, records each state change
in the kernel's flight recorder, and cancels tasks (a running one by SIGKILL of its agent).

Semantics (at-least-once execution, exactly-once completion): ``docs/tasks.md``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agent_os.amb.broker import DurableCapture
from agent_os.amb.errors import ConfigError, UnserializablePayload
from agent_os.amb.numbers import seconds
from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import TaskError, TaskInputError, TaskTimeout, UnknownHandler
from agent_os.control_plane.mediation.identity import message_sender
from agent_os.control_plane.tasks.ledger import TaskLedger
from agent_os.control_plane.tasks.model import (
    HANDLER_OK,
    TaskMessage,
    TaskState,
    TaskStatus,
    TaskSubjects,
    event_type,
    parse_status,
)

if TYPE_CHECKING:
    from agent_os.amb import AMB, Metadata, Subscription
    from agent_os.control_plane.kernel.space import KernelSpace


def established_sender(metadata: Metadata) -> str | None:
    """The sender of a task message as the bus establishes it: the IATP-verified signer when
    the bus carries IATP (None for a signature that is not valid), else the sender the
    envelope claims (on a bus without IATP, identities are claims: ``docs/tasks.md``)."""
    sender, _, _, refusal = message_sender(metadata, True)
    return None if refusal is not None else sender


def require_task_broker(client: AMB) -> None:
    """Raise ConfigError unless ``client``'s broker can carry a work queue without losing tasks:
    durable subscriptions, queue groups, redelivery, and keeping messages for workers yet to
    subscribe (:class:`~agent_os.amb.broker.DurableCapture`)."""
    caps = client.capabilities
    missing = [name for name in ("durable", "queue_groups", "redelivery") if not getattr(caps, name)]
    if not isinstance(client.broker, DurableCapture):
        missing.append("capture")
    if missing:
        raise ConfigError(
            f"background tasks need a broker with {', '.join(missing)} (NATS with JetStream has "
            f"them); the {client.broker.name!r} broker would lose tasks"
        )


class TaskManager:
    """Dispatches background tasks and follows them (``docs/tasks.md``)::

        async with TaskManager(kernel, client, queue="reports") as tasks:
            task_id = await tasks.dispatch("summarize", {"path": "q3.csv"})
            status = await tasks.wait(task_id, timeout=60)   # TaskStatus, state succeeded
            print(status.result)

    Args:
        kernel: the kernel whose flight recorder gets one record per state change and whose
            signals cancel running tasks (SIGKILL of the task's agent, over the bus).
        client: the bus client; attached to ``kernel`` here unless it is already (attach
            before it connects).
        queue: the task queue's name (1-64 letters, digits, ``-``, ``_``); workers of the same
            queue and ``subject_prefix`` run its tasks.
        subject_prefix: the first token of the queue's subjects (default ``tasks``).
        handlers: the handler names the workers have; given, ``dispatch`` refuses others at
            once (UnknownHandler), else a worker fails the task.
        keep_finished: complete tasks that stay known for ``status``/``wait``/``list``.

    Raises ConfigError for a broker that cannot carry a durable work queue (no durable
    subscriptions, queue groups, redelivery or capture: the in-memory broker), or a bad queue
    name; agent_os.amb.StateError when ``client`` must be attached but is connected already.
    """

    def __init__(
        self,
        kernel: KernelSpace,
        client: AMB,
        *,
        queue: str = "default",
        subject_prefix: str = "tasks",
        handlers: Iterable[str] | None = None,
        keep_finished: int = 10_000,
    ) -> None:
        require_task_broker(client)
        self.subjects = TaskSubjects(queue, subject_prefix)
        self.kernel = kernel
        self.client = client
        self.handlers = None if handlers is None else frozenset(handlers)
        self.ledger = TaskLedger(keep_finished)
        self.malformed = 0
        """Status messages that were not statuses (dead-lettered, reason ``malformed_task``)."""
        self.refused_claims = 0
        """Claims answered "do not run": the task was cancelled, or complete already."""
        if client not in kernel.bus.clients:
            kernel.attach(client)
        self._done: dict[str, asyncio.Event] = {}
        self._sub: Subscription | None = None
        self._claims: Subscription | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the client, make the work queue keep tasks for the workers' durable
        subscription even before a worker binds it, follow the status subject and answer
        claims. Idempotent."""
        if self._sub is not None:
            return
        await self.client.connect()
        broker = self.client.broker
        assert isinstance(broker, DurableCapture)  # checked when made
        await broker.capture(self.subjects.run, self.subjects.durable)
        self._claims = await self.client.subscribe(self.subjects.claim, self._on_claim)
        self._sub = await self.client.subscribe(self.subjects.status, self._on_status)

    async def close(self) -> None:
        """Stop following statuses and answering claims (the client stays open: it is the
        caller's). Waiters of tasks not complete keep waiting until their timeout."""
        subs, self._sub, self._claims = (self._sub, self._claims), None, None
        for sub in subs:
            if sub is not None:
                await sub.unsubscribe()

    async def __aenter__(self) -> TaskManager:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the API ----------------------------------------------------------------------------------

    async def dispatch(self, handler: str, input: Any = None) -> str:
        """Put a task on the work queue: ``handler`` (a handler name the workers registered)
        runs with ``input`` (any value the client's serializer takes: msgpack or JSON values).
        Returns the task id (pending; one ``task_dispatched`` record). Once this returns, the
        broker has taken charge of the task (see ``docs/bus.md``, durable publishing).

        Raises UnknownHandler for a name that is not a handler name, or not among
        ``handlers`` when given; TaskInputError for an input the bus cannot serialize;
        agent_os.amb.BusError when the broker fails (the task is then not dispatched)."""
        if not isinstance(handler, str) or HANDLER_OK.fullmatch(handler) is None:
            raise UnknownHandler(
                f"a handler name is 1-128 letters, digits, '.', '-' or '_': {str(handler)[:80]!r}"
            )
        if self.handlers is not None and handler not in self.handlers:
            raise UnknownHandler(f"no handler {handler!r}: the workers have {sorted(self.handlers)[:20]}")
        await self.start()
        task_id = uuid.uuid4().hex
        status = self.ledger.add(task_id, handler)
        try:
            await self.client.publish(self.subjects.run, TaskMessage(task_id, handler, input).wire())
        except UnserializablePayload as exc:
            self.ledger.discard(task_id)
            raise TaskInputError(f"the input of a {handler!r} task cannot be sent: {exc}") from None
        except BaseException:
            self.ledger.discard(task_id)
            raise
        await self._record(status)
        return task_id

    def status(self, task_id: str) -> TaskStatus:
        """The task's status now. Raises TaskNotFound (never dispatched here, or forgotten)."""
        return self.ledger.get(task_id)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        """Wait until the task is complete (succeeded, failed or cancelled) and return its
        status; the result is ``status.result``, a failure's reason ``status.error``.

        Raises TaskNotFound, TaskTimeout after ``timeout`` seconds (the task goes on), TaskError
        for a ``timeout`` that is not a positive, finite number of seconds."""
        if timeout is not None:
            timeout = seconds(timeout, "timeout", error=TaskError)
        status = self.ledger.get(task_id)
        if status.state.terminal:
            return status
        event = self._done.get(task_id)
        if event is None:
            event = self._done[task_id] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            raise TaskTimeout(
                f"task {task_id} is still {self.ledger.get(task_id).state.value} after {timeout:g}s"
            ) from None
        return self.ledger.get(task_id)

    def list(self, state: TaskState | None = None) -> list[TaskStatus]:
        """The tasks this manager knows (all, or those in ``state``), oldest first."""
        return [s for s in self.ledger if state is None or s.state is state]

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task: a pending one never runs (a worker claims each task from this
        manager before it runs it, and is told no); a running one's agent is sent SIGKILL
        through the kernel (over the bus to the worker's kernel), which ends its handler, and
        its message is settled, not delivered again. The status becomes ``cancelled`` (one
        ``task_cancelled`` record, with ``killed``: the signal's outcome). Returns False when
        the task was complete already. Raises TaskNotFound."""
        status = self.ledger.get(task_id)
        changed = self.ledger.cancel(task_id)  # first: what the worker reports now is too late
        if changed is None:
            return False
        killed: bool | None = None
        if status.state is TaskState.RUNNING and status.agent_id is not None:
            killed = await self.kernel.send_signal(status.agent_id, AgentSignal.SIGKILL)
        await self._record(changed, killed=killed)
        self._announce(changed)
        return True

    # -- statuses ---------------------------------------------------------------------------------

    async def _on_status(self, message: Any, metadata: Metadata) -> None:
        try:
            report = parse_status(message)
        except Exception:
            self.malformed += 1
            raise  # dead-lettered by the bus with its reason
        changed = self.ledger.apply(report, established_sender(metadata))
        if changed is None:
            if (
                report.state is TaskState.RUNNING
                and report.agent_id is not None
                and self._cancelled(report.id)
                and self._from_claimant(report.id, metadata)
            ):
                # Claimed just before the cancel: it must not run on.
                await self.kernel.send_signal(report.agent_id, AgentSignal.SIGKILL)
            return
        await self._record(changed)
        self._announce(changed)

    def _cancelled(self, task_id: str) -> bool:
        return task_id in self.ledger and self.ledger.get(task_id).state is TaskState.CANCELLED

    def _from_claimant(self, task_id: str, metadata: Metadata) -> bool:
        # Only the worker told to run the task names the agent to kill: never anyone on the bus.
        claimant = self.ledger.claimant(task_id)
        return claimant is not None and claimant == established_sender(metadata)

    async def _on_claim(self, message: Any, metadata: Metadata) -> None:
        task_id = message.get("id") if isinstance(message, dict) else None
        if not isinstance(task_id, str) or task_id not in self.ledger:
            return  # another manager's task (or nobody's): that manager answers
        sender = established_sender(metadata)
        run = sender is not None and self.ledger.claim(task_id, sender)
        if not run:
            self.refused_claims += 1
        await self.client.reply(metadata, {"run": run})

    def _announce(self, status: TaskStatus) -> None:
        if status.state.terminal:
            event = self._done.pop(status.id, None)
            if event is not None:
                event.set()

    async def _record(self, status: TaskStatus, **extra: Any) -> None:
        data: dict[str, Any] = {
            "task_id": status.id,
            "handler": status.handler,
            "state": status.state.value,
            "queue": self.subjects.queue,
            "attempt": status.attempt,
            "worker": status.worker,
            "agent_id": status.agent_id,
            **extra,
        }
        if status.state is TaskState.FAILED or status.state is TaskState.CANCELLED:
            data["error"] = status.error
        severity = "warning" if status.state is TaskState.FAILED else "info"
        await self.kernel.recorder.log(event_type(status.state), self.client.agent_id, data, severity)
