"""Decoding an envelope in either format, picked by its first byte.

A JSON envelope starts with ``{`` and a msgpack one never does, so clients configured with
different serializers interoperate. The AMB client's receive path carries
:meth:`Decoder.decode_fields` inline; a test in ``tests/unit/test_client.py`` checks both agree.
"""

from __future__ import annotations

from typing import Final

from agent_os.amb.envelope import Envelope
from agent_os.amb.errors import (
    EnvelopeError,
    MalformedEnvelope,
    OversizedEnvelope,
    TruncatedEnvelope,
    describe,
)
from agent_os.amb.serializers.json_format import JsonSerializer
from agent_os.amb.serializers.msgpack_format import decode_msgpack_checked
from agent_os.amb.serializers.schema import (
    DEFAULT_MAX_BYTES,
    WireFields,
    check_subjects,
    envelope_from_wire,
    typed_unpack,
    wire_of,
)

_JSON_START: Final = ord("{")
_JSON_PREFIX: Final = b"{"


class Decoder:
    """Decodes either format, picking by the first byte; the size limit applies to both."""

    __slots__ = ("_json", "max_bytes")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._json = JsonSerializer(max_bytes)

    def decode_fields(self, data: bytes, known: str | None = None) -> WireFields:
        """The checked fields of an envelope in either format, as :data:`WireFields` (no
        Envelope object yet). Raises an :class:`~agent_os.amb.EnvelopeError` subclass.

        ``known``: a subject the caller knows to be valid (a reply subject it made itself); a
        topic equal to it is not checked again."""
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        # msgspec refuses anything that is not a msgpack v1 envelope (empty input and JSON,
        # which starts with "{", included), so the common case costs one call. JSON goes to
        # refused() without that call, whose refusal (an exception) costs as much as a decode.
        if data[:1] == _JSON_PREFIX:
            return self.refused(data)
        try:
            fields: WireFields = typed_unpack(data)
        except Exception:
            return self.refused(data)
        if fields[5] or fields[2] != known:
            check_subjects(fields[2], fields[5])
        return fields

    def refused(self, data: bytes) -> WireFields:
        """The fields of input (of at most ``max_bytes``) that :data:`typed_unpack` refused:
        empty, JSON, or msgpack for the checked path. Raises an
        :class:`~agent_os.amb.EnvelopeError` subclass."""
        if not data:
            raise TruncatedEnvelope("empty message")
        try:
            if data[0] == _JSON_START:
                return self._json.decode_fields(data)
            return wire_of(decode_msgpack_checked(data))
        except EnvelopeError:
            raise
        except Exception as exc:
            # Each format names what it foresaw; anything else is still an envelope error, so
            # the message is dead-lettered and counted rather than lost.
            raise MalformedEnvelope(f"undecodable envelope: {describe(exc)}") from exc

    def decode(self, data: bytes) -> Envelope:
        """Decode ``data`` (either format); raises an :class:`~agent_os.amb.EnvelopeError`
        subclass."""
        return envelope_from_wire(self.decode_fields(data))

    __call__ = decode


_DEFAULT_DECODER: Final = Decoder()


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Decode an envelope in either format; raises an :class:`~agent_os.amb.EnvelopeError`
    subclass (:class:`~agent_os.amb.OversizedEnvelope` above ``max_bytes``)."""
    decoder = _DEFAULT_DECODER if max_bytes == DEFAULT_MAX_BYTES else Decoder(max_bytes)
    return decoder.decode(data)
