"""The exact bytes IATP signs: canonical, domain-separated msgpack arrays (``docs/trust.md``,
"What is signed").

Hot path: the array's header and first three fields (domain, scheme, key or session id) are the
same for every message of one key or session, so :func:`head` packs them once; per message one
msgspec pack of the other 13 fields (:func:`signed_fields`), minus its own array header, is
appended to the head, giving the bytes one pack of the whole list would (the tests check this).
The payload digest and the session MAC start from copies of pre-initialised BLAKE2b states.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from agent_os.amb.envelope import Envelope

ENVELOPE_DOMAIN: Final = "IATP/1 envelope"
SESSION_DOMAIN: Final = "IATP/1 session"
EDGE_DOMAIN: Final = "IATP/1 trust-edge"
CERT_DOMAIN: Final = "IATP/1 certificate"
OFFER_DOMAIN: Final = "IATP/1 session-offer"
ANSWER_DOMAIN: Final = "IATP/1 session-answer"
ROTATION_DOMAIN: Final = "IATP/1 key-rotation"
KEY_ID_DOMAIN: Final = b"iatp-key-id-v1"

UNSIGNED_HEADERS: Final = frozenset({"traceparent", "tracestate", "baggage"})
"""Hop-by-hop trace headers left out of the signature (tracing may rewrite them per hop)."""

_blake2b = hashlib.blake2b
_PAYLOAD_PERSON: Final = b"iatp-payload-v1"
_PAYLOAD_STATE: Final = hashlib.blake2b(digest_size=32, person=_PAYLOAD_PERSON)
_ARRAY16: Final = b"\xdc\x00\x10"  # msgpack array header of the 16 signed fields


# msgspec writes the same msgpack as the msgpack package with ``use_bin_type=True`` (shortest
# forms, str as str, bytes as bin, maps in their order; the tests compare the two), about twice
# as fast, and encodes the ext values the bus decodes (``msgspec.msgpack.Ext``) as ext. (A
# ``msgpack.ExtType``, a named tuple, is written as an array: put ``msgspec.msgpack.Ext`` in
# payloads that carry ext values.) An Encoder keeps no state between calls: one serves every
# thread.
_pack_one: Final = msgspec.msgpack.Encoder().encode


def pack(fields: list[Any]) -> bytes:
    """Canonical msgpack of a field list (see ``docs/trust.md``)."""
    return _pack_one(fields)


def payload_digest(payload: Any) -> bytes:
    """BLAKE2b-256 (personalised ``iatp-payload-v1``) of the payload's msgpack encoding: the
    last signed element of a signature. Raises TypeError/ValueError/OverflowError when msgpack
    cannot encode the payload."""
    h = _PAYLOAD_STATE.copy()
    h.update(_pack_one(payload))
    return h.digest()


def signed_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The headers covered by a signature, as ``(name, value)`` pairs sorted by name (every
    header but :data:`UNSIGNED_HEADERS`)."""
    return sorted(item for item in headers.items() if item[0] not in UNSIGNED_HEADERS)


def head(domain: str, scheme: str, key_id: str) -> bytes:
    """The first bytes of every signed structure of one domain, scheme and key (or session):
    the 16-element array header and the first three fields. Raises TypeError for non-strings."""
    if not (type(domain) is str and type(scheme) is str and type(key_id) is str):
        raise TypeError("domain, scheme and key id must be strings")
    return _ARRAY16 + _pack_one(domain) + _pack_one(scheme) + _pack_one(key_id)


def signed_fields(env: Envelope, nonce: bytes, last: Any) -> bytes:
    """The one definition of the 13 per-message signed elements (nonce, the ten envelope fields
    in their documented order, the signed headers, then ``last``: the payload digest for a
    signature, the payload itself for a session MAC), packed as they follow :func:`head`."""
    headers = env.headers
    packed = _pack_one(
        (
            nonce,
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
            signed_headers(headers) if headers else (),
            last,
        )
    )
    return packed[1:]  # without the 13-element array header (one byte)


def rest_bytes(env: Envelope, nonce: bytes) -> bytes:
    """The signed bytes after :func:`head` for a signature: the nonce, the envelope fields and
    :func:`payload_digest` of the payload (see ``docs/trust.md``). Raises TypeError,
    ValueError or OverflowError when a field cannot be encoded."""
    return signed_fields(env, nonce, payload_digest(env.payload))


def session_rest_bytes(env: Envelope, nonce: bytes) -> bytes:
    """Like :func:`rest_bytes` for a session MAC: the payload itself in place of its digest."""
    return signed_fields(env, nonce, env.payload)


def envelope_bytes(
    env: Envelope, scheme: str, key_id: str, nonce: bytes, domain: str = ENVELOPE_DOMAIN
) -> bytes:
    """The bytes signed (or MACed) for ``env`` under ``scheme``, ``key_id`` and ``nonce``.

    Raises TypeError, ValueError or OverflowError when a field cannot be encoded (hostile
    envelope objects); verification turns that into ``malformed_envelope``.
    """
    return head(domain, scheme, key_id) + rest_bytes(env, nonce)


def key_id_for(public_key: bytes) -> str:
    """The key id of an ed25519 public key: 32 hex digits of its BLAKE2b-128 fingerprint.

    Self-certifying: anyone holding the public key can check that a key id names it.
    """
    return _blake2b(public_key, digest_size=16, person=KEY_ID_DOMAIN).hexdigest()


def session_bytes(env: Envelope, scheme: str, session_id: str, nonce: bytes) -> bytes:
    """The bytes a session MAC covers (see ``docs/trust.md``); raises like :func:`envelope_bytes`."""
    return head(SESSION_DOMAIN, scheme, session_id) + session_rest_bytes(env, nonce)
