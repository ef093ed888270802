"""What does an action's work: the :class:`Provider` protocol, and :class:`ActionRefused`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent_os.control_plane.errors import ControlPlaneError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.request import ActionRequest


class ActionRefused(ControlPlaneError, ValueError):
    """A provider refuses a request before any decision: its target or params cannot be
    acted on safely (a path leaving the workspace, a malformed URL ...). ``kernel.submit``
    records it as a denial."""


@runtime_checkable
class Provider(Protocol):
    """Does the work of one or more actions.

    ``resource(request)``: the resource the policy judges (a normalized path, a URL ...);
    raises ActionRefused when the request cannot be acted on. ``run(request)``: does the
    action and returns its output; what it raises becomes the result's ``error``. ``run`` is
    only called after ``resource`` returned and the kernel allowed the action."""

    def resource(self, request: ActionRequest) -> str: ...

    async def run(self, request: ActionRequest) -> Any: ...
