"""How a record's ``data`` rests in SQL storage: compressed and/or encrypted, transparent on read.

The hash chain is defined over the canonical *plaintext* (see :mod:`.records`), so the codec
changes only the bytes at rest: ``verify`` decodes each record and hashes what it decoded.

Stored forms of the ``data`` column (one per record, self-describing):

- text, or UTF-8 bytes starting with ``{``: the canonical JSON itself (no codec, or compression
  did not make it smaller);
- ``0x01`` + raw deflate of the UTF-8 JSON with the preset dictionary :data:`ZDICT_V1`
  (zlib level 1): per-record compression that still pays off on ~200-byte records;
- ``0x02`` + key id (8 bytes) + nonce (24) + XChaCha20-Poly1305 ciphertext (PyNaCl, libsodium)
  of ``0x00`` + JSON or ``0x01`` + deflate. The associated data binds the ciphertext to the
  record's ``seq`` and the key id, so a ciphertext moved to another record does not decrypt.

**Errors.** A record encrypted under another key (its key id differs) or read without a key
raises :class:`~agent_os.control_plane.errors.RecorderKeyError`: a wrong key never yields garbage. A
ciphertext that does not authenticate, or compressed bytes that do not inflate, raise
:class:`~agent_os.control_plane.errors.TamperDetected` naming the record (``verify`` reports it as the
first bad record instead).

**Nonces.** Each codec draws a random 16-byte prefix and counts records in the last 8 bytes, so
nonces never repeat under one key (a 192-bit nonce space makes prefix collisions negligible).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import zlib
from typing import Final

from agent_os.control_plane.errors import RecorderConfigError, RecorderKeyError, TamperDetected

PLAIN: Final = 0x00
DEFLATE: Final = 0x01
SEALED: Final = 0x02
KEY_BYTES: Final = 32
_BRACE: Final = 0x7B  # "{": plaintext JSON stored as bytes

# The preset dictionary of format 0x01 (version 1): the keys and values our records use most.
# Never change it: records written with it must stay readable. A new dictionary needs a new tag.
ZDICT_V1: Final = (
    b'{"agent":"","claimed_sender":"","context":{},"decision":"deny","decision":"allow",'
    b'"direction":"in","direction":"out","message_id":"","name":"","operation":"deliver",'
    b'"operation":"publish","operation":"request","operation":"reply","outcome":"",'
    b'"policy":"","priority":0,"reason":"","resource":"","rule":null,"sender":"",'
    b'"signal":"","status":"completed","trust_level":1.0,"verified":true}'
)


def key_id(key: bytes) -> bytes:
    """The 8-byte id stored beside each ciphertext (a keyed-purpose BLAKE2b of the key)."""
    return hashlib.blake2b(key, digest_size=8, person=b"agentos-fr-key").digest()


class DataCodec:
    """Encodes canonical JSON for storage and decodes it back (see the module docstring).

    Raises RecorderConfigError for a key that is not 32 bytes.
    """

    def __init__(self, compression: bool = True, encryption_key: bytes | None = None) -> None:
        if encryption_key is not None and (
            not isinstance(encryption_key, bytes | bytearray) or len(encryption_key) != KEY_BYTES
        ):
            raise RecorderConfigError(f"encryption_key must be {KEY_BYTES} bytes (nacl.utils.random(32))")
        self.compression = compression
        self._key = bytes(encryption_key) if encryption_key is not None else None
        self._kid = key_id(self._key) if self._key is not None else b""
        self._prefix = os.urandom(16)
        self._counter = itertools.count(1)
        self.active = compression or self._key is not None

    # -- writing ----------------------------------------------------------------------------------

    def _deflate(self, raw: bytes) -> bytes | None:
        c = zlib.compressobj(1, zlib.DEFLATED, -12, 4, zlib.Z_DEFAULT_STRATEGY, ZDICT_V1)
        out = c.compress(raw) + c.flush()
        return out if len(out) + 1 < len(raw) else None

    def encode(self, seq: int, data_json: str) -> str | bytes:
        """The stored form of record ``seq``'s data."""
        if not self.active:
            return data_json
        raw = data_json.encode()
        packed = self._deflate(raw) if self.compression else None
        if self._key is None:
            return data_json if packed is None else b"\x01" + packed
        inner = b"\x00" + raw if packed is None else b"\x01" + packed
        return self._seal(seq, inner)

    def _seal(self, seq: int, inner: bytes) -> bytes:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt as seal

        assert self._key is not None
        nonce = self._prefix + next(self._counter).to_bytes(8, "big")
        aad = seq.to_bytes(8, "big", signed=True) + self._kid
        return b"\x02" + self._kid + nonce + seal(inner, aad, nonce, self._key)

    # -- reading ----------------------------------------------------------------------------------

    def decode(self, seq: int, stored: str | bytes | bytearray | memoryview) -> str:
        """The canonical JSON of record ``seq``. Raises RecorderKeyError (no key or another
        key) or TamperDetected (the stored bytes do not authenticate or inflate)."""
        if isinstance(stored, str):
            return stored
        blob = stored if type(stored) is bytes else bytes(stored)
        if blob[:1] == b"\x01":  # the common case first: compressed
            d = zlib.decompressobj(-12, ZDICT_V1)
            try:
                out = d.decompress(blob[1:])
                if d.eof:
                    return out.decode()
            except (zlib.error, UnicodeDecodeError):
                pass  # reported below with the reason
        if not blob:
            raise TamperDetected(f"record {seq}: empty data", sequence=seq)
        tag = blob[0]
        try:
            if tag == _BRACE:
                return blob.decode()
            if tag == DEFLATE:
                return _inflate(blob[1:]).decode()
            if tag == SEALED:
                return self._open(seq, blob)
        except (zlib.error, UnicodeDecodeError) as exc:
            raise TamperDetected(f"record {seq}: stored data does not decode ({exc})", sequence=seq) from exc
        raise TamperDetected(f"record {seq}: unknown data format 0x{tag:02x}", sequence=seq)

    def _open(self, seq: int, blob: bytes) -> str:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt as unseal
        from nacl.exceptions import CryptoError

        if len(blob) < 33 + 16:
            raise TamperDetected(f"record {seq}: truncated ciphertext", sequence=seq)
        kid, nonce, sealed = blob[1:9], blob[9:33], blob[33:]
        if self._key is None:
            raise RecorderKeyError(f"record {seq} is encrypted: pass the encryption_key that wrote it")
        if kid != self._kid:
            raise RecorderKeyError(
                f"record {seq} was encrypted under another key (key id {kid.hex()}, "
                f"this recorder's is {self._kid.hex()})"
            )
        try:
            inner = unseal(sealed, seq.to_bytes(8, "big", signed=True) + kid, nonce, self._key)
        except CryptoError as exc:
            raise TamperDetected(f"record {seq}: ciphertext does not authenticate", sequence=seq) from exc
        if inner[:1] == b"\x00":
            return inner[1:].decode()
        if inner[:1] == b"\x01":
            return _inflate(inner[1:]).decode()
        raise TamperDetected(f"record {seq}: unknown inner format", sequence=seq)


def _inflate(packed: bytes) -> bytes:
    d = zlib.decompressobj(-12, ZDICT_V1)
    out = d.decompress(packed) + d.flush()
    if not d.eof:
        raise zlib.error("truncated deflate stream")
    return out
