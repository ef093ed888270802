"""An agent's run-time state in the kernel: what signals act on.

An :class:`AgentProcess` exists for each execution of a registered agent (``kernel.execute`` /
``kernel.spawn``, id: a UUID) and for each bus client attached to the kernel (id: the client's
``agent_id``). It owns

- the asyncio tasks doing the agent's work (its execution task, the handler tasks of its
  deliveries): SIGKILL cancels them;
- the hold queue: while the agent is stopped (SIGSTOP), each of its deliveries and publishes
  waits in this bounded FIFO; SIGCONT runs them in arrival order, SIGKILL fails them all with
  :class:`~control_plane.errors.AgentStoppedError` (deliveries are then dead-lettered);
- the bus clients attached for it: SIGKILL closes them, which ends their subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from control_plane.errors import AgentStoppedError, HoldQueueFull

if TYPE_CHECKING:
    from amb import AMB

State = Literal["running", "stopped", "terminated", "waiting"]


class Life(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    TERMINATED = "terminated"
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of one agent: the API reference's fields plus its lineage and permissions."""

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


@dataclass(eq=False)
class AgentProcess:
    """One agent as the kernel sees it (see the module docstring)."""

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
        if self.life in (Life.RUNNING, Life.WAITING):
            self.life = Life.STOPPED
            self._continue.clear()

    def cont(self) -> None:
        if self.life is Life.STOPPED:
            self.life = Life.RUNNING
            self._continue.set()
            self._start_release()

    def kill(self) -> list[asyncio.Task[Any]]:
        """Terminate now: fail held items, cancel tasks, close attached clients in the
        background. Returns the tasks it cancelled or started (for callers that await them)."""
        self.life = Life.TERMINATED
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
