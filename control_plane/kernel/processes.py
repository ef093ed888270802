"""The process table: every agent a kernel knows, by id (its executions and its bus agents)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from agent_os.control_plane.errors import AgentNotFound
from agent_os.control_plane.process import AgentProcess, Life

if TYPE_CHECKING:
    from agent_os.control_plane.recorder import FlightRecorder


class ProcessTable:
    """The agents of one kernel (``kernel.processes``).

    ``hold_limit``: the bound of every agent's hold queue (the signal dispatcher's
    ``queue_size``); setting it applies to the agents already known too. ``recorder``: where
    the agents' ``save_state`` records go.
    """

    def __init__(self, recorder: FlightRecorder, hold_limit: int) -> None:
        self.recorder = recorder
        self._hold_limit = hold_limit
        self._procs: dict[str, AgentProcess] = {}

    @property
    def hold_limit(self) -> int:
        return self._hold_limit

    @hold_limit.setter
    def hold_limit(self, limit: int) -> None:
        self._hold_limit = limit
        for proc in self._procs.values():
            proc.hold_limit = limit

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._procs

    def __iter__(self) -> Iterator[AgentProcess]:
        return iter(list(self._procs.values()))

    def __len__(self) -> int:
        return len(self._procs)

    def get(self, agent_id: str) -> AgentProcess:
        """The agent's process. Raises AgentNotFound."""
        proc = self._procs.get(agent_id)
        if proc is None:
            raise AgentNotFound(f"no agent {agent_id!r}")
        return proc

    def find(self, agent_id: str | None) -> AgentProcess | None:
        """The agent's process, or None."""
        return self._procs.get(agent_id) if agent_id is not None else None

    def add(self, proc: AgentProcess) -> None:
        """Know ``proc`` by its id (its hold queue gets this table's ``hold_limit``)."""
        proc.hold_limit = self._hold_limit
        self._procs[proc.id] = proc

    def forget(self, agent_id: str) -> None:
        """Forget the agent (a finished execution); unknown ids are ignored."""
        self._procs.pop(agent_id, None)

    def external(self, agent_id: str) -> AgentProcess:
        """The process of a bus agent (one attached here, or one that lives elsewhere in
        mediated mode), created running on first use: signals sent to it here act on its
        messages passing this kernel."""
        proc = self._procs.get(agent_id)
        if proc is None:
            proc = AgentProcess(
                agent_id, agent_id, None, None, self._hold_limit, Life.RUNNING, recorder=self.recorder
            )
            self._procs[agent_id] = proc
        return proc
