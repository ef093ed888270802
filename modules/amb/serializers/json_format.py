"""The JSON format: an envelope as a JSON object with the v1 field names.

Readable and language-neutral. Fields at their defaults are left out, bytes travel as
``{"$b64": ...}`` and object keys starting with ``$`` are escaped (see ``docs/bus.md``).
msgspec encodes and decodes; the standard library's ``json`` is the checked path that names
what is wrong with input the fast path defers (:meth:`JsonSerializer.decode`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Annotated, Any, Final, Literal, cast

import msgspec

from agent_os.amb.envelope import WIRE_VERSION, Envelope
from agent_os.amb.errors import (
    MalformedEnvelope,
    OversizedEnvelope,
    TruncatedEnvelope,
    UnserializablePayload,
    UnsupportedVersion,
)
from agent_os.amb.serializers.schema import (
    DEFAULT_MAX_BYTES,
    FIELDS,
    WIRE_INT_MAX,
    WIRE_INT_MIN,
    WireFields,
    check_subjects,
    envelope_from_fields,
    envelope_from_wire,
    wire_of,
)

_B64_TAG: Final = "$b64"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, name: str) -> bytes:
    if type(text) is not str:
        raise MalformedEnvelope(f"{name} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEnvelope(f"{name} is not valid base64") from exc


def _json_object(pairs: list[tuple[str, Any]]) -> Any:
    if len(pairs) == 1 and pairs[0][0] == _B64_TAG:
        return _unb64(pairs[0][1], "a $b64 value")
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise MalformedEnvelope("a JSON object has a duplicate key")
    for k in obj:
        if k.startswith("$"):  # an escaped key (see _escape_keys): drop the added "$"
            unescaped = {k[1:] if k.startswith("$") else k: v for k, v in obj.items()}
            if len(unescaped) != len(obj):
                raise MalformedEnvelope("a JSON object has a duplicate key (once unescaped)")
            return unescaped
    return obj


# msgpack carries integers in [-2**63, 2**64): a JSON envelope may hold no others, so that it
# can be forwarded in either format (and Python's int() never sees thousands of digits).
_INT_MIN: Final = WIRE_INT_MIN
_INT_MAX: Final = WIRE_INT_MAX
_INT_CHARS: Final = len(str(_INT_MIN))


def _parse_int(text: str) -> int:
    if len(text) > _INT_CHARS:
        raise MalformedEnvelope(f"a JSON integer of {len(text)} digits is out of the 64-bit range")
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise MalformedEnvelope(f"the JSON integer {text} is out of the 64-bit range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedEnvelope(f"the JSON number {text[:40]} does not fit a float")
    return value


def _parse_constant(name: str) -> Any:
    raise MalformedEnvelope(f"{name} is not a JSON value")


# Only a \uD800-\uDFFF escape can put a lone surrogate in decoded JSON (the UTF-8 decode refuses
# encoded ones); such text is checked string by string.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _check_surrogates(value: Any) -> None:
    """Raise MalformedEnvelope if any string in ``value`` (keys too) holds a lone surrogate,
    which no UTF-8 encoder can write: the envelope could be neither signed nor forwarded."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedEnvelope("a JSON string holds an unpaired surrogate") from None
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)


_MAX_DEPTH: Final = 500  # as deep as the msgpack encoder goes


def _to_json(value: Any, depth: int = 0) -> Any:
    """``value`` as the JSON format carries it: bytes as ``{"$b64": ...}``, one ``$`` added in
    front of every object key starting with ``$`` (so a user's ``{"$b64": ...}`` is never read
    back as the bytes tag), tuples as lists. Copies only what changes. Raises
    UnserializablePayload for what JSON cannot carry exactly: NaN and infinities, integers
    outside msgpack's 64-bit range, keys that are not strings, other types, nesting deeper than
    500 levels."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise UnserializablePayload(f"json cannot encode the integer {value}: out of the 64-bit range")
        return value
    if kind is float:
        if not math.isfinite(value):
            raise UnserializablePayload(f"json cannot encode {value}")
        return value
    if depth >= _MAX_DEPTH:
        raise UnserializablePayload("json cannot encode the payload: nested too deeply")
    if kind is dict:
        out = {}
        changed = False
        for k, v in value.items():
            if type(k) is not str:
                raise UnserializablePayload(f"json object keys are strings, got {type(k).__name__}")
            e = _to_json(v, depth + 1)
            if k.startswith("$"):
                k, changed = "$" + k, True
            changed = changed or e is not v
            out[k] = e
        return out if changed else value
    if kind is list or kind is tuple:
        items = []
        same = kind is list
        for v in value:  # a loop, not a comprehension: one frame per level
            e = _to_json(v, depth + 1)
            same = same and e is v
            items.append(e)
        return value if same else items
    if isinstance(value, bytes | bytearray | memoryview):
        return {_B64_TAG: _b64(bytes(value))}
    if isinstance(value, str):  # a str subclass (a str enum ...): its text
        return str.__str__(value)
    if isinstance(value, int) and not isinstance(value, bool):  # an int subclass: its value
        return _to_json(int(value))
    if isinstance(value, float):
        return _to_json(float(value))
    raise UnserializablePayload(f"json cannot encode a {kind.__name__}")


_FIELD_SET: Final = frozenset(FIELDS)
_NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class _JsonSig(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    scheme: str
    key_id: str
    nonce: bytes  # base64 in the text
    value: bytes


class _JsonV1(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """A JSON v1 envelope as this encoder writes it (the fields in wire order, those at their
    defaults left out) and as the fast decode reads it; the same rules as the checked path."""

    v: Literal[1]
    id: _NonEmptyStr
    topic: _NonEmptyStr
    sender: str
    recipient: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    timestamp: int
    expires_at: int | None = None
    priority: int = 0
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    payload: Any
    sig: _JsonSig | None = None


class _JsonV1Full(_JsonV1, omit_defaults=False):
    """The same envelope with every field written: how other producers (and this encoder
    before 2026-12) spell it. The fast decode compares with this spelling when the compact one
    differs, so their envelopes need not take the checked path."""


_ENCODER: Final = msgspec.json.Encoder()
_encode: Final = _ENCODER.encode
_typed_decode: Final = msgspec.json.Decoder(_JsonV1).decode
_astuple: Final = msgspec.structs.astuple
_asdict: Final = msgspec.structs.asdict
_fits_msgpack: Final = msgspec.msgpack.Encoder().encode  # OverflowError past 64-bit integers
_V1: Final = cast("Literal[1]", WIRE_VERSION)


def _plain(obj: _JsonV1, data: bytes) -> bool:
    """True when the typed reading ``obj`` of canonical ``data`` is what the checked path reads:
    no object key starting with ``$`` (only the headers and a map or list payload can hold
    keys: any other object is a struct msgspec refuses unknown keys of), every integer in
    msgpack's 64-bit range."""
    if not (_INT_MIN <= obj.timestamp <= _INT_MAX and _INT_MIN <= obj.priority <= _INT_MAX):
        return False
    if obj.expires_at is not None and not _INT_MIN <= obj.expires_at <= _INT_MAX:
        return False
    payload = obj.payload
    kind = type(payload)
    if (obj.headers or kind is dict or kind is list) and b'"$' in data:
        return False
    if kind is int:
        number: int = payload
        return _INT_MIN <= number <= _INT_MAX
    if kind is dict or kind is list:
        try:
            _fits_msgpack(payload)
        except OverflowError:
            return False
    return True


class JsonSerializer:
    """A JSON object per envelope; readable and language-neutral."""

    name = "json"
    content_type = "application/json"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def encode(self, env: Envelope) -> bytes:
        s = env.sig
        return self._encode(
            cast("Literal[1]", env.v),  # written as it is; only 1 decodes
            env.id,
            env.topic,
            env.sender,
            env.payload,
            env.recipient,
            env.reply_to,
            env.correlation_id,
            env.timestamp,
            env.expires_at,
            env.priority,
            env.headers,
            None if s is None else _JsonSig(s.scheme, s.key_id, s.nonce, s.value),
        )

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
        return self._encode(
            _V1,
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
            None,
        )

    def _encode(
        self,
        v: Literal[1],
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
        sig: _JsonSig | None,
    ) -> bytes:
        """encode() and encode_new(): the fields as JSON, the payload and the headers through
        _to_json unless they are values msgspec writes exactly as they are (text, true/false,
        null; no headers), which need neither escaping nor a check."""
        kind = type(payload)
        try:
            obj = _JsonV1(
                v=v,
                id=id,
                topic=topic,
                sender=sender,
                recipient=recipient,
                reply_to=reply_to,
                correlation_id=correlation_id,
                timestamp=timestamp,
                expires_at=expires_at,
                priority=priority,
                headers=_to_json(headers) if headers else headers,
                payload=payload if kind is str or kind is bool or payload is None else _to_json(payload),
                sig=sig,
            )
        except RecursionError as exc:  # the interpreter's limit came first
            raise UnserializablePayload("json cannot encode the payload: nested too deeply") from exc
        try:
            data = _encode(obj)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a field of the wrong type
            raise UnserializablePayload(f"json cannot encode the envelope: {exc}") from exc
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        return data

    def decode(self, data: bytes) -> Envelope:
        """The envelope of ``data``; raises an :class:`~agent_os.amb.EnvelopeError` subclass."""
        return envelope_from_wire(self.decode_fields(data))

    def decode_fields(self, data: bytes) -> WireFields:
        """The checked fields of ``data`` (no Envelope object yet); raises an
        :class:`~agent_os.amb.EnvelopeError` subclass.

        Fast path: msgspec reads ``data`` against the v1 schema in one pass, and the result is
        taken only when msgspec writes it back to exactly ``data`` (so the input has no
        duplicate key, no escape or number spelling this encoder would not write, and the
        fields in order, those at their defaults left out or every one written), no object
        key starts with ``$``
        (an escaped key or a bytes tag) and every integer fits msgpack's 64 bits. Anything else
        goes to :meth:`decode_checked`, which accepts or names the error; tests check both give
        the same result."""
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        try:
            obj = _typed_decode(data)
            written = _encode(obj) == data or _encode(_JsonV1Full(**_asdict(obj))) == data
            taken = written and _plain(obj, data)
        except Exception:  # refused by msgspec, or out of stack on a deep payload
            taken = False
        if not taken:
            return wire_of(self.decode_checked(data))
        check_subjects(obj.topic, obj.reply_to)
        fields: WireFields = _astuple(obj)
        sig = obj.sig
        if sig is None:
            return fields
        return (*fields[:12], (sig.scheme, sig.key_id, sig.nonce, sig.value))

    def decode_checked(self, data: bytes) -> Envelope:
        """The envelope of ``data`` read by the standard library's ``json`` with every check
        spelled out (the readable path, :meth:`decode_fields` defers to it); raises an
        :class:`~agent_os.amb.EnvelopeError` subclass."""
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
        try:
            text = bytes(data).decode("utf-8")
            obj = json.loads(
                text,
                object_pairs_hook=_json_object,
                parse_int=_parse_int,
                parse_float=_parse_float,
                parse_constant=_parse_constant,
            )
            if _SURROGATE_ESCAPE.search(text):
                _check_surrogates(obj)
        except UnicodeDecodeError as exc:
            raise MalformedEnvelope("a JSON envelope must be UTF-8") from exc
        except json.JSONDecodeError as exc:
            if exc.pos >= len(exc.doc.rstrip()):
                raise TruncatedEnvelope(f"JSON envelope truncated after {len(data)} bytes") from exc
            raise MalformedEnvelope(f"not a JSON envelope: {exc.msg} at {exc.pos}") from exc
        except RecursionError as exc:
            raise MalformedEnvelope("JSON envelope nested too deeply") from exc
        return _envelope_of(obj)


def _envelope_of(obj: Any) -> Envelope:
    """The envelope of a decoded JSON value (an object with the v1 field names), checked."""
    if type(obj) is not dict:
        raise MalformedEnvelope("a JSON envelope must be an object")
    if "v" in obj and obj["v"] != WIRE_VERSION and type(obj["v"]) is int:
        raise UnsupportedVersion(obj["v"])
    unknown = obj.keys() - _FIELD_SET
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
    fields = [obj.get(name) for name in FIELDS]
    fields[9] = obj.get("priority", 0)
    fields[10] = obj.get("headers", {})
    fields[11] = payload
    fields[12] = sig
    return envelope_from_fields(fields)
