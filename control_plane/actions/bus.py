"""The ``bus.*`` actions: an agent publishes to, or asks, another agent on the platform's bus.

``BusActions(client).register(registry)`` registers ``bus.publish`` (permission ``publish``)
and ``bus.request`` (permission ``request``): the bus operations' own names, so the rules that
judge messages judge these actions as written, and an agent's ``write`` covers them as it covers
its messages. The messages go out through ``client``, the acting agent's bus client: attached to
the kernel (``kernel.attach``) its mediator, IATP signing and records apply to them as well.
Why, and the limits: ``docs/control-plane.md`` (Actions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from agent_os.amb.errors import InvalidSubject
from agent_os.amb.subjects import validate_pattern, validate_subject
from agent_os.control_plane.actions.provider import ActionRefused

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest

BusKind = Literal["publish", "request"]

DEFAULT_TIMEOUT: Final = 5.0
MAX_TIMEOUT: Final = 60.0


class BusClient(Protocol):
    """What the ``bus.*`` actions need of a bus client (an :class:`agent_os.amb.AMB`)."""

    async def publish(self, topic: str, message: Any = None, *, recipient: str | None = None) -> str: ...

    async def request(
        self, topic: str, message: Any = None, *, timeout: float = 5.0, recipient: str | None = None
    ) -> Any: ...


class BusActions:
    """``bus.publish`` and ``bus.request`` through ``client``.

    Target: the subject (``agents.billing.ask``; a subject starting with ``_``, the platform's
    own control and reply subjects, is refused). Params: ``payload`` (any value the bus can
    serialize), ``recipient`` (optional: the agent the message is addressed to; a request
    then takes only that agent's reply) and, for ``bus.request``, ``timeout`` (seconds, default
    ``default_timeout``, at most ``max_timeout``). Outputs: ``bus.publish`` ``{"id"}`` (the
    message id); ``bus.request`` the reply's payload. A request without a reply in time fails
    with the bus's RequestTimeout as the result's error."""

    ACTIONS: Final = {"bus.publish": "publish", "bus.request": "request"}

    def __init__(
        self, client: BusClient, *, default_timeout: float = DEFAULT_TIMEOUT, max_timeout: float = MAX_TIMEOUT
    ) -> None:
        if not 0 < default_timeout <= max_timeout:
            raise ValueError("need 0 < default_timeout <= max_timeout")
        self.client = client
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout

    def provider(self, kind: BusKind) -> BusProvider:
        """The provider of ``"publish"`` or ``"request"``."""
        return BusProvider(self, kind)

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``bus.publish`` (permission ``publish``) and ``bus.request`` (``request``)."""
        for action, permission in self.ACTIONS.items():
            kind: BusKind = "publish" if permission == "publish" else "request"
            registry.register(action, self.provider(kind), permission, replace=replace)

    def timeout(self, params: Mapping[str, Any]) -> float:
        """The request's timeout from its params; raises ActionRefused for a bad one."""
        value = params.get("timeout", self.default_timeout)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ActionRefused(f"timeout must be a number of seconds, got {value!r}")
        if not 0 < value <= self.max_timeout:
            raise ActionRefused(f"timeout must be in (0, {self.max_timeout}] seconds, got {value}")
        return float(value)


class BusProvider:
    """One ``bus.*`` action of a :class:`BusActions` (a :class:`Provider`)."""

    def __init__(self, bus: BusActions, kind: BusKind) -> None:
        if kind not in ("publish", "request"):
            raise ValueError(f"kind must be publish or request, got {kind!r}")
        self.bus = bus
        self.kind = kind

    def __repr__(self) -> str:
        return f"BusProvider({self.kind!r})"

    def resource(self, request: ActionRequest) -> str:
        """The subject; refuses a malformed or reserved subject, a recipient that is not a
        string, and (``bus.request``) a bad timeout."""
        subject = bus_subject(request.target)
        _recipient(request.params)
        if self.kind == "request":
            self.bus.timeout(request.params)
        return subject

    async def run(self, request: ActionRequest) -> Any:
        subject = bus_subject(request.target)
        payload = request.params.get("payload")
        recipient = _recipient(request.params)
        client = self.bus.client
        if self.kind == "publish":
            return {"id": await client.publish(subject, payload, recipient=recipient)}
        timeout = self.bus.timeout(request.params)
        return await client.request(subject, payload, timeout=timeout, recipient=recipient)


def bus_subject(target: object) -> str:
    """``target`` as a subject an agent may use: a valid subject not starting with ``_`` (the
    platform's own control and reply subjects). Raises ActionRefused otherwise."""
    if not isinstance(target, str):
        raise ActionRefused(f"a subject must be a string, got {type(target).__name__}")
    try:
        subject = validate_subject(target)
    except InvalidSubject as exc:
        raise ActionRefused(str(exc)) from None
    if subject.startswith("_"):
        raise ActionRefused(f"{subject[:80]!r}: subjects starting with '_' are the platform's own")
    return subject


def bus_pattern(pattern: object) -> str:
    """``pattern`` as a subscription pattern an agent may use: a valid pattern that cannot match
    a subject starting with ``_`` (the platform's control and reply subjects), so its first
    token is a literal not starting with ``_`` (``>``, ``*.>`` or ``*.signal.*`` would cover
    ``_ctl.signal.<agent>`` and ``_INBOX.<...>``). Raises ActionRefused otherwise."""
    if not isinstance(pattern, str):
        raise ActionRefused(f"a pattern must be a string, got {type(pattern).__name__}")
    try:
        checked = validate_pattern(pattern)
    except InvalidSubject as exc:
        raise ActionRefused(str(exc)) from None
    first = checked.split(".", 1)[0]
    if first.startswith("_") or first in ("*", ">"):
        raise ActionRefused(
            f"{checked[:80]!r}: a pattern must start with a literal token not starting with '_' "
            "(it would cover the platform's own subjects)"
        )
    return checked


def is_platform_subject(subject: str) -> bool:
    """True for the platform's own subjects (control, reply, dead-letter: they start with ``_``),
    which an agent's subscription never delivers."""
    return subject.startswith("_")


def _recipient(params: Mapping[str, Any]) -> str | None:
    recipient = params.get("recipient")
    if recipient is not None and (not isinstance(recipient, str) or not recipient):
        raise ActionRefused(f"recipient must be an agent id, got {recipient!r}")
    return recipient
