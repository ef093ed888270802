"""The JSON format: an envelope as a JSON object with the v1 field names.

Readable and language-neutral, slower than msgpack. Bytes travel as ``{"$b64": ...}`` and
object keys starting with ``$`` are escaped (see ``docs/bus.md``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Final

from agent_os.amb.envelope import WIRE_VERSION, Envelope
from agent_os.amb.errors import (
    MalformedEnvelope,
    OversizedEnvelope,
    TruncatedEnvelope,
    UnserializablePayload,
    UnsupportedVersion,
)
from agent_os.amb.serializers.schema import DEFAULT_MAX_BYTES, FIELDS, envelope_from_fields

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


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_B64_TAG: _b64(bytes(value))}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
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
        try:
            obj["payload"] = _escape_keys(env.payload)
        except RecursionError as exc:
            raise UnserializablePayload("json cannot encode the payload: nested too deeply") from exc
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
        except (TypeError, ValueError, RecursionError) as exc:
            raise UnserializablePayload(f"json cannot encode the envelope: {exc}") from exc
        if len(data) > self.max_bytes:
            raise OversizedEnvelope(len(data), self.max_bytes)
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
        if type(obj) is not dict:
            raise MalformedEnvelope("a JSON envelope must be an object")
        if "v" in obj and obj["v"] != WIRE_VERSION and type(obj["v"]) is int:
            raise UnsupportedVersion(obj["v"])
        unknown = obj.keys() - set(FIELDS)
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
