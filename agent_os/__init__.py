"""Agent OS: a governed message bus for AI agents.

The bus client is ``agent_os.modules.AMB`` (also importable as ``amb.AMB``). The control plane's
public names are re-exported here: ``from agent_os import KernelSpace, Policy, Pattern,
AgentSignal, SignalDispatcher, FlightRecorder``.
"""

from importlib.metadata import PackageNotFoundError, version

from control_plane import (
    AgentSignal,
    FlightRecorder,
    KernelSpace,
    Pattern,
    Policy,
    PolicyViolationError,
    SignalDispatcher,
)

try:
    __version__ = version("agent-os")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AgentSignal",
    "FlightRecorder",
    "KernelSpace",
    "Pattern",
    "Policy",
    "PolicyViolationError",
    "SignalDispatcher",
    "__version__",
]
