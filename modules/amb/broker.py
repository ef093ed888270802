"""The Broker protocol: the narrow seam between the bus and a concrete message broker.

A broker moves opaque bytes between subjects and declares its :class:`Capabilities`; adapters are
found by name through the ``agent_os.brokers`` entry points (:func:`load_broker`), so this module
never imports one. The contract is in ``docs/bus.md``, "The Broker protocol".
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

from agent_os.amb.errors import ConfigError, StateError

ENTRY_POINT_GROUP = "agent_os.brokers"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What an adapter guarantees. A flag is True only when the conformance suite proves it.

    - ``durable``: named durable subscriptions that survive a restart of the client (and of the
      broker where it persists), with at-least-once delivery.
    - ``redelivery``: ``Delivery.nack()`` makes the broker deliver the message again.
    - ``queue_groups``: competing consumers; each message goes to one member of a group.
    - ``wildcards``: ``*`` and ``>`` in subscription patterns.
    - ``ordered_per_key``: messages published with the same ``key`` are delivered in publish
      order even across a queue group's members / partitions.
    - ``native_request_reply``: the broker has its own reply inboxes (the bus uses them).
    - ``max_payload``: the largest message in bytes the broker accepts, or None for no limit.
    """

    durable: bool = False
    redelivery: bool = False
    queue_groups: bool = True
    wildcards: bool = True
    ordered_per_key: bool = False
    native_request_reply: bool = False
    max_payload: int | None = None


class Delivery(Protocol):
    """One message handed to a subscriber: the raw bytes and the broker's facts about them.

    ``attempt`` starts at 1 and grows with each redelivery; ``extra`` carries broker-specific
    facts (partition, offset, stream id, sequence). Exactly one of :meth:`ack` / :meth:`nack`
    should be called; on brokers without redelivery both are harmless no-ops.
    """

    subject: str
    data: bytes
    attempt: int
    extra: Mapping[str, Any]

    async def ack(self) -> None:
        """Mark the message handled; a durable broker will not deliver it again."""
        ...

    async def nack(self, delay: float | None = None) -> None:
        """Ask for redelivery after ``delay`` seconds (no-op where redelivery is unsupported)."""
        ...


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
"""Called once per delivery, one at a time per subscription, in delivery order."""


class BrokerSubscription(Protocol):
    """A live subscription of a broker client."""

    pattern: str
    queue: str | None

    async def unsubscribe(self) -> None:
        """Stop delivery now; messages queued for this subscription are dropped."""
        ...

    async def drain(self, timeout: float | None = None) -> None:
        """Stop receiving new messages, deliver the ones already queued, then stop."""
        ...


@runtime_checkable
class Broker(Protocol):
    """A connection to a message broker that moves bytes between subjects.

    Guarantees every adapter gives: messages on one subscription are handed to its handler one
    at a time, in the order the broker delivered them; a handler's exception never stops the
    subscription; ``close()`` lets queued messages reach their handlers (bounded by ``timeout``)
    before the connection closes. Anything more is declared in :attr:`capabilities`.
    """

    name: str
    capabilities: Capabilities

    async def connect(self) -> None:
        """Open the connection; raises :class:`~agent_os.amb.errors.BrokerUnavailable` on failure."""
        ...

    async def close(self, timeout: float = 5.0) -> None:
        """Drain every subscription (up to ``timeout`` seconds), then close. Idempotent."""
        ...

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        """Send ``data`` to ``subject``; ``key`` orders messages where ``ordered_per_key``.

        Returns once the broker has accepted the message; may wait while a subscriber's queue is
        full (backpressure). Raises :class:`~agent_os.amb.errors.TransportError` if the broker fails.
        """
        ...

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
    ) -> BrokerSubscription:
        """Deliver messages whose subject matches ``pattern`` to ``handler``.

        ``queue`` joins a queue group (each message to one member); ``durable`` names a durable
        subscription (raises CapabilityNotSupported where ``capabilities.durable`` is False).
        Returns once the subscription is active: a message published afterwards is delivered.
        """
        ...

    def inbox_prefix(self) -> str:
        """The subject prefix under which this client receives replies (``<prefix>.<id>``)."""
        ...


@runtime_checkable
class DurableCapture(Protocol):
    """A durable broker that can keep what is published to a pattern for a durable
    subscription before any subscriber binds it (NATS: the JetStream stream and consumer).
    Without it a durable subscription gets only what is published once it exists."""

    async def capture(self, pattern: str, durable: str) -> None:
        """Keep what is published to ``pattern`` from now on for the durable ``durable``."""
        ...


class LifecycleState(enum.Enum):
    """Where a broker or client is in its life; calls check it and raise StateError."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Lifecycle:
    """Lifecycle bookkeeping shared by adapters and the AMB client."""

    _state: LifecycleState = LifecycleState.UNOPENED
    _what: str = "broker"

    @property
    def state(self) -> LifecycleState:
        return self._state

    def _connected(self, value: _T | None) -> _T:
        """``value`` (a connection object), or StateError when the caller has not connected."""
        if value is None:
            raise StateError(f"{self._what} is not connected: call connect() first")
        return value

    def _begin_connect(self) -> bool:
        """The prologue of ``connect()``: False when already open (nothing to do), True when the
        caller should connect; StateError once closing or closed (a closed client is not reused)."""
        if self._state is LifecycleState.OPEN:
            return False
        if self._state is not LifecycleState.UNOPENED:
            raise StateError(f"{self._what} is {self._state.value}; create a new one")
        return True

    def _begin_close(self) -> bool:
        """The prologue of ``close()``: True (the state now CLOSING) when the caller should drain
        and close; False when there is nothing to do (never opened, or already closing/closed)."""
        if self._state in (LifecycleState.CLOSING, LifecycleState.CLOSED):
            return False
        if self._state is LifecycleState.UNOPENED:
            self._state = LifecycleState.CLOSED
            return False
        self._state = LifecycleState.CLOSING
        return True

    def _require_open(self) -> None:
        if self._state is not LifecycleState.OPEN:
            if self._state is LifecycleState.UNOPENED:
                raise StateError(f"{self._what} is not connected: call connect() first")
            raise StateError(f"{self._what} is {self._state.value}")


def available_brokers() -> list[str]:
    """Names of the installed broker adapters (the ``agent_os.brokers`` entry points)."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_broker(backend: str, connection_string: str | None = None, **options: Any) -> Broker:
    """Create the adapter registered as ``backend`` with ``connection_string`` and ``options``.

    The entry points are scanned once per backend name and process (a scan reads every
    installed package's metadata: milliseconds); a name not found is looked up again next time.
    Raises ConfigError for an unknown backend; an adapter whose client library is missing
    raises ImportError naming the extra to install (``pip install 'agent-os[nats]'``).
    """
    factory = _factories.get(backend)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == backend]
        if not found:
            raise ConfigError(f"unknown backend {backend!r}; installed: {', '.join(available_brokers())}")
        factory = _factories[backend] = found[0].load()
    broker: Broker = factory(connection_string, **options)
    return broker


_factories: dict[str, Callable[..., Broker]] = {}
"""Adapter factories by backend name, as :func:`load_broker` found them."""
