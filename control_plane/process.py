"""An agent's run-time state in the kernel (:class:`AgentProcess`): what signals act on.

Its tasks, its hold queue, its attached bus clients, its published state and cleanup callbacks;
``docs/control-plane.md`` (Agents and their processes) explains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from agent_os.control_plane.errors import AgentStoppedError, HoldQueueFull, KernelError

if TYPE_CHECKING:
    from agent_os.amb import AMB
    from agent_os.control_plane.recorder import FlightRecorder

log = logging.getLogger("agent_os.control_plane.kernel")

State = Literal["running", "stopped", "terminated", "waiting"]


class Life(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    TERMINATED = "terminated"
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of one agent: the fields of the API reference (``docs/api-reference.md``)
    plus its lineage and permissions."""

    id: str
    name: str
    state: State
    started_at: datetime
    actions_count: int
    violations_count: int
    parent_id: str | None = None
    permissions: frozenset[str] | None = None


@dataclass(eq=False)
class _Held:
    run: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


Cleanup = Callable[[], Awaitable[Any] | Any]


@dataclass(eq=False)
class AgentProcess:
    """One agent as the kernel sees it (``kernel.get_agent(agent_id)``).

    ``data``: the agent's published state (its code writes it, ``get_state`` reads it);
    ``recorder``: where ``save_state`` records (the kernel's; None for a process no kernel
    created). ``on_signal``: called with the new life after each SIGSTOP, SIGCONT and kill
    that changed it (a sandboxed agent's supervisor passes them on to its OS processes); a
    callback that raises is logged, never stops the signal.
    """

    id: str
    name: str
    permissions: frozenset[str] | None = None
    parent_id: str | None = None
    hold_limit: int = 1000
    life: Life = Life.WAITING
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    actions_count: int = 0
    violations_count: int = 0
    masked: set[Any] = field(default_factory=set)
    restrictions: frozenset[str] = frozenset()
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    clients: list[AMB] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    recorder: FlightRecorder | None = None
    stops: int = 0  # SIGSTOPs received: a SIGCONT sent before the latest one does not continue
    on_signal: list[Callable[[Life], Any]] = field(default_factory=list)
    _cleanups: list[Cleanup] = field(default_factory=list)
    _continue: asyncio.Event = field(default_factory=asyncio.Event)
    _held: deque[_Held] = field(default_factory=deque)
    _releasing: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._continue.set()

    # -- state --------------------------------------------------------------------------------

    @property
    def killed(self) -> bool:
        return self.life is Life.TERMINATED

    @property
    def stopped(self) -> bool:
        return self.life is Life.STOPPED

    def status(self) -> AgentStatus:
        return AgentStatus(
            self.id,
            self.name,
            self.life.value,
            self.started_at,
            self.actions_count,
            self.violations_count,
            self.parent_id,
            self.permissions,
        )

    # -- the agent methods of the API reference (docs/api-reference.md) ----------------------

    async def get_state(self) -> dict[str, Any]:
        """The agent's state now: ``id``, ``name``, ``state`` (running, stopped, terminated,
        waiting), ``started_at`` (ISO 8601), ``actions_count``, ``violations_count``,
        ``parent_id``, ``permissions`` (sorted, or None: unrestricted), ``held`` (messages in
        its hold queue) and ``data`` (a shallow copy of :attr:`data`)."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.life.value,
            "started_at": self.started_at.isoformat(),
            "actions_count": self.actions_count,
            "violations_count": self.violations_count,
            "parent_id": self.parent_id,
            "permissions": None if self.permissions is None else sorted(self.permissions),
            "held": len(self._held),
            "data": dict(self.data),
        }

    async def save_state(self) -> dict[str, Any]:
        """Record :meth:`get_state` in the kernel's flight recorder, as one ``state_saved``
        record of this agent (``data.state``, ``data.name``; execution id: the agent's id),
        and return it. Raises KernelError for a process without a recorder, RecorderError
        when the recorder refuses the record."""
        if self.recorder is None:
            raise KernelError(f"agent {self.id} has no flight recorder to save its state in")
        state = await self.get_state()
        await self.recorder.log(
            "state_saved", self.id, {"name": self.name, "state": state}, execution_id=self.id
        )
        return state

    def add_cleanup(self, callback: Cleanup) -> None:
        """Have :meth:`cleanup` call ``callback()`` (awaited when it returns an awaitable):
        what the agent opened and must release when it shuts down gracefully."""
        self._cleanups.append(callback)

    async def cleanup(self) -> int:
        """Run the cleanup callbacks (most recent first) and drop them, so each runs once;
        return how many ran. The agent is not killed and keeps its tasks, hold queue and bus
        clients (docs/control-plane.md). A callback that raises does not stop the others:
        once all ran, an ExceptionGroup of the failures is raised."""
        callbacks, self._cleanups = self._cleanups[::-1], []
        failures: list[Exception] = []
        for callback in callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.warning("a cleanup callback of agent %s failed: %r", self.id, exc)
                failures.append(exc)
        if failures:
            raise ExceptionGroup(
                f"{len(failures)} of {len(callbacks)} cleanup callbacks of agent {self.id} failed", failures
            )
        return len(callbacks)

    # -- tasks ---------------------------------------------------------------------------------

    def track(self, task: asyncio.Task[Any]) -> None:
        """Count ``task`` as this agent's work: SIGKILL cancels it."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait_for_continue(self) -> None:
        """Return at once unless stopped; then wait for SIGCONT. Raises AgentStoppedError if
        the agent is (or gets) killed."""
        if self.killed:
            raise AgentStoppedError(f"agent {self.id} was killed")
        await self._continue.wait()
        if self.killed:
            raise AgentStoppedError(f"agent {self.id} was killed")

    # -- the hold queue -----------------------------------------------------------------------

    @property
    def held(self) -> int:
        return len(self._held)

    async def hold(self, run: Callable[[], Awaitable[Any]]) -> Any:
        """Queue ``run`` until SIGCONT (then it runs in FIFO order) and return its result.

        Raises HoldQueueFull when ``hold_limit`` items already wait, AgentStoppedError when the
        agent is killed before its turn.
        """
        return await self.enqueue(run)

    def enqueue(self, run: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """:meth:`hold` in two steps: take a place in the queue now (raises HoldQueueFull when
        ``hold_limit`` items already wait), and return the future of ``run``'s result (it
        fails with AgentStoppedError when the agent is killed before its turn)."""
        if len(self._held) >= self.hold_limit:
            raise HoldQueueFull(f"agent {self.id} is stopped and {self.hold_limit} messages already wait")
        item = _Held(run, asyncio.get_running_loop().create_future())
        self._held.append(item)
        if not self.stopped and self._releasing is None:  # continued between check and hold
            self._start_release()
        return item.future

    def _start_release(self) -> None:
        if self._held and (self._releasing is None or self._releasing.done()):
            self._releasing = asyncio.get_running_loop().create_task(self._release())

    async def _release(self) -> None:
        try:
            while self._held and not self.stopped and not self.killed:
                item = self._held.popleft()
                if item.future.done():  # its waiter gave up
                    continue
                try:
                    result = await item.run()
                except asyncio.CancelledError:
                    if not item.future.done():
                        item.future.set_exception(AgentStoppedError(f"agent {self.id} was killed"))
                    if self.killed:
                        continue
                    raise
                except BaseException as exc:
                    if not item.future.done():
                        item.future.set_exception(exc)
                else:
                    if not item.future.done():
                        item.future.set_result(result)
        finally:
            self._releasing = None

    # -- what signals do ----------------------------------------------------------------------

    def stop(self) -> None:
        self.stops += 1  # even when stopped already: it overrides a SIGCONT still on its way
        if self.life in (Life.RUNNING, Life.WAITING):
            self.life = Life.STOPPED
            self._continue.clear()
            self._tell(Life.STOPPED)

    def cont(self) -> None:
        if self.life is Life.STOPPED:
            self.life = Life.RUNNING
            self._continue.set()
            self._start_release()
            self._tell(Life.RUNNING)

    def _tell(self, life: Life) -> None:
        for callback in list(self.on_signal):
            try:
                callback(life)
            except Exception as exc:
                log.warning("a signal callback of agent %s failed: %r", self.id, exc)

    def kill(self) -> list[asyncio.Task[Any]]:
        """Terminate now: fail held items, cancel tasks, close attached clients in the
        background. Returns the tasks it cancelled or started (for callers that await them)."""
        was = self.life
        self.life = Life.TERMINATED
        if was is not Life.TERMINATED:
            self._tell(Life.TERMINATED)
        self._continue.set()  # wake waiters so they see the kill
        while self._held:
            item = self._held.popleft()
            if not item.future.done():
                item.future.set_exception(AgentStoppedError(f"agent {self.id} was killed"))
        current = asyncio.current_task()
        cancelled = []
        for task in list(self.tasks):
            if task is not current and not task.done():
                task.cancel()
                cancelled.append(task)
        if self._releasing is not None and self._releasing is not current:
            self._releasing.cancel()
        loop = asyncio.get_running_loop()
        # In the background: the kill may arrive through one of these clients' handlers.
        cancelled.extend(loop.create_task(client.close(timeout=0.0)) for client in self.clients)
        return cancelled

    def close_quietly(self) -> None:
        for item in self._held:
            if not item.future.done():
                item.future.cancel()
        self._held.clear()
        with contextlib.suppress(Exception):
            if self._releasing is not None:
                self._releasing.cancel()


RUNNING_AGENT: contextvars.ContextVar[AgentProcess | None] = contextvars.ContextVar("agent", default=None)
"""The process whose code runs in this context: set by the kernel for an execution and by the
mediator for a handler of an attached client; None elsewhere."""
