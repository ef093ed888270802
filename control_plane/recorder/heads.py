"""Heads of the flight recorder's chain: signed, exported, and checked against the chain.

A head names a record by ``(seq, hash)``; since each hash covers every record before it, a head
kept where the recorder's writer cannot reach proves the chain up to it. A :class:`Head` may be
signed with an ed25519 key (PyNaCl); the recorder writes signed heads into its own chain every
``head_every`` records (and every ``head_interval`` seconds), and exports heads as JSON. The
format, the signed bytes and the rules ``verify`` applies: ``docs/control-plane.md`` (Anchoring
the chain: heads).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from agent_os.control_plane.errors import HeadError, RecorderConfigError

HEAD_FORMAT: Final = "agent-os.flight-recorder.head.v1"
HEAD_EVENT: Final = "signed_head"
HEAD_AGENT: Final = "flight_recorder"
_MAX_TEXT: Final = 4096  # an exported head is ~400 bytes; refuse anything far larger unread
_json: Final = msgspec.json.Encoder(order="sorted").encode


def signed_bytes(seq: int, hash: str, ts: int, every: int) -> bytes:
    """What a head's signature covers: the compact JSON array ``[format, seq, hash, ts, every]``
    as UTF-8 (``["agent-os.flight-recorder.head.v1",50,"ab12...",1733...,1000]``)."""
    return _json([HEAD_FORMAT, seq, hash, ts, every])


@dataclass(frozen=True, slots=True)
class Head:
    """A chain head: record ``seq`` has hash ``hash``. ``ts`` (ns) is when it was taken,
    ``every`` the signer's ``head_every``; ``public_key`` and ``signature`` (hex) are None for
    an unsigned head. Build one with :meth:`FlightRecorder.export_head
    <agent_os.control_plane.recorder.FlightRecorder.export_head>` or read one with
    :meth:`from_json`."""

    seq: int
    hash: str
    ts: int = 0
    every: int = 0
    public_key: str | None = None
    signature: str | None = None

    @property
    def signed(self) -> bool:
        return self.signature is not None

    def as_dict(self) -> dict[str, Any]:
        """The exported form (see :data:`HEAD_FORMAT` and docs/control-plane.md)."""
        return {
            "format": HEAD_FORMAT,
            "seq": self.seq,
            "hash": self.hash,
            "ts": self.ts,
            "every": self.every,
            "public_key": self.public_key,
            "signature": self.signature,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Head:
        """A head from its exported form. Raises HeadError naming what is wrong."""
        if not isinstance(data, Mapping):
            raise HeadError("a head is a JSON object")
        if data.get("format") != HEAD_FORMAT:
            raise HeadError(f"not a flight-recorder head: format must be {HEAD_FORMAT!r}")
        seq, digest, ts, every = data.get("seq"), data.get("hash"), data.get("ts", 0), data.get("every", 0)
        for name, value in (("seq", seq), ("ts", ts), ("every", every)):
            if type(value) is not int or not 0 <= value < 1 << 63:
                raise HeadError(f"head field {name!r} must be an integer in [0, 2**63)")
        if not _is_hex(digest, 64):
            raise HeadError("head field 'hash' must be 64 lowercase hex characters")
        public_key, signature = data.get("public_key"), data.get("signature")
        if (public_key is None) != (signature is None):
            raise HeadError("a signed head has both 'public_key' and 'signature'")
        if public_key is not None and not (_is_hex(public_key, 64) and _is_hex(signature, 128)):
            raise HeadError("'public_key' must be 64 and 'signature' 128 lowercase hex characters")
        return cls(seq, digest, ts, every, public_key, signature)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, text: str | bytes) -> Head:
        """A head from its JSON text. Raises HeadError for anything else."""
        if len(text) > _MAX_TEXT:
            raise HeadError(f"a head is at most {_MAX_TEXT} bytes of JSON")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge integers
            raise HeadError(f"a head is JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """A head from a file written by ``export_head``. Raises HeadError or OSError."""
        with Path(path).open("rb") as fh:
            return cls.from_json(fh.read(_MAX_TEXT + 1))

    def signature_valid(self) -> bool:
        """True when the head is signed and its signature verifies under its own public key
        (which says nothing about who that key is: see :func:`trusted_by`)."""
        if self.public_key is None or self.signature is None:
            return False
        try:
            VerifyKey(bytes.fromhex(self.public_key)).verify(
                signed_bytes(self.seq, self.hash, self.ts, self.every), bytes.fromhex(self.signature)
            )
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True


def trusted_by(head: Head, trusted: frozenset[bytes]) -> bool:
    """True when ``head`` is signed by one of the ``trusted`` public keys (raw 32 bytes)."""
    return (
        head.public_key is not None and bytes.fromhex(head.public_key) in trusted and head.signature_valid()
    )


def sign_head(key: SigningKey, seq: int, hash: str, ts: int, every: int) -> Head:
    """``(seq, hash)`` signed with ``key`` at ``ts``."""
    signature = key.sign(signed_bytes(seq, hash, ts, every)).signature
    return Head(seq, hash, ts, every, bytes(key.verify_key).hex(), signature.hex())


def signing_key(key: bytes | SigningKey) -> SigningKey:
    """An ed25519 signing key from a SigningKey, its 32-byte seed, or a 64-byte libsodium secret
    key (seed + public key, as IATP's key registry holds it). Raises RecorderConfigError."""
    if isinstance(key, SigningKey):
        return key
    if isinstance(key, bytes | bytearray) and len(key) in (32, 64):
        signer = SigningKey(bytes(key[:32]))
        if len(key) == 64 and bytes(signer.verify_key) != bytes(key[32:]):
            raise RecorderConfigError("the 64-byte secret key's public half does not match its seed")
        return signer
    raise RecorderConfigError("signing_key: an ed25519 SigningKey, a 32-byte seed or a 64-byte secret key")


def public_keys(keys: Iterable[bytes | str | VerifyKey]) -> frozenset[bytes]:
    """Raw 32-byte public keys from raw bytes, VerifyKeys, hex or base64 text (IATP's form).
    Raises RecorderConfigError for anything else."""
    out: set[bytes] = set()
    for key in keys:
        raw: bytes | None
        if isinstance(key, VerifyKey | bytes | bytearray):
            raw = bytes(key)
        elif isinstance(key, str):
            raw = _hex_or_b64(key)
        else:
            raw = None
        if raw is None or len(raw) != 32:
            raise RecorderConfigError(f"a trusted key is 32 bytes (raw, hex or base64): {key!r}")
        out.add(raw)
    return frozenset(out)


def _hex_or_b64(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


class HeadRecords:
    """Checks the signed-head records of a chain while ``verify`` reads it, in ``seq`` order.

    Every ``signed_head`` record must name the record just before it (its ``seq`` and hash) and
    carry a valid signature; with ``trusted`` keys, it must be signed by one of them, and no
    stretch of the chain may go unsigned for longer than the signer's ``every`` records (the
    larger of the two heads around the stretch; ``default_every`` where no head says). A writer
    who cannot sign can therefore neither forge a head nor remove the heads after an edit
    without leaving a stretch that is too long.
    """

    def __init__(self, trusted: frozenset[bytes], start_seq: int, default_every: int) -> None:
        self.trusted = trusted
        self.default_every = default_every
        self.signed_heads = 0
        self._covered = start_seq - 1  # the last head record's seq (the chain's start before one)
        self._every: int | None = None  # that head's every

    def see(self, seq: int, event_type: str, data_json: str, prev_hash: str) -> str | None:
        """Why record ``seq`` fails as a head record (None when it is none, or a good one)."""
        if event_type != HEAD_EVENT:
            return None
        try:
            head = Head.from_dict(json.loads(data_json))
        except (HeadError, ValueError, RecursionError):
            return "a signed_head record that is not a head"
        if (head.seq, head.hash) != (seq - 1, prev_hash):
            return f"a signed head that does not name the record before it (it names seq {head.seq})"
        if not head.signature_valid():
            return "a signed head whose signature does not verify (forged)"
        if not self.trusted:
            self.signed_heads += 1
            return None
        if not trusted_by(head, self.trusted):
            return f"a signed head by a key that is not trusted ({head.public_key})"
        gap = self._gap(head.every)
        if seq - self._covered > gap + 1:
            return (
                f"records {self._covered + 1}..{seq - 1} have no signed head (at most {gap} may "
                "follow one): signed heads were removed, or the chain was rewritten"
            )
        self._covered, self._every = seq, head.every
        self.signed_heads += 1
        return None

    def finish(self, last_seq: int) -> str | None:
        """Why the records after the last head fail (None when they are few enough)."""
        if not self.trusted:
            return None
        gap = self._gap(None)
        if last_seq - self._covered > gap:
            return (
                f"records {self._covered + 1}..{last_seq} have no signed head (at most {gap} may "
                "follow one): signed heads were removed, or records were added without the key"
            )
        return None

    def _gap(self, every: int | None) -> int:
        known = [e for e in (self._every, every) if e]
        return max(known) if known else self.default_every
