"""The one place where nats-py errors become bus errors (the original is always chained)."""

from __future__ import annotations

import contextlib

from agent_os.amb.errors import (
    BrokerUnavailable,
    BusError,
    ConfigError,
    StateError,
    TransportError,
    describe,
    translating,
)


def translate(exc: BaseException, action: str) -> BusError | None:
    """The bus error for a nats-py (or socket) error, most specific first; None if not ours.

    A bad subject, a payload over the server's limit, a bad timeout or callback ->
    ConfigError; MsgAlreadyAckdError -> StateError; connection-level errors (no servers,
    closed, draining, reconnecting, stale, outbound buffer full, authorization, no JetStream
    responder, JetStream unavailable, a timeout, OSError) -> BrokerUnavailable; any other
    nats-py error -> TransportError.
    """
    import nats.errors as ne
    import nats.js.errors as je

    text = f"{action}: {describe(exc)}"
    if isinstance(
        exc, ne.BadSubjectError | ne.MaxPayloadError | ne.BadTimeoutError | ne.InvalidCallbackTypeError
    ):
        return ConfigError(text)
    if isinstance(exc, ne.MsgAlreadyAckdError):
        return StateError(text)
    unavailable = (
        ne.NoServersError,
        ne.ConnectionClosedError,
        ne.ConnectionDrainingError,
        ne.ConnectionReconnectingError,
        ne.StaleConnectionError,
        ne.OutboundBufferLimitError,
        ne.AuthorizationError,
        je.NoStreamResponseError,
        je.ServiceUnavailableError,
        OSError,
    )
    if isinstance(exc, unavailable):
        return BrokerUnavailable(text)
    if isinstance(exc, ne.Error):
        return TransportError(text)
    return None


def transient(exc: BaseException | None) -> bool:
    """Worth sending again while the connection recovers (a JetStream publish)."""
    import nats.errors as ne
    import nats.js.errors as je

    return isinstance(
        exc,
        TimeoutError
        | ne.ConnectionReconnectingError
        | ne.StaleConnectionError
        | ne.OutboundBufferLimitError
        | je.NoStreamResponseError
        | je.ServiceUnavailableError
        | OSError,
    )


def translated(action: str) -> contextlib.AbstractContextManager[None]:
    """Re-raise a client error as the bus error :func:`translate` picks, original chained."""
    return translating(translate, action)
