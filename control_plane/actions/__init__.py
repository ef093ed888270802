"""Actions: what an agent does to the world, through ``kernel.submit(ActionRequest)``.

``request`` (ActionRequest, ActionResult), ``provider`` (the Provider protocol, ActionRefused),
``registry`` (action name -> provider, permission and operation), ``workspace`` (paths that
cannot leave a directory), the providers: ``fs`` (``fs.*``), ``http`` (``net.http``), ``sql``
(``sql.query``), ``proc`` (``proc.exec``), ``bus`` (``bus.*``), ``mcp`` (``mcp.call``), ``llm``
(``llm.ask``) and ``code`` (``code.run``: agent-written Python, tools as functions); ``snapshots`` (what
reversible actions keep for ``kernel.rollback``); ``tools`` (ToolDef: what an LLM may call) and
``loop`` (AgentLoop: an LLM acting through submit). The gate that runs them is the kernel's
(``agent_os.control_plane.kernel.submit``). See ``docs/control-plane.md`` (Actions) and
``docs/agents.md``.

The names load on first use, so that importing one module (``request``, or the sandboxed
agent's ``sandboxed_agent``) does not import every provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_os._lazy import lazy_exports

if TYPE_CHECKING:
    from agent_os.control_plane.actions.bus import (
        BusActions,
    )
    from agent_os.control_plane.actions.code import (
        CodeError,
        CodeLimits,
        CodeResult,
        CodeRunner,
    )
    from agent_os.control_plane.actions.fs import (
        FileSystem,
    )
    from agent_os.control_plane.actions.http import (
        Http,
    )
    from agent_os.control_plane.actions.llm import (
        LLM,
    )
    from agent_os.control_plane.actions.loop import (
        AgentLoop,
        AgentLoopResult,
        LLMError,
        TokenUsage,
        ToolCallRecord,
        run_agent_loop,
    )
    from agent_os.control_plane.actions.mcp import (
        McpError,
        McpTools,
        mcp_tool_defs,
    )
    from agent_os.control_plane.actions.proc import (
        Process,
    )
    from agent_os.control_plane.actions.provider import (
        ActionFailed,
        ActionRefused,
        Provider,
    )
    from agent_os.control_plane.actions.registry import (
        ActionRegistry,
        ActionSpec,
    )
    from agent_os.control_plane.actions.request import (
        ActionRequest,
        ActionResult,
    )
    from agent_os.control_plane.actions.snapshots import (
        RollbackRefused,
        Snapshot,
        SnapshotError,
        SnapshotStore,
    )
    from agent_os.control_plane.actions.sql import (
        Sql,
    )
    from agent_os.control_plane.actions.tools import (
        BUILTIN_TOOLS,
        ToolArgumentError,
        ToolDef,
    )
    from agent_os.control_plane.actions.workspace import (
        Workspace,
    )

# Public name -> the module that defines it (loaded on first access).
_LAZY: dict[str, str] = {
    "ActionFailed": "agent_os.control_plane.actions.provider",
    "CodeError": "agent_os.control_plane.actions.code",
    "CodeLimits": "agent_os.control_plane.actions.code",
    "CodeResult": "agent_os.control_plane.actions.code",
    "CodeRunner": "agent_os.control_plane.actions.code",
    "LLM": "agent_os.control_plane.actions.llm",
    "ActionRefused": "agent_os.control_plane.actions.provider",
    "ActionRegistry": "agent_os.control_plane.actions.registry",
    "ActionRequest": "agent_os.control_plane.actions.request",
    "ActionResult": "agent_os.control_plane.actions.request",
    "ActionSpec": "agent_os.control_plane.actions.registry",
    "AgentLoop": "agent_os.control_plane.actions.loop",
    "AgentLoopResult": "agent_os.control_plane.actions.loop",
    "BUILTIN_TOOLS": "agent_os.control_plane.actions.tools",
    "BusActions": "agent_os.control_plane.actions.bus",
    "FileSystem": "agent_os.control_plane.actions.fs",
    "Http": "agent_os.control_plane.actions.http",
    "LLMError": "agent_os.control_plane.actions.loop",
    "McpError": "agent_os.control_plane.actions.mcp",
    "McpTools": "agent_os.control_plane.actions.mcp",
    "Process": "agent_os.control_plane.actions.proc",
    "Provider": "agent_os.control_plane.actions.provider",
    "RollbackRefused": "agent_os.control_plane.actions.snapshots",
    "Snapshot": "agent_os.control_plane.actions.snapshots",
    "SnapshotError": "agent_os.control_plane.actions.snapshots",
    "SnapshotStore": "agent_os.control_plane.actions.snapshots",
    "Sql": "agent_os.control_plane.actions.sql",
    "TokenUsage": "agent_os.control_plane.actions.loop",
    "ToolArgumentError": "agent_os.control_plane.actions.tools",
    "ToolCallRecord": "agent_os.control_plane.actions.loop",
    "ToolDef": "agent_os.control_plane.actions.tools",
    "Workspace": "agent_os.control_plane.actions.workspace",
    "mcp_tool_defs": "agent_os.control_plane.actions.mcp",
    "run_agent_loop": "agent_os.control_plane.actions.loop",
}

__all__ = [
    "BUILTIN_TOOLS",
    "LLM",
    "ActionFailed",
    "ActionRefused",
    "ActionRegistry",
    "ActionRequest",
    "ActionResult",
    "ActionSpec",
    "AgentLoop",
    "AgentLoopResult",
    "BusActions",
    "CodeError",
    "CodeLimits",
    "CodeResult",
    "CodeRunner",
    "FileSystem",
    "Http",
    "LLMError",
    "McpError",
    "McpTools",
    "Process",
    "Provider",
    "RollbackRefused",
    "Snapshot",
    "SnapshotError",
    "SnapshotStore",
    "Sql",
    "TokenUsage",
    "ToolArgumentError",
    "ToolCallRecord",
    "ToolDef",
    "Workspace",
    "mcp_tool_defs",
    "run_agent_loop",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
