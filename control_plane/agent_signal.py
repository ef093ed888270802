"""AgentSignal: the POSIX-style signals an agent can be sent, shared by policies and the kernel.

What each signal does is in ``docs/control-plane.md`` (Signals); the kernel's
:class:`~agent_os.control_plane.kernel.signals.SignalDispatcher` delivers them.
"""

from __future__ import annotations

import enum

from agent_os.control_plane.errors import SignalError


class AgentSignal(enum.Enum):
    """The signals of the API reference (``docs/api-reference.md``), with their POSIX numbers."""

    SIGKILL = 9
    SIGSTOP = 19
    SIGCONT = 18
    SIGTERM = 15
    SIGUSR1 = 10
    SIGUSR2 = 12
    SIGALRM = 14

    @property
    def catchable(self) -> bool:
        """False for SIGKILL and SIGSTOP: they cannot be handled or masked."""
        return self not in (AgentSignal.SIGKILL, AgentSignal.SIGSTOP)

    @classmethod
    def parse(cls, value: AgentSignal | str | int) -> AgentSignal:
        """``"SIGKILL"``, ``"kill"``, ``9`` or the member itself. Raises SignalError otherwise."""
        if isinstance(value, AgentSignal):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            name = value.upper()
            name = name if name.startswith("SIG") else "SIG" + name
            if name in cls.__members__:
                return cls[name]
        raise SignalError(f"unknown signal {value!r}")
