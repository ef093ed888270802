"""A key store in a directory, private keys encrypted at rest (argon2id, XSalsa20-Poly1305),
written atomically. Layout and guarantees: ``docs/trust.md``, "Key storage".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Final

import msgpack

from agent_os.iatp import _crypto
from agent_os.iatp.canonical import key_id_for
from agent_os.iatp.errors import (
    IATPConfigError,
    InsecureKeyStore,
    KeyStoreCorrupt,
    KeyStoreError,
    WrongPassphrase,
)
from agent_os.iatp.keys import b64, unb64
from agent_os.iatp.keystore import StoreContents

FORMAT: Final = "iatp-keystore-v1"
KEY_FORMAT: Final = "iatp-key-v1"
_CHECK: Final = b"iatp keystore check v1"


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; the file is created 0600."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InsecureKeyStore(f"{path} is accessible to other users (mode {mode:o}); chmod it to 0600/0700")


class FileKeyStore:
    """Identities and encrypted private keys in a directory (see ``docs/trust.md``).

    Args:
        path: the store's directory (created if missing).
        passphrase: what the encryption key is derived from (str or bytes, not empty).
        kdf_level: argon2id cost for a new store; an existing store keeps its own.

    Raises IATPConfigError for an empty passphrase or unknown level; :meth:`open` raises
    WrongPassphrase, KeyStoreCorrupt, InsecureKeyStore or KeyStoreError.
    """

    def __init__(
        self, path: str | os.PathLike[str], passphrase: str | bytes, kdf_level: str = "moderate"
    ) -> None:
        if not passphrase:
            raise IATPConfigError("a file key store needs a non-empty passphrase")
        if kdf_level not in _crypto.KDF_LEVELS:
            raise IATPConfigError(f"unknown kdf_level {kdf_level!r}; choose one of {_crypto.KDF_LEVELS}")
        self.root = Path(path)
        self._passphrase = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        self._level = kdf_level
        self._key: bytes | None = None
        self._seen: dict[str, tuple[int, int, int]] = {}  # agent file -> (mtime ns, size, inode)

    def __repr__(self) -> str:
        return f"FileKeyStore({str(self.root)!r}, unlocked={self._key is not None})"

    # -- opening -----------------------------------------------------------------------------

    def open(self) -> StoreContents:
        try:
            return self._open()
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyStoreError(f"cannot open key store {self.root}: {exc}") from exc

    def _open(self) -> StoreContents:
        root = self.root
        if not root.exists():
            root.mkdir(parents=True, mode=0o700)
        elif _loose(root) and not any(root.iterdir()):
            os.chmod(root, 0o700)  # an empty directory: tighten it before anything secret lands
        _check_private(root)
        for sub in ("agents", "keys"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
            _check_private(root / sub)
        header = root / "keystore.json"
        if header.exists():
            _check_private(header)
            self._key = self._unlock(json.loads(header.read_text()))
        else:
            salt = _crypto.random_bytes(_crypto.KDF_SALT_BYTES)
            key = _crypto.derive_key(self._passphrase, salt, self._level)
            nonce, check = _crypto.seal(key, _CHECK)
            doc = {
                "format": FORMAT,
                "kdf": "argon2id",
                "level": self._level,
                "salt": b64(salt),
                "check_nonce": b64(nonce),
                "check": b64(check),
            }
            atomic_write(header, json.dumps(doc, indent=1).encode())
            self._key = key
        self._passphrase = b""  # the derived key is all that is needed from now on
        contents = StoreContents()
        for path in sorted((root / "agents").glob("*.json")):
            _check_private(path)
            stamp = _stamp(path)
            contents.agents.append(json.loads(path.read_text()))
            self._seen[path.name] = stamp
        for path in sorted((root / "keys").glob("*.key")):
            _check_private(path)
            key_id, agent_id, seed = self._read_key(path)
            contents.private_keys[key_id] = (agent_id, seed)
        trust = root / "trust.json"
        if trust.exists():
            _check_private(trust)
            docs = json.loads(trust.read_text())
            if not isinstance(docs, list):
                raise KeyStoreCorrupt("trust.json must hold a list")
            contents.trust = docs
        return contents

    def _unlock(self, doc: Any) -> bytes:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kdf") != "argon2id":
            raise KeyStoreCorrupt(f"{self.root / 'keystore.json'} is not an {FORMAT} header")
        level = doc.get("level")
        if level not in _crypto.KDF_LEVELS:
            raise KeyStoreCorrupt(f"unknown KDF level {level!r}")
        key = _crypto.derive_key(self._passphrase, unb64(doc.get("salt"), "salt"), level)
        if (
            _crypto.unseal(
                key, unb64(doc.get("check_nonce"), "check_nonce"), unb64(doc.get("check"), "check")
            )
            != _CHECK
        ):
            raise WrongPassphrase(f"the passphrase does not open the key store {self.root}")
        return key

    def changed_agents(self) -> list[dict[str, Any]]:
        """The agent records whose files changed (written, replaced) since :meth:`open` or the
        last call; see :class:`~agent_os.iatp.keystore.WatchedKeyStore`. Reads only the public
        records (no key derivation). Raises KeyStoreError when the directory or a changed file
        cannot be read, InsecureKeyStore when one is open to other users, KeyStoreCorrupt for
        a file that is not a JSON object."""
        self._require_open()
        try:
            return self._changed_agents()
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyStoreError(f"cannot read the agents of key store {self.root}: {exc}") from exc

    def _changed_agents(self) -> list[dict[str, Any]]:
        agents = self.root / "agents"
        _check_private(agents)
        changed: list[dict[str, Any]] = []
        for path in sorted(agents.glob("*.json")):
            stamp = _stamp(path)
            if self._seen.get(path.name) == stamp:
                continue
            _check_private(path)
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise KeyStoreCorrupt(f"{path} does not hold an agent record")
            changed.append(doc)
            self._seen[path.name] = stamp
        return changed

    def _read_key(self, path: Path) -> tuple[str, str, bytes]:
        assert self._key is not None
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
            raise KeyStoreCorrupt(f"{path} is not an {KEY_FORMAT} file")
        plain = _crypto.unseal(
            self._key, unb64(doc.get("nonce"), "nonce"), unb64(doc.get("ciphertext"), "ciphertext")
        )
        if plain is None:
            raise KeyStoreCorrupt(f"{path} does not decrypt with this store's key (damaged or foreign)")
        try:
            key_id, agent_id, seed = msgpack.unpackb(plain, raw=False)
        except (ValueError, TypeError) as exc:
            raise KeyStoreCorrupt(f"{path} holds a malformed key") from exc
        if (
            not (isinstance(key_id, str) and isinstance(agent_id, str) and isinstance(seed, bytes))
            or len(seed) != 32
        ):
            raise KeyStoreCorrupt(f"{path} holds a malformed key")
        public, _ = _crypto.keypair_from_seed(seed)
        if key_id_for(public) != key_id or path.stem != key_id:
            raise KeyStoreCorrupt(f"{path} holds a key that does not match its name")
        return key_id, agent_id, seed

    # -- writing -----------------------------------------------------------------------------

    def _require_open(self) -> bytes:
        if self._key is None:
            raise KeyStoreError("the key store is not open")
        return self._key

    def _write(self, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise KeyStoreError(f"cannot write {path}: {exc}") from exc

    def save_agent(self, record: dict[str, Any]) -> None:
        self._require_open()
        name = hashlib.blake2b(record["agent_id"].encode(), digest_size=16).hexdigest()
        self._write(self.root / "agents" / f"{name}.json", json.dumps(record, indent=1).encode())

    def save_private_key(self, key_id: str, agent_id: str, seed: bytes) -> None:
        key = self._require_open()
        if not all(c in "0123456789abcdef" for c in key_id) or len(key_id) != 32:
            raise KeyStoreError(f"invalid key id {key_id!r}")
        nonce, ciphertext = _crypto.seal(
            key, msgpack.packb([key_id, agent_id, bytes(seed)], use_bin_type=True)
        )
        doc = {
            "format": KEY_FORMAT,
            "key_id": key_id,
            "agent_id": agent_id,
            "nonce": b64(nonce),
            "ciphertext": b64(ciphertext),
        }
        self._write(self.root / "keys" / f"{key_id}.key", json.dumps(doc, indent=1).encode())

    def delete_private_key(self, key_id: str) -> None:
        self._require_open()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "keys" / f"{key_id}.key")

    def save_trust(self, documents: list[dict[str, Any]]) -> None:
        self._require_open()
        self._write(self.root / "trust.json", json.dumps(documents, indent=1).encode())


def _stamp(path: Path) -> tuple[int, int, int]:
    # An atomic replace gives the file a new inode, so a rewrite within the mtime's resolution
    # is still seen.
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def _loose(path: Path) -> bool:
    return bool(stat.S_IMODE(path.stat().st_mode) & 0o077)
