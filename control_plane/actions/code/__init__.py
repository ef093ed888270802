"""Code execution: agent-written Python whose tools are functions that call ``kernel.submit``.

``job`` (CodeLimits, CodeResult, the tools as script functions), ``provider`` (CodeRunner, the
``code.run`` action), the backends ``monty`` (pydantic-monty's interpreter) and ``cpython``
(a real interpreter in a bubblewrap sandbox, pooled) and ``runner`` (what runs inside that
sandbox). ``docs/code-execution.md`` explains them.
"""

from agent_os.control_plane.actions.code.cpython import CPythonBackend
from agent_os.control_plane.actions.code.job import CodeError, CodeLimits, CodeResult, ToolDenied, ToolFailed
from agent_os.control_plane.actions.code.monty import MontyBackend
from agent_os.control_plane.actions.code.provider import CodeRunner

__all__ = [
    "CPythonBackend",
    "CodeError",
    "CodeLimits",
    "CodeResult",
    "CodeRunner",
    "MontyBackend",
    "ToolDenied",
    "ToolFailed",
]
