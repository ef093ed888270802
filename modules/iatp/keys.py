"""Identities and key records: the public half of what IATP knows about agents.

Key states (valid, retired, revoked) and rotation statements are described in
``docs/trust.md``, "Identities and keys".
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from agent_os.iatp.canonical import ROTATION_DOMAIN, key_id_for, pack
from agent_os.iatp.errors import KeyStoreCorrupt


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeyStoreCorrupt(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyStoreCorrupt(f"{what} is not valid base64") from exc


def iso(ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC with a ``Z`` suffix (microsecond precision)."""
    text = datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat()
    return text.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One public key version of an agent and its lifecycle times (ns since the epoch)."""

    key_id: str
    agent_id: str
    version: int
    public_key: bytes
    created_at: int
    retire_at: int | None = None
    revoked_at: int | None = None
    revocation_reason: str | None = None
    endorsed_by: str | None = None  # the key that signed this key's rotation statement
    endorsement: bytes | None = None  # that signature (see ``docs/trust.md``)

    def rotation_bytes(self) -> bytes:
        """The bytes of this key's rotation statement (signed by key ``endorsed_by``)."""
        return pack(
            [
                ROTATION_DOMAIN,
                self.agent_id,
                self.key_id,
                self.public_key,
                self.version,
                self.created_at,
                self.endorsed_by,
            ]
        )

    def state(self, now_ns: int, message_ns: int | None = None) -> str:
        """``"valid"``, ``"retired"`` or ``"revoked"`` at ``now_ns`` for a message stamped ``message_ns``."""
        if self.revoked_at is not None and (
            now_ns >= self.revoked_at or (message_ns is not None and message_ns >= self.revoked_at)
        ):
            return "revoked"
        if self.retire_at is not None and now_ns >= self.retire_at:
            return "retired"
        return "valid"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "agent_id": self.agent_id,
            "version": self.version,
            "public_key": b64(self.public_key),
            "created_at": self.created_at,
            "retire_at": self.retire_at,
            "revoked_at": self.revoked_at,
            "revocation_reason": self.revocation_reason,
            "endorsed_by": self.endorsed_by,
            "endorsement": None if self.endorsement is None else b64(self.endorsement),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRecord:
        """Parse and check a record; raises KeyStoreCorrupt when it is malformed or its key id
        does not match its public key."""
        try:
            public_key = unb64(data["public_key"], "public_key")
            endorsement = data.get("endorsement")
            record = cls(
                key_id=str(data["key_id"]),
                agent_id=str(data["agent_id"]),
                version=int(data["version"]),
                public_key=public_key,
                created_at=int(data["created_at"]),
                retire_at=_opt_int(data.get("retire_at")),
                revoked_at=_opt_int(data.get("revoked_at")),
                revocation_reason=_opt_str(data.get("revocation_reason")),
                endorsed_by=_opt_str(data.get("endorsed_by")),
                endorsement=None if endorsement is None else unb64(endorsement, "endorsement"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyStoreCorrupt(f"malformed key record: {exc}") from exc
        if len(public_key) != 32 or key_id_for(public_key) != record.key_id:
            raise KeyStoreCorrupt(f"key record {record.key_id!r} does not match its public key")
        return record


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(slots=True)
class AgentRecord:
    """Everything public about one agent: metadata, key versions and which one is current."""

    agent_id: str
    metadata: dict[str, Any]
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    current_key_id: str = ""
    created_at: int = 0

    @property
    def current(self) -> KeyRecord:
        return self.keys[self.current_key_id]

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "metadata": self.metadata,
            "current_key_id": self.current_key_id,
            "created_at": self.created_at,
            "keys": [k.to_dict() for k in self.keys.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentRecord:
        """Parse and check; raises KeyStoreCorrupt."""
        try:
            keys = {k.key_id: k for k in (KeyRecord.from_dict(item) for item in data["keys"])}
            record = cls(
                agent_id=str(data["agent_id"]),
                metadata=dict(data.get("metadata") or {}),
                keys=keys,
                current_key_id=str(data["current_key_id"]),
                created_at=int(data.get("created_at", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyStoreCorrupt(f"malformed agent record: {exc}") from exc
        if record.current_key_id not in keys or any(k.agent_id != record.agent_id for k in keys.values()):
            raise KeyStoreCorrupt(f"agent record {record.agent_id!r} names keys that are not its own")
        return record

    def identity(self) -> Identity:
        return Identity(
            agent_id=self.agent_id,
            public_key=b64(self.current.public_key),
            key_id=self.current_key_id,
            metadata=dict(self.metadata),
            keys=tuple(self.keys.values()),
        )

    def with_key(self, key: KeyRecord) -> None:
        self.keys[key.key_id] = key

    def replace_key(self, key_id: str, **changes: Any) -> KeyRecord:
        updated = replace(self.keys[key_id], **changes)
        self.keys[key_id] = updated
        return updated


@dataclass(frozen=True, slots=True)
class Identity:
    """An agent's public identity, as returned by :meth:`agent_os.iatp.IATP.register_agent`.

    ``public_key`` is the current ed25519 public key in base64, ``key_id`` its fingerprint,
    ``keys`` every key version with its lifecycle. Safe to share: it holds no private material.
    Pass :meth:`to_dict` output to another process's :meth:`agent_os.iatp.IATP.add_identity`.
    """

    agent_id: str
    public_key: str
    key_id: str
    metadata: Mapping[str, Any]
    keys: tuple[KeyRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "metadata": dict(self.metadata),
            "current_key_id": self.key_id,
            "keys": [k.to_dict() for k in self.keys],
        }
