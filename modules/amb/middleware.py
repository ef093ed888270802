"""Middleware: small objects with an outbound and an inbound hook around every message.

The chain is ordered from the wire inwards. The first middleware listed is the outermost: it
sees incoming messages first and outgoing messages last. That is where signing belongs: it
verifies before anything else looks at a message and signs after everything else has had its
say, so nothing changes an envelope once it is signed::

    publish: app -> mw[n-1] ... mw[1] -> mw[0] -> serializer -> broker
    deliver: broker -> decode -> mw[0] -> mw[1] ... mw[n-1] -> handler

A hook passes the message on by awaiting ``call_next``; it may change the envelope first. To
refuse a message it raises :class:`~agent_os.amb.errors.MessageRejected` (or a subclass): inbound, the
bus dead-letters the message with the error's ``reason`` and counts it; outbound, the error
reaches the publisher. A hook that returns without calling ``call_next`` swallows the message
(for example to hold it and pass it on later).

The chain is built when the client connects and is frozen afterwards.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata

PublishNext = Callable[[Envelope], Awaitable[None]]
ConsumeNext = Callable[[Envelope, Metadata], Awaitable[None]]


class Middleware:
    """Base class: both hooks pass messages through unchanged. Override what you need."""

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        await call_next(envelope)

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        await call_next(envelope, metadata)


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
