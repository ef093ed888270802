"""The key registry: every known agent and key, and the private keys of the local agents.

State lives in memory, written through the key store. Private keys are held only for a local
agent's current key; imports follow the rotation-statement rule of ``docs/trust.md``
("Identities and keys") and raise :class:`~agent_os.iatp.errors.IdentityConflict` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from agent_os.iatp import _crypto
from agent_os.iatp.canonical import key_id_for
from agent_os.iatp.errors import (
    AgentExists,
    IATPConfigError,
    IdentityConflict,
    KeyStoreCorrupt,
    UnknownAgent,
    UnknownKey,
)
from agent_os.iatp.keys import AgentRecord, KeyRecord
from agent_os.iatp.keystore import KeyStore, StoreContents


class KeyRegistry:
    """Agents, keys and local signing keys. ``version`` changes whenever a key's state does."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.agents: dict[str, AgentRecord] = {}
        self.keys: dict[str, KeyRecord] = {}
        self._signing: dict[str, tuple[str, bytes]] = {}  # agent -> (key id, 64-byte secret key)
        self._owned: set[str] = set()  # agents created here (or loaded with a private key)
        self.version = 0

    def __repr__(self) -> str:
        return f"KeyRegistry(agents={len(self.agents)}, local={sorted(self._signing)})"

    def load(self, contents: StoreContents) -> None:
        """Take over what the store holds; raises KeyStoreCorrupt on inconsistent content."""
        for data in contents.agents:
            record = AgentRecord.from_dict(data)
            self.agents[record.agent_id] = record
            self.keys.update(record.keys)
        for key_id, (agent_id, seed) in contents.private_keys.items():
            key = self.keys.get(key_id)
            if key is None or key.agent_id != agent_id:
                raise KeyStoreCorrupt(f"private key {key_id!r} has no matching public record")
            if self.agents[agent_id].current_key_id == key_id:
                public, secret = _crypto.keypair_from_seed(seed)
                if public != key.public_key:
                    raise KeyStoreCorrupt(f"private key {key_id!r} does not match its public key")
                self._signing[agent_id] = (key_id, secret)
            self._owned.add(agent_id)
        self.version += 1

    # -- lookups (the hot path) --------------------------------------------------------------

    def signing_key(self, agent_id: str) -> tuple[str, bytes] | None:
        """``(key_id, secret_key)`` of a local agent's current key, or None."""
        return self._signing.get(agent_id)

    def is_local(self, agent_id: str) -> bool:
        return agent_id in self._signing

    def is_owned(self, agent_id: str) -> bool:
        """True for an agent created here (or loaded with a private key), even when it cannot
        sign at the moment (its current key was revoked)."""
        return agent_id in self._owned

    def agent(self, agent_id: str) -> AgentRecord:
        try:
            return self.agents[agent_id]
        except KeyError:
            raise UnknownAgent(agent_id) from None

    def key(self, key_id: str) -> KeyRecord:
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKey(f"no key {key_id!r}") from None

    # -- changes -----------------------------------------------------------------------------

    def _new_key(self, agent_id: str, version: int, now_ns: int) -> tuple[KeyRecord, bytes]:
        seed = _crypto.random_bytes(_crypto.SEED_BYTES)
        public, _ = _crypto.keypair_from_seed(seed)
        return KeyRecord(key_id_for(public), agent_id, version, public, now_ns), seed

    def _install(self, record: AgentRecord, key: KeyRecord, seed: bytes) -> None:
        # Private key first: a crash between the two writes leaves an orphan private key (ignored
        # on load only if its public record is missing, which raises), never a public record
        # whose private half is lost.
        self.store.save_private_key(key.key_id, record.agent_id, seed)
        self.store.save_agent(record.to_dict())
        _, secret = _crypto.keypair_from_seed(seed)
        self._signing[record.agent_id] = (key.key_id, secret)
        self._owned.add(record.agent_id)

    def register(self, agent_id: str, metadata: Mapping[str, Any], now_ns: int) -> AgentRecord:
        """Create an agent with a fresh ed25519 key; raises AgentExists or IATPConfigError."""
        if not isinstance(agent_id, str) or not agent_id:
            raise IATPConfigError("agent_id must be a non-empty string")
        if agent_id in self.agents:
            raise AgentExists(f"agent {agent_id!r} is already registered")
        key, seed = self._new_key(agent_id, 1, now_ns)
        record = AgentRecord(agent_id, dict(metadata), {key.key_id: key}, key.key_id, now_ns)
        self._install(record, key, seed)
        self.agents[agent_id] = record
        self.keys[key.key_id] = key
        self.version += 1
        return record

    def rotate(self, agent_id: str, now_ns: int, grace_ns: int) -> KeyRecord:
        """Give a local agent a new current key; the old one retires after ``grace_ns`` (unless
        it is revoked already: then it stays revoked). The old key, while this registry still
        holds it, signs the new key's rotation statement (other processes accept the new key
        on import only with it). Also how a local agent whose key was revoked gets a new one
        (without a statement: nothing valid is left to sign one). Raises UnknownAgent for an
        agent not created here."""
        if agent_id not in self._owned:
            raise UnknownAgent(agent_id, "local identity")
        record = self.agents[agent_id]
        old = record.current
        key, seed = self._new_key(agent_id, max(k.version for k in record.keys.values()) + 1, now_ns)
        held = self._signing.get(agent_id)
        if held is not None and held[0] == old.key_id and old.state(now_ns) == "valid":
            key = replace(key, endorsed_by=old.key_id)
            key = replace(key, endorsement=_crypto.sign(held[1], key.rotation_bytes()))
        retired = record.replace_key(old.key_id, retire_at=_earliest(old.retire_at, now_ns + grace_ns))
        record.with_key(key)
        record.current_key_id = key.key_id
        self._install(record, key, seed)
        self.store.delete_private_key(old.key_id)
        self.keys[old.key_id] = retired
        self.keys[key.key_id] = key
        self.version += 1
        return key

    def retire(self, key_id: str, at_ns: int) -> KeyRecord:
        """Retire a (non-current) key from ``at_ns`` on; raises UnknownKey or IATPConfigError."""
        key = self.key(key_id)
        record = self.agents[key.agent_id]
        if record.current_key_id == key_id:
            raise IATPConfigError("the current key cannot be retired; rotate first")
        updated = record.replace_key(key_id, retire_at=at_ns)
        self.keys[key_id] = updated
        self.store.save_agent(record.to_dict())
        self.version += 1
        return updated

    def revoke(self, key_id: str, at_ns: int, reason: str, now_ns: int) -> KeyRecord:
        """Revoke a key from ``at_ns`` on (an earlier revocation time is kept). If it is a local
        agent's current key, its private key is deleted once the time has come (the signer
        refuses it from then on): the agent cannot sign until :meth:`rotate` gives it a new
        key. Raises UnknownKey."""
        key = self.key(key_id)
        record = self.agents[key.agent_id]
        at = at_ns if key.revoked_at is None else min(at_ns, key.revoked_at)
        updated = record.replace_key(key_id, revoked_at=at, revocation_reason=reason)
        self.keys[key_id] = updated
        self.store.save_agent(record.to_dict())
        if at <= now_ns and self._signing.get(key.agent_id, ("", b""))[0] == key_id:
            del self._signing[key.agent_id]
            self.store.delete_private_key(key_id)
        self.version += 1
        return updated

    def merge_key_states(self, data: Mapping[str, Any]) -> bool:
        """Take the revocations and retirements of an agent record written by another process
        (the watched key store): for each key known here and bound to the same agent, the
        earlier ``revoked_at`` and ``retire_at`` win, so a change only ever makes a key
        stricter; nothing else is taken (no new agents or keys) and nothing is written back.
        True when a key's state changed. Raises KeyStoreCorrupt for a malformed record."""
        incoming = AgentRecord.from_dict(data)
        record = self.agents.get(incoming.agent_id)
        if record is None:
            return False
        changed = False
        for key_id, theirs in incoming.keys.items():
            have = record.keys.get(key_id)
            if have is None or have.agent_id != theirs.agent_id:
                continue
            revoked_at = _earliest(have.revoked_at, theirs.revoked_at)
            retire_at = _earliest(have.retire_at, theirs.retire_at)
            if (revoked_at, retire_at) == (have.revoked_at, have.retire_at):
                continue
            reason = have.revocation_reason
            if revoked_at != have.revoked_at:
                reason = theirs.revocation_reason or reason or "revoked"
            self.keys[key_id] = record.replace_key(
                key_id, revoked_at=revoked_at, retire_at=retire_at, revocation_reason=reason
            )
            changed = True
        if changed:
            self.version += 1
        return changed

    def add_public(
        self, data: Mapping[str, Any], now_ns: int, *, trust_new_keys: bool = False
    ) -> AgentRecord:
        """Import another process's agent identity (public keys only).

        A new agent is added as given (trust on first use). For a known agent, revocations and
        retirements are merged keeping the earliest time (an import never un-revokes a key),
        and new key versions are added only if each carries a rotation statement by a key of
        that agent that this registry holds as valid (not revoked by either copy, not retired
        here) or by another new key so proven; the newest becomes current. ``trust_new_keys``
        (the caller checked the new keys out of band, e.g. after a compromise left no valid
        key to sign a statement) skips that proof, for remote agents only.

        Raises KeyStoreCorrupt for a malformed identity, and IdentityConflict (nothing merged)
        when it would add keys to a local agent, add unproven keys to a known agent, or claim
        a key id that belongs to another agent.
        """
        incoming = AgentRecord.from_dict(data)
        agent_id = incoming.agent_id
        for key_id in incoming.keys:
            bound = self.keys.get(key_id)
            if bound is not None and bound.agent_id != agent_id:
                raise IdentityConflict(
                    f"identity {agent_id!r} claims key {key_id!r}, which belongs to {bound.agent_id!r}"
                )
        existing = self.agents.get(agent_id)
        if existing is None:
            self.agents[agent_id] = incoming
            self.keys.update(incoming.keys)
            merged = incoming
        else:
            new_keys = [k for k in incoming.keys.values() if k.key_id not in existing.keys]
            if new_keys:
                if agent_id in self._owned:
                    raise IdentityConflict(
                        f"{agent_id!r} is a local agent: its keys are made here, never imported"
                    )
                if not trust_new_keys:
                    _check_rotations(existing, incoming, new_keys, now_ns)
            for key in incoming.keys.values():
                have = existing.keys.get(key.key_id)
                if have is None:
                    existing.with_key(key)
                    continue
                existing.replace_key(
                    key.key_id,
                    retire_at=_earliest(have.retire_at, key.retire_at),
                    revoked_at=_earliest(have.revoked_at, key.revoked_at),
                    revocation_reason=have.revocation_reason or key.revocation_reason,
                )
            newest = incoming.keys[incoming.current_key_id]
            if agent_id not in self._owned and newest.version > existing.current.version:
                existing.current_key_id = newest.key_id
            self.keys.update(existing.keys)
            merged = existing
        self.store.save_agent(merged.to_dict())
        self.version += 1
        return merged


def _check_rotations(
    existing: AgentRecord, incoming: AgentRecord, new_keys: list[KeyRecord], now_ns: int
) -> None:
    """Raise IdentityConflict unless every new key is proven by a rotation statement chain that
    starts at a key ``existing`` holds as valid (see :meth:`KeyRegistry.add_public`)."""

    def revoked(key_id: str) -> bool:
        # A revocation in either copy counts: an import may only ever make things stricter.
        return any(
            k is not None and k.revoked_at is not None and k.revoked_at <= now_ns
            for k in (existing.keys.get(key_id), incoming.keys.get(key_id))
        )

    signers = {
        key_id: key
        for key_id, key in existing.keys.items()
        if key.state(now_ns) == "valid" and not revoked(key_id)
    }
    pending = sorted(new_keys, key=lambda k: k.version)
    while pending:
        proven = [k for k in pending if _statement_holds(k, signers.get(k.endorsed_by or ""))]
        if not proven:
            missing = ", ".join(k.key_id for k in pending)
            raise IdentityConflict(
                f"new key(s) {missing} of {existing.agent_id!r} carry no rotation statement by a "
                "key held as valid for it: refused (vouch for them with trust_new_keys=True only "
                "after checking them out of band)"
            )
        for key in proven:
            pending.remove(key)
            if not revoked(key.key_id):
                signers[key.key_id] = key


def _statement_holds(key: KeyRecord, signer: KeyRecord | None) -> bool:
    if signer is None or key.endorsement is None or key.version <= signer.version:
        return False
    return _crypto.verify(signer.public_key, key.rotation_bytes(), key.endorsement)


def _earliest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
