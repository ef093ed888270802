"""Trust documents: signed edges, certificates and trust roots, and the store that checks them on
entry (``docs/trust.md``, "Trust").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent_os.iatp import _crypto
from agent_os.iatp.canonical import CERT_DOMAIN, EDGE_DOMAIN, pack
from agent_os.iatp.errors import KeyStoreCorrupt, TrustError
from agent_os.iatp.keys import b64, unb64
from agent_os.iatp.registry import KeyRegistry


def check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 <= float(level) <= 1.0:
        raise TrustError(f"trust_level must be a number in [0, 1], got {level!r}")
    return float(level)


def check_permissions(permissions: Any) -> frozenset[str]:
    if isinstance(permissions, str):
        raise TrustError("permissions must be a collection of strings, not one string")
    perms = frozenset(permissions or ())
    if not all(isinstance(p, str) and p for p in perms):
        raise TrustError("permissions must be non-empty strings")
    return perms


@dataclass(frozen=True, slots=True)
class TrustEdge:
    """An explicit, signed trust relation (see ``docs/trust.md``)."""

    from_agent: str
    to_agent: str
    trust_level: float
    permissions: frozenset[str]
    created_at: int
    expires_at: int | None
    key_id: str
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return pack(
            [
                EDGE_DOMAIN,
                self.from_agent,
                self.to_agent,
                float(self.trust_level),
                sorted(self.permissions),
                self.created_at,
                self.expires_at,
                self.key_id,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "edge",
            "from_agent": self.from_agent,
            "to_agent": self.to_agent,
            "trust_level": self.trust_level,
            "permissions": sorted(self.permissions),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "key_id": self.key_id,
            "signature": b64(self.signature),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrustEdge:
        try:
            return cls(
                str(d["from_agent"]),
                str(d["to_agent"]),
                check_level(d["trust_level"]),
                check_permissions(d["permissions"]),
                int(d["created_at"]),
                None if d.get("expires_at") is None else int(d["expires_at"]),
                str(d["key_id"]),
                unb64(d["signature"], "signature"),
            )
        except (KeyError, TypeError, ValueError, KeyStoreCorrupt) as exc:
            raise TrustError(f"malformed trust edge: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Certificate:
    """A root's signed statement binding an agent's key to a trust level (PKI model)."""

    serial: str
    issuer: str
    issuer_key_id: str
    subject: str
    subject_key_id: str
    subject_public_key: bytes
    trust_level: float
    permissions: frozenset[str]
    not_before: int
    not_after: int | None
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return pack(
            [
                CERT_DOMAIN,
                self.serial,
                self.issuer,
                self.issuer_key_id,
                self.subject,
                self.subject_key_id,
                self.subject_public_key,
                float(self.trust_level),
                sorted(self.permissions),
                self.not_before,
                self.not_after,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "certificate",
            "serial": self.serial,
            "issuer": self.issuer,
            "issuer_key_id": self.issuer_key_id,
            "subject": self.subject,
            "subject_key_id": self.subject_key_id,
            "subject_public_key": b64(self.subject_public_key),
            "trust_level": self.trust_level,
            "permissions": sorted(self.permissions),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "signature": b64(self.signature),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Certificate:
        try:
            return cls(
                str(d["serial"]),
                str(d["issuer"]),
                str(d["issuer_key_id"]),
                str(d["subject"]),
                str(d["subject_key_id"]),
                unb64(d["subject_public_key"], "subject_public_key"),
                check_level(d["trust_level"]),
                check_permissions(d["permissions"]),
                int(d["not_before"]),
                None if d.get("not_after") is None else int(d["not_after"]),
                unb64(d["signature"], "signature"),
            )
        except (KeyError, TypeError, ValueError, KeyStoreCorrupt) as exc:
            raise TrustError(f"malformed certificate: {exc}") from exc


class TrustStore:
    """Checked trust documents and roots. ``version`` changes with every change."""

    def __init__(self, registry: KeyRegistry) -> None:
        self.registry = registry
        self.out_edges: dict[str, dict[str, TrustEdge]] = {}
        self.certificates: dict[str, list[Certificate]] = {}  # by subject agent
        self.roots: set[str] = set()
        self.version = 0

    # -- checking ----------------------------------------------------------------------------

    def _check_signed(self, signer: str, key_id: str, data: bytes, signature: bytes, what: str) -> None:
        key = self.registry.keys.get(key_id)
        if key is None or key.agent_id != signer:
            raise TrustError(f"{what} is signed by key {key_id!r}, which is not a known key of {signer!r}")
        if not _crypto.verify(key.public_key, data, signature):
            raise TrustError(f"{what} has a bad signature")

    def signer_usable(self, key_id: str, now_ns: int) -> bool:
        key = self.registry.keys.get(key_id)
        return key is not None and (key.revoked_at is None or now_ns < key.revoked_at)

    def edge_live(self, edge: TrustEdge, now_ns: int) -> bool:
        return (edge.expires_at is None or now_ns < edge.expires_at) and self.signer_usable(
            edge.key_id, now_ns
        )

    def cert_live(self, cert: Certificate, key_id: str | None, now_ns: int) -> bool:
        return (
            cert.issuer in self.roots
            and (key_id is None or cert.subject_key_id == key_id)
            and cert.not_before <= now_ns
            and (cert.not_after is None or now_ns < cert.not_after)
            and self.signer_usable(cert.issuer_key_id, now_ns)
        )

    # -- changes -----------------------------------------------------------------------------

    def add_edge(self, edge: TrustEdge) -> None:
        """Add or replace the edge ``from_agent -> to_agent``; raises TrustError if its signature
        does not verify against a known key of ``from_agent``."""
        self._check_signed(edge.from_agent, edge.key_id, edge.signed_bytes(), edge.signature, "trust edge")
        self.out_edges.setdefault(edge.from_agent, {})[edge.to_agent] = edge
        self.version += 1

    def remove_edge(self, from_agent: str, to_agent: str) -> bool:
        removed = self.out_edges.get(from_agent, {}).pop(to_agent, None) is not None
        self.version += 1
        return removed

    def add_certificate(self, cert: Certificate) -> None:
        """Add a certificate; raises TrustError if the issuer's signature does not verify."""
        self._check_signed(
            cert.issuer, cert.issuer_key_id, cert.signed_bytes(), cert.signature, "certificate"
        )
        self.certificates.setdefault(cert.subject, []).append(cert)
        self.version += 1

    def add_root(self, agent_id: str) -> None:
        self.roots.add(agent_id)
        self.version += 1

    def edge(self, from_agent: str, to_agent: str) -> TrustEdge | None:
        return self.out_edges.get(from_agent, {}).get(to_agent)

    def documents(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = [{"type": "root", "agent_id": r} for r in sorted(self.roots)]
        docs += [e.to_dict() for edges in self.out_edges.values() for e in edges.values()]
        docs += [c.to_dict() for certs in self.certificates.values() for c in certs]
        return docs

    def load(self, documents: list[dict[str, Any]]) -> None:
        """Re-check and add stored documents; raises TrustError for any that fails its check."""
        for doc in documents:
            kind = doc.get("type") if isinstance(doc, dict) else None
            if kind == "root":
                self.add_root(str(doc["agent_id"]))
            elif kind == "edge":
                self.add_edge(TrustEdge.from_dict(doc))
            elif kind == "certificate":
                self.add_certificate(Certificate.from_dict(doc))
            else:
                raise TrustError(f"unknown trust document {doc!r:.80}")
