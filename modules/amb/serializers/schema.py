"""The v1 envelope on the wire: its fields in order, and the checks every format applies.

A decoded envelope is first a :data:`WireFields` tuple (what the receive path works on) and
becomes an :class:`~agent_os.amb.Envelope` only when something needs the object. The format
itself is described in ``docs/bus.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from agent_os.amb.envelope import WIRE_VERSION, Envelope, Signature, new_envelope
from agent_os.amb.errors import InvalidSubject, MalformedEnvelope, UnsupportedVersion
from agent_os.amb.subjects import subject_ok, valid_subjects, validate_subject

DEFAULT_MAX_BYTES: Final = 8 * 1024 * 1024
"""Largest encoded envelope accepted by default (8 MiB); brokers may impose a lower limit."""

FIELDS: Final = (
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
WIRE_INT_MIN: Final = -(2**63)
WIRE_INT_MAX: Final = 2**64 - 1
"""The integers an envelope may carry (msgpack's range; the JSON format refuses others too)."""

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
msgspec error) on anything else, which
:meth:`~agent_os.amb.serializers.decoder.Decoder.refused` then explains or accepts."""

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
:meth:`~agent_os.amb.serializers.decoder.Decoder.decode_fields` returns it;
:func:`envelope_from_wire` makes it an Envelope."""


def check_subjects(topic: str, reply_to: str | None) -> None:
    """Raise :class:`~agent_os.amb.MalformedEnvelope` unless ``topic`` is a valid subject and
    ``reply_to`` is empty (no reply wanted) or one (a reply sent there could not be published
    otherwise)."""
    if type(topic) is not str or topic not in valid_subjects:  # a known topic needs no call
        try:
            validate_subject(topic)
        except InvalidSubject as exc:
            raise MalformedEnvelope(f"topic: {exc}") from None
    if reply_to and not subject_ok(reply_to):  # new for each request, checked by its head ("": none)
        try:
            validate_subject(reply_to)
        except InvalidSubject as exc:
            raise MalformedEnvelope(f"reply_to: {exc}") from None


def envelope_from_wire(fields: WireFields) -> Envelope:
    """The Envelope of checked wire fields (see :data:`WireFields`); no checks here.

    Built with :func:`~agent_os.amb.envelope.new_envelope` (no dataclass ``__init__`` call).
    """
    _, id_, topic, sender, recipient, reply_to, corr, ts, exp, prio, headers, payload, sig = fields
    signature = None if sig is None else Signature(sig[0], sig[1], sig[2], sig[3])
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


def _diagnose(fields: list[Any]) -> str:
    """Name the first invalid field of a decoded v1 field list (slow path, errors only)."""
    values = dict(zip(FIELDS, fields, strict=True))
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

    Raises :class:`~agent_os.amb.UnsupportedVersion` for another version and
    :class:`~agent_os.amb.MalformedEnvelope` for a wrong shape or type. Shared by every
    serializer so that all formats are equally strict.
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
            check_subjects(topic, reply_to)
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
    if len(fields) != len(FIELDS):
        return MalformedEnvelope(f"a v1 envelope has {len(FIELDS)} fields, got {len(fields)}")
    return MalformedEnvelope(_diagnose(fields))
