"""Agent OS: governed, signed, recorded messaging and actions for fleets of AI agents.

Every part lives under this one import root (``agent_os.amb``, ``agent_os.iatp``,
``agent_os.emk``, ``agent_os.cmvk``, ``agent_os.bus_adapters``, ``agent_os.control_plane``,
``agent_os.services``). The control plane's public names are re-exported here and the kernel
modules in :mod:`agent_os.modules`; both load on first use, so ``import agent_os.amb`` loads
the bus and nothing above it. See ``docs/`` for the guide to each part.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from agent_os._lazy import lazy_exports

if TYPE_CHECKING:
    from agent_os.control_plane import (
        ActionRequest,
        ActionResult,
        AgentLoop,
        AgentLoopResult,
        AgentSignal,
        FlightRecorder,
        KernelSpace,
        Pattern,
        Policy,
        PolicyViolationError,
        RateLimitExceeded,
        SignalDispatcher,
        TaskManager,
        ToolDef,
        run_agent_loop,
    )

try:
    __version__ = version("agent-os")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+unknown"

# Public name -> the module that defines it (loaded on first access).
_LAZY: dict[str, str] = {
    "ActionRequest": "agent_os.control_plane",
    "ActionResult": "agent_os.control_plane",
    "AgentLoop": "agent_os.control_plane",
    "AgentLoopResult": "agent_os.control_plane",
    "AgentSignal": "agent_os.control_plane",
    "FlightRecorder": "agent_os.control_plane",
    "KernelSpace": "agent_os.control_plane",
    "Pattern": "agent_os.control_plane",
    "Policy": "agent_os.control_plane",
    "PolicyViolationError": "agent_os.control_plane",
    "RateLimitExceeded": "agent_os.control_plane",
    "SignalDispatcher": "agent_os.control_plane",
    "TaskManager": "agent_os.control_plane",
    "ToolDef": "agent_os.control_plane",
    "run_agent_loop": "agent_os.control_plane",
}

__all__ = [
    "ActionRequest",
    "ActionResult",
    "AgentLoop",
    "AgentLoopResult",
    "AgentSignal",
    "FlightRecorder",
    "KernelSpace",
    "Pattern",
    "Policy",
    "PolicyViolationError",
    "RateLimitExceeded",
    "SignalDispatcher",
    "TaskManager",
    "ToolDef",
    "__version__",
    "run_agent_loop",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
