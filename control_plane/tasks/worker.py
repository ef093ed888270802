"""TaskWorker: the side that runs background tasks. It takes tasks from the durable work queue
of a queue as a member of its queue group, runs each as a kernel agent (governed, recorded,
signalable from other processes while it runs), and reports each task's status on the bus.

Semantics (at-least-once execution, exactly-once completion): ``docs/tasks.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agent_os.amb.errors import BusError, ConfigError, RequestTimeout, UnserializablePayload
from agent_os.amb.numbers import seconds, whole
from agent_os.amb.stats import LabelCounts
from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import AgentStoppedError, AgentTimeoutError
from agent_os.control_plane.tasks.manager import established_sender, require_task_broker
from agent_os.control_plane.tasks.model import (
    HANDLER_OK,
    MalformedTask,
    StatusMessage,
    TaskMessage,
    TaskState,
    TaskSubjects,
    UnknownTaskHandler,
    parse_task,
)

if TYPE_CHECKING:
    from agent_os.amb import AMB, Metadata, Subscription
    from agent_os.control_plane.kernel.space import KernelSpace

log = logging.getLogger(__name__)


class TaskWorker:
    """Runs the tasks of one queue (``docs/tasks.md``)::

        kernel = KernelSpace(policy=my_policy)

        @kernel.register(name="summarize", permissions=["read"])
        async def summarize(task_input: dict) -> dict: ...

        async with TaskWorker(kernel, client, {"summarize": summarize}, queue="reports"):
            await stop_event.wait()

    Args:
        kernel: the kernel each task runs under, as an agent spawned by this worker's agent.
        client: the bus client; attached to ``kernel`` here unless it is already.
        handlers: task handler name -> async agent function taking the task's input; each is
            registered with ``kernel`` (``kernel.govern``) unless it is already.
        queue, subject_prefix: which queue (as for the TaskManager).
        concurrency: tasks this worker runs at once.
        max_attempts: deliveries of a task whose status cannot be published before it is
            dead-lettered (a handler's own exception is the task's failure, not retried).
        heartbeat: seconds between "still running" notices to the broker for each running
            task (NATS: resets the message's ``ack_wait``; keep it well below ``ack_wait``).
        claim_timeout: how long to wait for the manager's answer before running a task (the
            task runs when no manager answers: nobody is left to cancel it).
        worker_id: the name in this worker's status messages (default: the client's agent id).

    Raises ConfigError for a broker that cannot carry a durable work queue, a bad queue name or
    handler name, concurrency or max_attempts < 1, heartbeat or claim_timeout <= 0.
    """

    def __init__(
        self,
        kernel: KernelSpace,
        client: AMB,
        handlers: Mapping[str, Callable[..., Awaitable[Any]]],
        *,
        queue: str = "default",
        subject_prefix: str = "tasks",
        concurrency: int = 8,
        max_attempts: int = 3,
        heartbeat: float = 10.0,
        claim_timeout: float = 2.0,
        worker_id: str | None = None,
    ) -> None:
        require_task_broker(client)
        self.subjects = TaskSubjects(queue, subject_prefix)
        whole(concurrency, "concurrency")
        whole(max_attempts, "max_attempts")
        seconds(heartbeat, "heartbeat")
        seconds(claim_timeout, "claim_timeout")
        for name in handlers:
            if not isinstance(name, str) or HANDLER_OK.fullmatch(name) is None:
                raise ConfigError(f"a handler name is 1-128 letters, digits, '.', '-' or '_': {name!r}")
        self.kernel = kernel
        self.client = client
        self.handlers = {name: kernel.govern(fn, name=name) for name, fn in handlers.items()}
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.heartbeat = heartbeat
        self.claim_timeout = claim_timeout
        self.worker_id = worker_id or client.agent_id
        if client not in kernel.bus.clients:
            kernel.attach(client)
        self.runs = LabelCounts(1, 3)
        """Tasks this worker ran to an end, by ``(state,)``: succeeded, failed, cancelled."""
        self.rejected = LabelCounts(1, 2)
        """Work-queue messages dead-lettered, by ``(reason,)``: malformed_task, unknown_handler."""
        self.skipped = 0
        """Tasks not run: their manager said no (cancelled before they started, or complete)."""
        self.unclaimed = 0
        """Tasks run without an answer to their claim (no manager answered in time)."""
        self._running: dict[str, str] = {}  # task id -> the agent running it
        self._subs: list[Subscription] = []

    @property
    def running(self) -> dict[str, str]:
        """The tasks running now: task id -> agent id."""
        return dict(self._running)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and join the queue group of the work queue. Idempotent."""
        if self._subs:
            return
        client = self.client
        self._subs.append(
            await client.subscribe(
                self.subjects.run,
                self._on_task,
                queue=self.subjects.durable,
                durable=self.subjects.durable,
                concurrency=self.concurrency,
                max_attempts=self.max_attempts,
            )
        )

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking tasks; tasks running get ``timeout`` seconds to end, then are given
        back to the broker unfinished (another worker runs them). The client stays open."""
        subs, self._subs = self._subs, []
        for sub in reversed(subs):
            with contextlib.suppress(BusError):
                await sub.drain(timeout)

    async def __aenter__(self) -> TaskWorker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- tasks ------------------------------------------------------------------------------------

    async def _on_task(self, message: Any, metadata: Metadata) -> None:
        try:
            task = parse_task(message)
        except Exception:
            self.rejected.add(("malformed_task",))
            raise  # dead-lettered with the reason
        dispatcher = established_sender(metadata)
        if dispatcher is None:
            self.rejected.add(("malformed_task",))
            raise MalformedTask("a task without an established sender: nobody to claim it from")
        agent = self.handlers.get(task.handler)
        if not await self._claim(task, dispatcher):
            self.skipped += 1
            return  # cancelled, or complete already: settled without running
        if agent is None:
            self.rejected.add(("unknown_handler",))
            error = f"no handler {task.handler!r} on worker {self.worker_id}"
            await self._report(task, TaskState.FAILED, metadata.attempt, None, error=error)
            raise UnknownTaskHandler(error)
        await self._run(task, agent, metadata)

    async def _claim(self, task: TaskMessage, dispatcher: str) -> bool:
        """Ask the manager that dispatched ``task`` (``dispatcher``, the task message's sender)
        whether to run it; only that manager's answer counts (an answer from anyone else is
        dropped by the bus client). True also when it does not answer within
        ``claim_timeout`` (nobody is left to cancel it)."""
        try:
            answer = await self.client.request(
                self.subjects.claim, {"id": task.id}, timeout=self.claim_timeout, recipient=dispatcher
            )
        except RequestTimeout:
            self.unclaimed += 1
            return True
        return not (isinstance(answer, dict) and answer.get("run") is False)

    async def _run(self, task: TaskMessage, agent: Callable[..., Awaitable[Any]], metadata: Metadata) -> None:
        kernel = self.kernel
        agent_id = await kernel.spawn(agent, task.input)
        control: Subscription | None = None
        beat = asyncio.get_running_loop().create_task(self._heartbeat(metadata))
        self._running[task.id] = agent_id
        try:
            control = await kernel.bus.expose(agent_id)  # signalable before anyone learns its id
            await self._report(task, TaskState.RUNNING, metadata.attempt, agent_id)
            state, result, error = await self._outcome(task, agent_id)
        except BaseException:
            # The status could not be sent, or this worker is closing: the task goes back to the
            # broker unfinished, and its agent must not run on unobserved.
            if not kernel.get_agent(agent_id).killed:
                await kernel.send_signal(agent_id, AgentSignal.SIGKILL)
            raise
        finally:
            beat.cancel()
            self._running.pop(task.id, None)
            if control is not None:
                with contextlib.suppress(BusError):
                    await control.unsubscribe()
        try:
            await self._report(task, state, metadata.attempt, agent_id, result, error)
        except UnserializablePayload as exc:
            state = TaskState.FAILED
            await self._report(task, state, metadata.attempt, agent_id, error=f"result cannot be sent: {exc}")
        self.runs.add((state.value,))

    async def _outcome(self, task: TaskMessage, agent_id: str) -> tuple[TaskState, Any, str | None]:
        """The end of the task's agent: its state, result and error."""
        try:
            result = (await self.kernel.wait_all([agent_id]))[0]
        except AgentTimeoutError as exc:
            return TaskState.FAILED, None, f"timeout: {exc}"
        except AgentStoppedError:
            return TaskState.CANCELLED, None, "killed (SIGKILL)"
        except Exception as exc:
            return TaskState.FAILED, None, f"{type(exc).__name__}: {exc}"
        return TaskState.SUCCEEDED, result, None

    async def _heartbeat(self, metadata: Metadata) -> None:
        touch = metadata.extra.get("in_progress")
        if touch is None:
            return
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await touch()
            except BusError as exc:  # the ack may fail too; redelivery is then the broker's
                log.debug("task heartbeat failed: %r", exc)

    async def _report(
        self,
        task: TaskMessage,
        state: TaskState,
        attempt: int,
        agent_id: str | None,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        status = StatusMessage(task.id, state, attempt, self.worker_id, agent_id, result, error)
        await self.client.publish(self.subjects.status, status.wire())
