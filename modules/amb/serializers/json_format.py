"""The JSON format: an envelope as a JSON object with the v1 field names.

Readable and language-neutral, slower than msgpack. Bytes travel as ``{"$b64": ...}`` and
object keys starting with ``$`` are escaped (see ``docs/bus.md``).
"""

from __future__ import annotations

import base64
import binascii
import json
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
