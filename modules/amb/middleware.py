"""Middleware: small objects with an outbound and an inbound hook around every message.

The first middleware listed is the outermost (nearest the wire): it sees incoming messages first
and outgoing ones last. The chain's rules are in ``docs/bus.md``, "Middleware".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata

if TYPE_CHECKING:
    from agent_os.amb.subscription import Subscription

PublishNext = Callable[[Envelope], Awaitable[None]]
ConsumeNext = Callable[[Envelope, Metadata], Awaitable[None]]


class Middleware:
    """Base class: both hooks pass messages through unchanged. Override what you need."""

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        await call_next(envelope)

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        await call_next(envelope, metadata)

    def unsubscribed(self, subscription: Subscription) -> None:
        """Called when ``subscription`` has stopped for good (unsubscribe, drain, the client
        closing), after its last delivery: to let go of state kept per subscription. May be
        called more than once for one subscription. Does nothing here."""
        return None

    def lookahead(self, subscription: Subscription) -> int:
        """How many messages of ``subscription`` may be prepared (:meth:`prepare`) before
        their turn (0, the default: none). Asked once, when the subscription starts; see
        ``docs/bus.md``, "Look-ahead"."""
        return 0

    def prepare(self, envelope: Envelope, metadata: Metadata) -> None:
        """On a look-ahead subscription, called for each message as it arrives, in arrival
        order, before earlier messages are handled: start work whose result ``on_consume``
        takes in the message's turn (through ``metadata.context``). Must not block; what it
        raises is logged and ignored."""
        return None

    def abandon(self, envelope: Envelope, metadata: Metadata) -> None:
        """A message :meth:`prepare` saw is dropped before its turn (unsubscribe, a drain past
        its timeout, from inside a handler): undo what ``prepare`` started that would outlive
        it. Must not block; what it raises is logged and ignored."""
        return None


def build_publish_chain(middleware: Sequence[Middleware], wire: PublishNext) -> PublishNext:
    """Compose the outbound chain: the last middleware runs first, the first one last."""
    call = wire
    for mw in middleware:
        call = _bind_publish(mw, call)
    return call


def build_consume_chain(middleware: Sequence[Middleware], handler: ConsumeNext) -> ConsumeNext:
    """Compose the inbound chain: the first middleware runs first, then inwards to the handler."""
    call = handler
    for mw in reversed(middleware):
        call = _bind_consume(mw, call)
    return call


# The bound links are plain functions returning the hook's coroutine: awaiting it runs the hook
# directly, with no extra coroutine frame per layer (the chain is on every message's path).


def _bind_publish(mw: Middleware, call_next: PublishNext) -> PublishNext:
    hook = mw.on_publish

    def call(envelope: Envelope) -> Awaitable[None]:
        return hook(envelope, call_next)

    return call


def _bind_consume(mw: Middleware, call_next: ConsumeNext) -> ConsumeNext:
    hook = mw.on_consume

    def call(envelope: Envelope, metadata: Metadata) -> Awaitable[None]:
        return hook(envelope, metadata, call_next)

    return call
