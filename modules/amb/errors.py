"""The errors of the Agent Message Bus: one tree under :class:`BusError`.

::

    BusError
    ├── ConfigError (ValueError)           bad option, unknown backend, bad subject
    │   └── InvalidSubject                 a subject, pattern or name the bus refuses
    ├── StateError (RuntimeError)          call made in the wrong lifecycle state
    ├── CapabilityNotSupported (NotImplementedError)
    ├── EnvelopeError (ValueError)         bytes that are not a valid v1 envelope
    │   ├── MalformedEnvelope, TruncatedEnvelope, OversizedEnvelope, UnsupportedVersion
    ├── TransportError                     the broker or the connection to it failed
    │   └── BrokerUnavailable (ConnectionError)
    ├── RequestTimeout (TimeoutError), RemoteError
    ├── MessageRejected                    a middleware refused a message (reason attached)
    └── UnserializablePayload (TypeError)

What each means is in ``docs/bus.md``, "Errors".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class BusError(Exception):
    """Root of every error raised by the Agent Message Bus."""


class ConfigError(BusError, ValueError):
    """An option, a backend name or a subject is invalid."""


class InvalidSubject(ConfigError):
    """A subject, pattern, queue group or durable name is unusable: ``reason`` says why
    (``too_long``, ``whitespace``, ``control_character``, ``empty``, ``empty_token``,
    ``wildcard``); ``subject`` is the refused text."""

    def __init__(self, message: str, *, reason: str, subject: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.subject = subject


class StateError(BusError, RuntimeError):
    """A call was made in a lifecycle state that does not allow it (e.g. publish after close)."""


class CapabilityNotSupported(BusError, NotImplementedError):
    """The broker adapter does not offer the capability the call needs."""

    def __init__(self, broker: str, capability: str) -> None:
        super().__init__(f"broker {broker!r} does not support {capability}")
        self.broker = broker
        self.capability = capability


class EnvelopeError(BusError, ValueError):
    """Bytes received from the wire are not a valid envelope."""


class MalformedEnvelope(EnvelopeError):
    """The bytes do not decode, or a decoded field has the wrong type or value."""


class TruncatedEnvelope(EnvelopeError):
    """The bytes end before the envelope does."""


class OversizedEnvelope(EnvelopeError):
    """The encoded envelope is larger than the configured maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"envelope of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class UnsupportedVersion(EnvelopeError):
    """The envelope declares a wire-format version this code does not speak."""

    def __init__(self, version: object) -> None:
        super().__init__(f"unsupported envelope version {version!r}")
        self.version = version


class TransportError(BusError):
    """The broker, or the connection to it, failed."""


class BrokerUnavailable(TransportError, ConnectionError):
    """The broker cannot be reached."""


class RequestTimeout(BusError, TimeoutError):
    """No reply arrived within the request's timeout."""

    def __init__(self, topic: str, timeout: float) -> None:
        super().__init__(f"no reply on {topic!r} within {timeout:g}s")
        self.topic = topic
        self.timeout = timeout


class RemoteError(BusError):
    """The responder's handler failed on the request; ``reason`` says how."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"request on {topic!r} failed at the responder: {reason}")
        self.topic = topic
        self.reason = reason


class MessageRejected(BusError):
    """A middleware refused a message; ``reason`` is a short machine-readable word.

    Raised by a middleware's inbound hook, it makes the bus dead-letter the message with
    the reason instead of calling the handler. Raised by an outbound hook, it reaches the
    publisher.
    """

    reason: str = "rejected"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UnserializablePayload(BusError, TypeError):
    """The payload (or a header) cannot be carried by the chosen serializer."""


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` for an error, even one whose ``__str__`` fails (half-built errors of
    some client libraries do)."""
    try:
        text = str(exc)
    except Exception:
        text = "(no description)"
    return f"{type(exc).__name__}: {text}"


Translator = Callable[[BaseException, str], "BusError | None"]
"""An adapter's error translator: the bus error for a client library's error (None: not one)."""


@contextlib.contextmanager
def translating(translate: Translator, action: str) -> Iterator[None]:
    """Re-raise a client library's error as the bus error ``translate`` picks, original chained.

    Bus errors pass through; an exception ``translate`` does not know (None) is re-raised as is.
    Each adapter has one translator (most specific match first) and uses it through this.
    """
    try:
        yield
    except BusError:
        raise
    except Exception as exc:
        error = translate(exc, action)
        if error is None:
            raise
        raise error from exc
