"""An action an agent asks for (:class:`ActionRequest`) and what came of it (:class:`ActionResult`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final


def _frozen(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(params))


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """One action: ``action`` (a registered name: ``fs.read``, ``fs.write`` ...), ``target``
    (what it acts on: a path, a URL ...), ``params`` (the action's options, copied into a
    read-only mapping) and ``agent_id`` (the acting agent; None: the agent whose code is
    running). Inside agent code an ``agent_id`` other than the running agent's id or name is
    denied: an agent cannot act as another."""

    action: str
    target: str
    params: Mapping[str, Any] = field(default_factory=dict)
    agent_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen(self.params))


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What ``kernel.submit`` returns: ``allowed`` (the decision let the action run),
    ``output`` (the provider's result; None when denied, or when it failed without
    output to give back: see ActionFailed), ``error`` (the reason of a
    denial, or the provider's failure; None on success) and ``record_id`` (the flight-recorder
    record of the outcome when the action ran, of the decision when it was denied)."""

    allowed: bool
    output: Any
    error: str | None
    record_id: str | None

    @property
    def ok(self) -> bool:
        """Allowed and done without error."""
        return self.allowed and self.error is None


_new: Final = object.__new__
# ActionResult is frozen: kernel.submit, which makes one per action, sets its fields through
# their slot descriptors, as its __init__ does through object.__setattr__, at half the cost.
_set_allowed: Final = getattr(ActionResult, "allowed").__set__  # noqa: B009 (mypy sees a bool)
_set_output: Final = getattr(ActionResult, "output").__set__  # noqa: B009
_set_error: Final = getattr(ActionResult, "error").__set__  # noqa: B009
_set_record_id: Final = getattr(ActionResult, "record_id").__set__  # noqa: B009


def action_result(allowed: bool, output: Any, error: str | None, record_id: str | None) -> ActionResult:
    """``ActionResult(allowed, output, error, record_id)``, built without the dataclass
    ``__init__``."""
    result: ActionResult = _new(ActionResult)
    _set_allowed(result, allowed)
    _set_output(result, output)
    _set_error(result, error)
    _set_record_id(result, record_id)
    return result
