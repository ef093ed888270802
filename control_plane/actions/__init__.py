"""Actions: what an agent does to the world, through ``kernel.submit(ActionRequest)``.

``request`` (ActionRequest, ActionResult), ``provider`` (the Provider protocol, ActionRefused),
``registry`` (action name -> provider and permission), ``workspace`` (paths that cannot leave a
directory), ``fs`` (the ``fs.*`` providers) and ``snapshots`` (what reversible actions keep for
``kernel.rollback``). The gate that runs them is the kernel's
(``agent_os.control_plane.kernel.submit``). See ``docs/control-plane.md`` (Actions).
"""

from agent_os.control_plane.actions.fs import FileSystem
from agent_os.control_plane.actions.provider import ActionRefused, Provider
from agent_os.control_plane.actions.registry import ActionRegistry, ActionSpec
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.actions.snapshots import RollbackRefused, Snapshot, SnapshotError, SnapshotStore
from agent_os.control_plane.actions.workspace import Workspace

__all__ = [
    "ActionRefused",
    "ActionRegistry",
    "ActionRequest",
    "ActionResult",
    "ActionSpec",
    "FileSystem",
    "Provider",
    "RollbackRefused",
    "Snapshot",
    "SnapshotError",
    "SnapshotStore",
    "Workspace",
]
