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
"""

from agent_os.control_plane.actions.bus import BusActions
from agent_os.control_plane.actions.code import CodeError, CodeLimits, CodeResult, CodeRunner
from agent_os.control_plane.actions.fs import FileSystem
from agent_os.control_plane.actions.http import Http
from agent_os.control_plane.actions.llm import LLM
from agent_os.control_plane.actions.loop import (
    AgentLoop,
    AgentLoopResult,
    LLMError,
    TokenUsage,
    ToolCallRecord,
    run_agent_loop,
)
from agent_os.control_plane.actions.mcp import McpError, McpTools, mcp_tool_defs
from agent_os.control_plane.actions.proc import Process
from agent_os.control_plane.actions.provider import ActionFailed, ActionRefused, Provider
from agent_os.control_plane.actions.registry import ActionRegistry, ActionSpec
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.actions.snapshots import RollbackRefused, Snapshot, SnapshotError, SnapshotStore
from agent_os.control_plane.actions.sql import Sql
from agent_os.control_plane.actions.tools import BUILTIN_TOOLS, ToolArgumentError, ToolDef
from agent_os.control_plane.actions.workspace import Workspace

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
