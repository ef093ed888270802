"""Actions: what an agent does to the world, through ``kernel.submit(ActionRequest)``.

``request`` (ActionRequest, ActionResult), ``provider`` (the Provider protocol, ActionRefused),
``registry`` (action name -> provider, permission and operation), ``workspace`` (paths that
cannot leave a directory), and the providers: ``fs`` (``fs.*``), ``http`` (``net.http``), ``sql``
(``sql.query``) and ``proc`` (``proc.exec``). The gate that runs them is the kernel's
(``agent_os.control_plane.kernel.submit``). See ``docs/control-plane.md`` (Actions).
"""

from agent_os.control_plane.actions.fs import FileSystem
from agent_os.control_plane.actions.http import Http
from agent_os.control_plane.actions.proc import Process
from agent_os.control_plane.actions.provider import ActionRefused, Provider
from agent_os.control_plane.actions.registry import ActionRegistry, ActionSpec
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.actions.sql import Sql
from agent_os.control_plane.actions.workspace import Workspace

__all__ = [
    "ActionRefused",
    "ActionRegistry",
    "ActionRequest",
    "ActionResult",
    "ActionSpec",
    "FileSystem",
    "Http",
    "Process",
    "Provider",
    "Sql",
    "Workspace",
]
