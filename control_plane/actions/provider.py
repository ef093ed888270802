"""What does an action's work: the :class:`Provider` protocol, :class:`ActionRefused` and
:class:`ActionFailed`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from agent_os.control_plane.errors import ControlPlaneError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.request import ActionRequest


class ActionRefused(ControlPlaneError, ValueError):
    """A provider refuses a request before any decision: its target or params cannot be
    acted on safely (a path leaving the workspace, a malformed URL ...). ``kernel.submit``
    records it as a denial."""


class ActionFailed(ControlPlaneError):
    """A provider's failure that still has output to give back (``code.run``: what the code
    printed and which tools it called before it failed). ``kernel.submit`` records it like any
    failure (its message is the result's ``error``) and returns ``output`` as the result's
    output instead of None."""

    def __init__(self, message: str, output: Any) -> None:
        super().__init__(message)
        self.output = output


@runtime_checkable
class Provider(Protocol):
    """Does the work of one or more actions.

    ``resource(request)``: the resource the policy judges (a normalized path, a URL ...);
    raises ActionRefused when the request cannot be acted on. ``run(request)``: does the
    action and returns its output; what it raises becomes the result's ``error``. ``run`` is
    only called after ``resource`` returned and the kernel allowed the action.

    Two optional methods, looked up on the object for each request (not part of the
    protocol's check):
    ``permission(request) -> str``, the permission this request needs when it depends on the
    request (``sql.query``: ``read`` for a query that only reads, else ``write``), and
    ``context(request) -> Mapping``, extra fields for the policy's context (the kernel's own
    fields win over them). Both are called before the decision and may raise ActionRefused."""

    def resource(self, request: ActionRequest) -> str: ...

    async def run(self, request: ActionRequest) -> Any: ...


def request_permission(provider: Provider, request: ActionRequest, default: str) -> str:
    """The permission ``request`` needs: the provider's optional ``permission(request)``, or
    ``default`` (the registered one). Raises ActionRefused (or what the method raises) when
    the provider cannot tell; a value that is not a non-empty string is refused."""
    method = getattr(provider, "permission", None)
    if not callable(method):
        return default
    permission = method(request)
    if not isinstance(permission, str) or not permission:
        raise ActionRefused(f"the provider gave no permission for this request ({permission!r})")
    return permission


NO_FIELDS: Final[Mapping[str, Any]] = MappingProxyType({})
"""What :func:`request_context` returns for a provider without a ``context`` method."""


def request_context(provider: Provider, request: ActionRequest) -> Mapping[str, Any]:
    """Extra fields for the policy's context: the provider's optional ``context(request)``
    (``net.http``: ``host``, ``port``, ``scheme``, ``method``), or :data:`NO_FIELDS` (this
    very object) when it has none."""
    method = getattr(provider, "context", None)
    if not callable(method):
        return NO_FIELDS
    fields = method(request)
    if not isinstance(fields, Mapping):
        raise ActionRefused(f"the provider's context is not a mapping ({type(fields).__name__})")
    return fields
