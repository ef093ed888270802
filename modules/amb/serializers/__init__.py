"""Serializers turn envelopes into bytes and back: the protocol, and choosing one by name.

One concept per module: :mod:`.schema` (the v1 wire fields and their checks),
:mod:`.msgpack_format`, :mod:`.json_format`, and :mod:`.decoder` (either format, by its first
byte). The wire format is described in ``docs/bus.md``.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from agent_os.amb.envelope import Envelope
from agent_os.amb.errors import ConfigError
from agent_os.amb.numbers import whole
from agent_os.amb.serializers import json_format, msgpack_format
from agent_os.amb.serializers.schema import DEFAULT_MAX_BYTES


class Serializer(Protocol):
    """Turns envelopes into bytes and back. Implementations must be stateless and thread-safe."""

    name: str
    content_type: str

    def encode(self, env: Envelope) -> bytes:
        """Encode ``env``; raises :class:`~agent_os.amb.UnserializablePayload` if a value cannot
        be carried, :class:`~agent_os.amb.OversizedEnvelope` above the size limit."""
        ...

    def decode(self, data: bytes) -> Envelope:
        """Decode ``data``; raises an :class:`~agent_os.amb.EnvelopeError` subclass on any
        invalid input."""
        ...

    def encode_new(
        self,
        id: str,
        topic: str,
        sender: str,
        payload: Any,
        recipient: str | None,
        reply_to: str | None,
        correlation_id: str | None,
        timestamp: int,
        expires_at: int | None,
        priority: int,
        headers: dict[str, str],
    ) -> bytes:
        """Encode the unsigned envelope with these fields, the same bytes as ``encode(Envelope(
        ...))`` (the publish path without middleware, which needs no Envelope object)."""
        ...


SERIALIZERS: Final[dict[str, type[msgpack_format.MsgpackSerializer] | type[json_format.JsonSerializer]]] = {
    "msgpack": msgpack_format.MsgpackSerializer,
    "json": json_format.JsonSerializer,
}


def get_serializer(name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Serializer:
    """Return the serializer called ``name`` (``"msgpack"`` or ``"json"``); raises
    :class:`~agent_os.amb.ConfigError` for another name."""
    try:
        cls = SERIALIZERS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ConfigError(f"unknown serializer {name!r:.60}; choose one of {sorted(SERIALIZERS)}") from None
    return cls(whole(max_bytes, "max_message_bytes"))
