"""Serializers: envelope <-> bytes, with strict decoding.

Two formats carry the same v1 envelope:

* ``msgpack`` (the default): a 13-element array ``[v, id, topic, sender, recipient, reply_to,
  correlation_id, timestamp, expires_at, priority, headers, payload, sig]`` where ``sig`` is
  ``None`` or ``[scheme, key_id, nonce, value]``. Compact and fast; bytes payloads stay bytes.
* ``json``: an object with the same field names. Bytes anywhere in the payload travel as
  ``{"$b64": "<base64>"}``; so that no payload can be mistaken for that tag, every object key
  that starts with ``$`` (in the payload and the headers) is sent with one more ``$`` in front,
  which the decoder removes. The signature's binary fields are base64 strings.

Decoding never trusts its input: anything that is not exactly a v1 envelope raises an
:class:`~agent_os.amb.errors.EnvelopeError` subclass naming what is wrong. :func:`decode` accepts either
format (a JSON envelope starts with ``{``, a msgpack one never does), so clients configured with
different serializers interoperate.

A msgpack envelope is decoded in one pass by msgspec against the v1 schema (every field's type,
non-empty ``id`` and ``topic``, version 1), which checks it in C. Input msgspec refuses goes
through the checked path (msgpack + :func:`envelope_from_fields`), which either names what is
wrong or accepts what msgspec was stricter about; both accept exactly the same envelope fields.
Payloads are decoded by msgspec as plain msgpack values: maps to dicts (keys of any msgpack
type), arrays to lists, bin to bytes, ext types to ``msgspec.msgpack.Ext`` (the timestamp
extension to an aware ``datetime``).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from typing import Annotated, Any, Final, Literal, Protocol

import msgpack
import msgspec

from agent_os.amb.envelope import WIRE_VERSION, Envelope, Signature, new_envelope
from agent_os.amb.errors import (
    ConfigError,
    MalformedEnvelope,
    OversizedEnvelope,
    TruncatedEnvelope,
    UnserializablePayload,
    UnsupportedVersion,
)

DEFAULT_MAX_BYTES: Final = 8 * 1024 * 1024
"""Largest encoded envelope accepted by default (8 MiB); brokers may impose a lower limit."""

_FIELDS: Final = (
    "v",
    "id",
    "topic",
    "sender",
    "recipient",
    "reply_to",
    "correlation_id",
    "timestamp",
    "expires_at",
    "priority",
    "headers",
    "payload",
    "sig",
)
_OPTIONAL_STR: Final = ("recipient", "reply_to", "correlation_id")
_unpackb: Final = msgpack.unpackb

# The v1 field array as msgspec checks it; the same rules as envelope_from_fields.
_NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
_WireV1 = tuple[
    Literal[1],  # WIRE_VERSION
    _NonEmptyStr,  # id
    _NonEmptyStr,  # topic
    str,  # sender
    str | None,  # recipient
    str | None,  # reply_to
    str | None,  # correlation_id
    int,  # timestamp
    int | None,  # expires_at
    int,  # priority
    dict[str, str],  # headers
    Any,  # payload
    tuple[str, str, bytes, bytes] | None,  # sig
]
typed_unpack: Final = msgspec.msgpack.Decoder(_WireV1).decode
"""msgspec's one-pass decode of a msgpack v1 envelope into :data:`WireFields`: raises (a
msgspec error) on anything else, which :meth:`Decoder.refused` then explains or accepts."""

WireFields = tuple[
    int,
    str,
    str,
    str,
    str | None,
    str | None,
    str | None,
    int,
    int | None,
    int,
    dict[str, str],
    Any,
    tuple[str, str, bytes, bytes] | None,
]
"""A checked v1 envelope as a tuple in wire order (``sig`` as None or a 4-tuple), as
:meth:`Decoder.decode_fields` returns it; :func:`envelope_from_wire` makes it an Envelope."""

_new: Final = object.__new__
# Signature is frozen: its fields are set through their slot descriptors, as its __init__ does
# (through object.__setattr__), at half the cost.
_set_scheme: Final = getattr(Signature, "scheme").__set__  # noqa: B009 (mypy sees a str)
_set_key_id: Final = getattr(Signature, "key_id").__set__  # noqa: B009
_set_nonce: Final = getattr(Signature, "nonce").__set__  # noqa: B009
_set_value: Final = getattr(Signature, "value").__set__  # noqa: B009


def envelope_from_wire(fields: WireFields) -> Envelope:
    """The Envelope of checked wire fields (see :data:`WireFields`); no checks here.

    Built with :func:`~agent_os.amb.envelope.new_envelope` (no dataclass ``__init__`` call), the
    signature likewise.
    """
    _, id_, topic, sender, recipient, reply_to, corr, ts, exp, prio, headers, payload, sig = fields
    signature: Signature | None = None
    if sig is not None:
        signature = _new(Signature)
        _set_scheme(signature, sig[0])
        _set_key_id(signature, sig[1])
        _set_nonce(signature, sig[2])
        _set_value(signature, sig[3])
    return new_envelope(
        id_, topic, sender, payload, recipient, reply_to, corr, ts, exp, prio, headers, signature
    )


def wire_of(env: Envelope) -> WireFields:
    """The wire fields of ``env`` (the inverse of :func:`envelope_from_wire`)."""
    sig = env.sig
    return (
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
        env.headers,
        env.payload,
        None if sig is None else (sig.scheme, sig.key_id, sig.nonce, sig.value),
    )


class Serializer(Protocol):
    """Turns envelopes into bytes and back. Implementations must be stateless and thread-safe."""

    name: str
    content_type: str

    def encode(self, env: Envelope) -> bytes:
        """Encode ``env``; raises :class:`UnserializablePayload` if a value cannot be carried."""
        ...

    def decode(self, data: bytes) -> Envelope:
        """Decode ``data``; raises an :class:`EnvelopeError` subclass on any invalid input."""
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


def _diagnose(fields: list[Any]) -> str:
    """Name the first invalid field of a decoded v1 field list (slow path, errors only)."""
    values = dict(zip(_FIELDS, fields, strict=True))
    for name in ("id", "topic"):
        if type(values[name]) is not str or not values[name]:
            return f"{name} must be a non-empty string"
    if type(values["sender"]) is not str:
        return "sender must be a string"
    for name in _OPTIONAL_STR:
        if values[name] is not None and type(values[name]) is not str:
            return f"{name} must be a string or null"
    if type(values["timestamp"]) is not int:
        return "timestamp must be an integer (ns)"
    if values["expires_at"] is not None and type(values["expires_at"]) is not int:
        return "expires_at must be an integer (ns) or null"
    if type(values["priority"]) is not int:
        return "priority must be an integer"
    headers = values["headers"]
    if type(headers) is not dict or not all(type(k) is str and type(v) is str for k, v in headers.items()):
        return "headers must map strings to strings"
    return "sig must be null or [scheme, key_id, nonce, value]"


def _signature(raw: Any) -> Signature | None:
    if raw is None:
        return None
    if (
        type(raw) is list
        and len(raw) == 4
        and type(raw[0]) is str
        and type(raw[1]) is str
        and type(raw[2]) is bytes
        and type(raw[3]) is bytes
    ):
        return Signature(raw[0], raw[1], raw[2], raw[3])
    raise MalformedEnvelope("sig must be null or [scheme, key_id, nonce, value]")


def envelope_from_fields(fields: Any) -> Envelope:
    """Build an envelope from the v1 field list, checking every field's type.

    Raises :class:`UnsupportedVersion` for another version and :class:`MalformedEnvelope` for a
    wrong shape or type. Shared by every serializer so that all formats are equally strict.
    """
    # The fast path accepts exactly a valid v1 envelope; anything else goes to _reject, which
    # names what is wrong. Both check the same rules.
    if type(fields) is list and len(fields) == 13:
        v, id_, topic, sender, recipient, reply_to, corr, ts, exp, prio, headers, payload, sig = fields
        if (
            type(v) is int
            and v == WIRE_VERSION
            and type(id_) is str
            and id_
            and type(topic) is str
            and topic
            and type(sender) is str
            and (recipient is None or type(recipient) is str)
            and (reply_to is None or type(reply_to) is str)
            and (corr is None or type(corr) is str)
            and type(ts) is int
            and (exp is None or type(exp) is int)
            and type(prio) is int
            and type(headers) is dict
        ):
            if headers:
                for k, val in headers.items():
                    if type(k) is not str or type(val) is not str:
                        raise MalformedEnvelope("headers must map strings to strings")
            return Envelope(
                id_,
                topic,
                sender,
                payload,
                recipient,
                reply_to,
                corr,
                ts,
                exp,
                prio,
                headers,
                None if sig is None else _signature(sig),
            )
    raise _reject(fields)


def _reject(fields: Any) -> MalformedEnvelope | UnsupportedVersion:
    """The error for a field list the fast path of :func:`envelope_from_fields` refused."""
    if type(fields) is not list or not fields:
        return MalformedEnvelope("an envelope must be a non-empty array")
    version = fields[0]
    if type(version) is not int:
        return MalformedEnvelope("the version field must be an integer")
    if version != WIRE_VERSION:
        return UnsupportedVersion(version)
    if len(fields) != len(_FIELDS):
        return MalformedEnvelope(f"a v1 envelope has {len(_FIELDS)} fields, got {len(fields)}")
    return MalformedEnvelope(_diagnose(fields))


def _check_size(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise OversizedEnvelope(len(data), limit)


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
        # encode() for fields given one by one (keep the two in step).
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
        return wire_of(_decode_msgpack_checked(data))
    return fields


def _decode_msgpack_checked(data: bytes) -> Envelope:
    try:
        fields = _unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ...
        raise _classify_msgpack_error(data, exc) from exc
    return envelope_from_fields(fields)


def _classify_msgpack_error(data: bytes, exc: Exception) -> MalformedEnvelope | TruncatedEnvelope:
    # msgpack bounds every declared length by the input's size, so a container or string that
    # claims more than the bytes left means the input ends early; so does running out of data.
    if "exceeds max_" in str(exc) or "incomplete input" in str(exc):
        return TruncatedEnvelope(f"envelope truncated after {len(data)} bytes")
    return MalformedEnvelope(f"not a msgpack envelope: {exc or type(exc).__name__}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, name: str) -> bytes:
    if type(text) is not str:
        raise MalformedEnvelope(f"{name} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEnvelope(f"{name} is not valid base64") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_B64_TAG: _b64(bytes(value))}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_object(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _B64_TAG in obj:
        return _unb64(obj[_B64_TAG], "a $b64 value")
    for k in obj:
        if k.startswith("$"):  # an escaped key (see _escape_keys): drop the added "$"
            return {k[1:] if k.startswith("$") else k: v for k, v in obj.items()}
    return obj


def _escape_keys(value: Any) -> Any:
    """``value`` with one ``$`` added in front of every dict key starting with ``$``, so a
    user's ``{"$b64": ...}`` is never read back as the bytes tag. Copies only what changes."""
    if isinstance(value, dict):
        out = {}
        changed = False
        for k, v in value.items():
            e = _escape_keys(v)
            if type(k) is str and k.startswith("$"):
                k, changed = "$" + k, True
            changed = changed or e is not v
            out[k] = e
        return out if changed else value
    if isinstance(value, list | tuple):
        items = [_escape_keys(v) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


_B64_TAG: Final = "$b64"


class JsonSerializer:
    """A JSON object per envelope; readable and language-neutral, slower than msgpack."""

    name = "json"
    content_type = "application/json"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def encode(self, env: Envelope) -> bytes:
        obj: dict[str, Any] = {
            "v": env.v,
            "id": env.id,
            "topic": env.topic,
            "sender": env.sender,
            "recipient": env.recipient,
            "reply_to": env.reply_to,
            "correlation_id": env.correlation_id,
            "timestamp": env.timestamp,
            "expires_at": env.expires_at,
            "priority": env.priority,
            "headers": _escape_keys(env.headers),
        }
        obj["payload"] = _escape_keys(env.payload)
        if env.sig is not None:
            s = env.sig
            obj["sig"] = {
                "scheme": s.scheme,
                "key_id": s.key_id,
                "nonce": _b64(s.nonce),
                "value": _b64(s.value),
            }
        try:
            data = json.dumps(
                obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
            ).encode()
        except (TypeError, ValueError) as exc:
            raise UnserializablePayload(f"json cannot encode the envelope: {exc}") from exc
        _check_size(data, self.max_bytes)
        return data

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
        return self.encode(
            Envelope(
                id,
                topic,
                sender,
                payload,
                recipient,
                reply_to,
                correlation_id,
                timestamp,
                expires_at,
                priority,
                headers,
            )
        )

    def decode(self, data: bytes) -> Envelope:
        _check_size(data, self.max_bytes)
        try:
            text = bytes(data).decode("utf-8")
            obj = json.loads(text, object_hook=_json_object)
        except UnicodeDecodeError as exc:
            raise MalformedEnvelope("a JSON envelope must be UTF-8") from exc
        except json.JSONDecodeError as exc:
            if exc.pos >= len(exc.doc.rstrip()):
                raise TruncatedEnvelope(f"JSON envelope truncated after {len(data)} bytes") from exc
            raise MalformedEnvelope(f"not a JSON envelope: {exc.msg} at {exc.pos}") from exc
        except RecursionError as exc:
            raise MalformedEnvelope("JSON envelope nested too deeply") from exc
        if type(obj) is not dict:
            raise MalformedEnvelope("a JSON envelope must be an object")
        if "v" in obj and obj["v"] != WIRE_VERSION and type(obj["v"]) is int:
            raise UnsupportedVersion(obj["v"])
        unknown = obj.keys() - set(_FIELDS)
        if unknown:
            raise MalformedEnvelope(f"unknown envelope fields: {sorted(unknown)}")
        payload = obj.get("payload")
        sig = obj.get("sig")
        if sig is not None:
            if type(sig) is not dict or set(sig) != {"scheme", "key_id", "nonce", "value"}:
                raise MalformedEnvelope("sig must have exactly scheme, key_id, nonce and value")
            sig = [
                sig["scheme"],
                sig["key_id"],
                _unb64(sig["nonce"], "sig.nonce"),
                _unb64(sig["value"], "sig.value"),
            ]
        required = ("v", "id", "topic", "sender", "timestamp")
        missing = [name for name in required if name not in obj]
        if missing:
            raise MalformedEnvelope(f"missing envelope fields: {missing}")
        fields = [obj.get(name) for name in _FIELDS]
        fields[9] = obj.get("priority", 0)
        fields[10] = obj.get("headers", {})
        fields[11] = payload
        fields[12] = sig
        return envelope_from_fields(fields)


SERIALIZERS: Final[dict[str, type[MsgpackSerializer] | type[JsonSerializer]]] = {
    "msgpack": MsgpackSerializer,
    "json": JsonSerializer,
}


def get_serializer(name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Serializer:
    """Return the serializer called ``name`` (``"msgpack"`` or ``"json"``); raises ConfigError."""
    try:
        cls = SERIALIZERS[name]
    except KeyError:
        raise ConfigError(f"unknown serializer {name!r}; choose one of {sorted(SERIALIZERS)}") from None
    return cls(max_bytes)


_JSON_START: Final = ord("{")


class Decoder:
    """Decodes either format, picking by the first byte; the size limit applies to both."""

    __slots__ = ("_json", "max_bytes")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._json = JsonSerializer(max_bytes)

    def decode_fields(self, data: bytes) -> WireFields:
        """The checked fields of an envelope in either format, as :data:`WireFields` (the
        receive hot path: no Envelope object yet). Raises an :class:`EnvelopeError` subclass."""
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        # msgspec refuses anything that is not a msgpack v1 envelope (empty input and JSON,
        # which starts with "{", included), so the common case costs one call. (The AMB
        # client's receive path carries these lines inline; keep the two in step.)
        try:
            fields: WireFields = typed_unpack(data)
        except Exception:
            return self.refused(data)
        return fields

    def refused(self, data: bytes) -> WireFields:
        """The fields of input (of at most ``max_bytes``) that :data:`typed_unpack` refused:
        empty, JSON, or msgpack for the checked path. Raises an :class:`EnvelopeError` subclass."""
        if not data:
            raise TruncatedEnvelope("empty message")
        if data[0] == _JSON_START:
            return wire_of(self._json.decode(data))
        return wire_of(_decode_msgpack_checked(data))

    def decode(self, data: bytes) -> Envelope:
        """Decode ``data`` (either format); raises an :class:`EnvelopeError` subclass."""
        return envelope_from_wire(self.decode_fields(data))

    __call__ = decode


_DEFAULT_DECODER: Final = Decoder()


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Decode an envelope in either format; raises an :class:`EnvelopeError` subclass."""
    decoder = _DEFAULT_DECODER if max_bytes == DEFAULT_MAX_BYTES else Decoder(max_bytes)
    return decoder.decode(data)
