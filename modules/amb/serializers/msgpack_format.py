"""The msgpack format (the default): an envelope as a 13-element msgpack array.

Encoding reuses one msgpack Packer per thread; decoding is msgspec's one-pass check against the
v1 schema, with a field-by-field path that names what is wrong (see ``docs/bus.md``).
"""

from __future__ import annotations

import threading
from typing import Any, Final

import msgpack
import msgspec

from agent_os.amb.envelope import WIRE_VERSION, Envelope
from agent_os.amb.errors import MalformedEnvelope, OversizedEnvelope, TruncatedEnvelope, UnserializablePayload
from agent_os.amb.serializers.schema import (
    DEFAULT_MAX_BYTES,
    WireFields,
    check_subjects,
    envelope_from_fields,
    envelope_from_wire,
    typed_unpack,
    wire_of,
)

# msgspec's encoder is about twice as fast as msgpack's Packer and writes the same bytes for
# the same plain values, but it also converts values msgpack refuses (sets, dataclasses,
# datetimes, ...). So the encoders use it only when the payload is a scalar or bytes and there
# are no headers; anything else goes through the Packer, which refuses what it cannot carry.
_SCALARS: Final = frozenset({bytes, str, int, float, bool, type(None)})
_encode_plain: Final = msgspec.msgpack.Encoder().encode


class _PerThread(threading.local):
    """This thread's msgpack Packer: reusing one is about 3x faster than ``packb``, which builds
    a Packer per call. It resets itself after each message (also after an error) and keeps its
    buffer's capacity, so a thread holds at most one largest-message worth of memory."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_local = _PerThread()


class MsgpackSerializer:
    """The default serializer: a msgpack array, bytes kept as bin."""

    name = "msgpack"
    content_type = "application/msgpack"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

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
        # encode() for fields given one by one; test_serializers checks both write the same bytes.
        fields = [
            WIRE_VERSION,
            id,
            topic,
            sender,
            recipient,
            reply_to,
            correlation_id,
            timestamp,
            expires_at,
            priority,
            headers,
            payload,
            None,
        ]
        try:
            if type(payload) in _SCALARS and not headers:
                data: bytes = _encode_plain(fields)
            else:
                data = _local.packer.pack(fields)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnserializablePayload(f"msgpack cannot encode the envelope: {exc}") from exc
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        return data

    def encode(self, env: Envelope) -> bytes:
        sig = env.sig
        payload = env.payload
        headers = env.headers
        fields = [
            env.v,
            env.id,
            env.topic,
            env.sender,
            env.recipient,
            env.reply_to,
            env.correlation_id,
            env.timestamp,
            env.expires_at,
            env.priority,
            headers,
            payload,
            None if sig is None else [sig.scheme, sig.key_id, sig.nonce, sig.value],
        ]
        try:
            if type(payload) in _SCALARS and not headers:
                data: bytes = _encode_plain(fields)
            else:
                data = _local.packer.pack(fields)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnserializablePayload(f"msgpack cannot encode the envelope: {exc}") from exc
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        return data

    def decode(self, data: bytes) -> Envelope:
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        return envelope_from_wire(_decode_msgpack(data))


def _decode_msgpack(data: bytes) -> WireFields:
    """The fields of a msgpack envelope whose size is checked: msgspec's typed one-pass decode,
    else the checked path (which accepts what msgspec was stricter about or names the error)."""
    try:
        fields: WireFields = typed_unpack(data)
    except Exception:
        return wire_of(decode_msgpack_checked(data))
    check_subjects(fields[2], fields[5])
    return fields


def decode_msgpack_checked(data: bytes) -> Envelope:
    """The envelope of msgpack ``data`` decoded and checked field by field (the path for what
    :data:`~agent_os.amb.serializers.schema.typed_unpack` refuses): it accepts what msgspec was
    stricter about or raises an :class:`~agent_os.amb.EnvelopeError` naming what is wrong."""
    try:
        # timestamp=3: the timestamp extension as an aware datetime, as msgspec decodes it (one
        # out of datetime's range is refused by both).
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True, timestamp=3)
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ...
        raise _classify_msgpack_error(data, exc) from exc
    return envelope_from_fields(fields)


def _classify_msgpack_error(data: bytes, exc: Exception) -> MalformedEnvelope | TruncatedEnvelope:
    # msgpack bounds every declared length by the input's size, so a container or string that
    # claims more than the bytes left means the input ends early; so does running out of data.
    if "exceeds max_" in str(exc) or "incomplete input" in str(exc):
        return TruncatedEnvelope(f"envelope truncated after {len(data)} bytes")
    return MalformedEnvelope(f"not a msgpack envelope: {exc or type(exc).__name__}")
