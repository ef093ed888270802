"""What the mediation needs of the kernel: its gate, its recorder, its agents (KernelSpace has them)."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent_os.control_plane.policy.decision import Decision
    from agent_os.control_plane.process import AgentProcess
    from agent_os.control_plane.recorder import FlightRecorder


class MessageGate(Protocol):
    """The decisions on messages (the kernel's :class:`~agent_os.control_plane.kernel.gate.Gate`)."""

    def decide(
        self,
        operation: str,
        resource: str,
        context: Mapping[str, Any] | None = None,
        proc: AgentProcess | None = None,
    ) -> Decision: ...

    def cached_decision(
        self,
        operation: str,
        resource: str,
        proc: AgentProcess,
        sender: str | None,
        recipient: str | None,
        verified: bool,
        trust_level: float,
    ) -> Decision | None: ...

    def requires_verified_sender(self) -> bool: ...

    def note_record(
        self,
        proc: AgentProcess | None,
        agent_id: str,
        data: dict[str, Any],
        decision: Decision,
        signal_to: str | None = "",
        plain: bool = False,
    ) -> Awaitable[None] | None: ...


class MediatedKernel(Protocol):
    """What a Mediator needs of its kernel."""

    @property
    def gate(self) -> MessageGate: ...

    @property
    def recorder(self) -> FlightRecorder: ...

    @property
    def debug(self) -> bool: ...

    def external(self, agent_id: str) -> AgentProcess: ...
