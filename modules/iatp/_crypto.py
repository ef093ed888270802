"""The only module that touches PyNaCl: ed25519, X25519, argon2id and secretbox, failing closed.

If PyNaCl cannot be imported, :data:`AVAILABLE` is false and every function here raises
:class:`~agent_os.iatp.errors.CryptoUnavailable`; in particular :func:`verify` never answers true without
having run the check. Callers that must not raise (verification) turn that error into an
invalid result.
"""

from __future__ import annotations

import os
import threading
from typing import Final

from agent_os.iatp.errors import CryptoUnavailable

_IMPORT_ERROR: BaseException | None
try:
    import nacl.bindings as _bindings
    import nacl.exceptions as _exceptions
    import nacl.pwhash.argon2id as _argon2id
    import nacl.secret as _secret
except ImportError as exc:  # fail closed: nothing signs, nothing verifies
    AVAILABLE = False
    _IMPORT_ERROR = exc
else:
    AVAILABLE = True
    _IMPORT_ERROR = None

SIGNATURE_BYTES: Final = 64
PUBLIC_KEY_BYTES: Final = 32
SEED_BYTES: Final = 32
KDF_SALT_BYTES: Final = 16
SECRETBOX_NONCE_BYTES: Final = 24

# argon2id cost levels (libsodium's names). "interactive": 64 MiB, 2 passes; "moderate":
# 256 MiB, 3 passes; "sensitive": 1 GiB, 4 passes.
KDF_LEVELS: Final = ("interactive", "moderate", "sensitive")


def _require() -> None:
    if not AVAILABLE:
        raise CryptoUnavailable(_IMPORT_ERROR)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


class _Pool(threading.local):
    """Per-thread operating-system randomness, drawn 4 KiB at a time."""

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0


_pool = _Pool()


def _forget_pool() -> None:
    _pool.data, _pool.pos = b"", 0  # a forked child must not repeat its parent's nonces


os.register_at_fork(after_in_child=_forget_pool)


def random_nonce(n: int) -> bytes:
    """``n`` (at most 4096) bytes from ``os.urandom``, served from a per-thread pool: each
    byte is handed out once, and a forked child starts with an empty pool."""
    pool = _pool
    pos = pool.pos
    data = pool.data
    if pos + n > len(data):
        data = pool.data = os.urandom(4096)
        pos = 0
    pool.pos = pos + n
    return data[pos : pos + n]


def keypair_from_seed(seed: bytes) -> tuple[bytes, bytes]:
    """Return ``(public_key, secret_key)`` (32 and 64 bytes) for a 32-byte ed25519 seed."""
    _require()
    pk, sk = _bindings.crypto_sign_seed_keypair(seed)
    return bytes(pk), bytes(sk)


def sign(secret_key: bytes, message: bytes) -> bytes:
    """The 64-byte ed25519 signature of ``message``."""
    if not AVAILABLE:
        _require()
    signed: bytes = _bindings.crypto_sign(message, secret_key)
    return signed[:SIGNATURE_BYTES]


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True only if ``signature`` is a valid ed25519 signature of ``message`` by ``public_key``.

    Wrong lengths and garbage give False; a missing PyNaCl raises CryptoUnavailable.
    """
    if not AVAILABLE:
        _require()
    if len(signature) != SIGNATURE_BYTES or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        _bindings.crypto_sign_open(signature + message, public_key)
    except (_exceptions.BadSignatureError, _exceptions.ValueError, _exceptions.TypeError):
        return False
    return True


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh ephemeral X25519 ``(public, secret)`` pair."""
    _require()
    pk, sk = _bindings.crypto_kx_keypair()
    return bytes(pk), bytes(sk)


def x25519(secret: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret; raises ValueError for a low-order (all-zero result) point."""
    _require()
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise ValueError("an X25519 public key has 32 bytes")
    try:
        shared = bytes(_bindings.crypto_scalarmult(secret, peer_public))
    except _exceptions.RuntimeError as exc:  # libsodium refuses low-order points
        raise ValueError("X25519 with a low-order point") from exc
    if shared == bytes(32):
        raise ValueError("X25519 with a low-order point")
    return shared


def derive_key(passphrase: bytes, salt: bytes, level: str) -> bytes:
    """A 32-byte key from ``passphrase`` with argon2id at libsodium's ``level`` costs."""
    _require()
    if level not in KDF_LEVELS:
        raise ValueError(f"unknown KDF level {level!r}; choose one of {KDF_LEVELS}")
    ops = getattr(_argon2id, f"OPSLIMIT_{level.upper()}")
    mem = getattr(_argon2id, f"MEMLIMIT_{level.upper()}")
    return bytes(_argon2id.kdf(32, passphrase, salt, opslimit=ops, memlimit=mem))


def seal(key: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """XSalsa20-Poly1305 encrypt; returns ``(nonce, ciphertext)``."""
    _require()
    nonce = os.urandom(SECRETBOX_NONCE_BYTES)
    box = _secret.SecretBox(key)
    return nonce, bytes(box.encrypt(plaintext, nonce).ciphertext)


def unseal(key: bytes, nonce: bytes, ciphertext: bytes) -> bytes | None:
    """Decrypt and authenticate; None when the key is wrong or the data was changed."""
    _require()
    try:
        return bytes(_secret.SecretBox(key).decrypt(ciphertext, nonce))
    except (_exceptions.CryptoError, _exceptions.ValueError, _exceptions.TypeError):
        return None
