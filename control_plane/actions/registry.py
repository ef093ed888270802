"""Which provider does which action, under which permission: :class:`ActionRegistry`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from agent_os.control_plane.actions.provider import Provider
from agent_os.control_plane.errors import KernelError

PERMISSIONS: Final = ("read", "write", "execute", "network")
"""The API reference's permissions; an action's permission is one of them or a custom name."""

_NAME: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_PERMISSION: Final = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """An action: its ``name``, the ``provider`` that does it, the ``permission`` it needs and
    the policy ``operation`` it is judged as (default: the permission).

    The resource is the provider's ``resource(request)``; the action's name is the context
    field ``action``. A provider with a ``permission(request)`` method decides the permission
    per request (``sql.query``: ``read`` or ``write``); ``permission`` is then the most it can
    need, for listings."""

    name: str
    provider: Provider
    permission: str
    operation: str = ""

    def __post_init__(self) -> None:
        if not self.operation:
            object.__setattr__(self, "operation", self.permission)


class ActionRegistry:
    """Action names (``fs.read`` ...) to their :class:`ActionSpec` (``kernel.actions``)."""

    def __init__(self) -> None:
        self._specs: dict[str, ActionSpec] = {}

    def register(
        self,
        action: str,
        provider: Provider,
        permission: str,
        *,
        operation: str | None = None,
        replace: bool = False,
    ) -> ActionSpec:
        """Let ``provider`` do ``action`` for agents holding ``permission``.

        ``action``: dotted lower-case words (``fs.read``, ``crm.lookup``); ``permission``: one
        lower-case word (``read``, ``write``, ``execute``, ``network``, or your own);
        ``operation``: the policy operation it is judged as (one lower-case word; default:
        the permission). Raises KernelError for a bad name, permission or operation, an
        object that is not a Provider, or an action already registered (unless ``replace``)."""
        if not isinstance(action, str) or _NAME.fullmatch(action) is None:
            raise KernelError(f"an action name is dotted lower-case words (like 'fs.read'), got {action!r}")
        if not isinstance(permission, str) or _PERMISSION.fullmatch(permission) is None:
            raise KernelError(f"a permission is one lower-case word (like 'read'), got {permission!r}")
        if operation is not None and (
            not isinstance(operation, str) or _PERMISSION.fullmatch(operation) is None
        ):
            raise KernelError(f"an operation is one lower-case word (like 'sql'), got {operation!r}")
        if not isinstance(provider, Provider):
            raise KernelError(
                f"{provider!r} is not a provider: it needs resource(request) and async run(request)"
            )
        if action in self._specs and not replace:
            raise KernelError(f"action {action!r} is already registered (pass replace=True)")
        spec = ActionSpec(action, provider, permission, operation or permission)
        self._specs[action] = spec
        return spec

    def get(self, action: str) -> ActionSpec | None:
        """The action's spec, or None when it is not registered."""
        return self._specs.get(action)

    def __contains__(self, action: object) -> bool:
        return action in self._specs

    def __iter__(self) -> Iterator[ActionSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)
