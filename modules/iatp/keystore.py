"""Key storage: the :class:`KeyStore` protocol and :class:`MemoryKeyStore`.

IATP keeps its working state in memory and writes every change through a store
(``docs/trust.md``, "Key storage").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(slots=True)
class StoreContents:
    """What a store holds: public agent records, private ed25519 seeds by key id, trust documents."""

    agents: list[dict[str, Any]] = field(default_factory=list)
    private_keys: dict[str, tuple[str, bytes]] = field(default_factory=dict, repr=False)
    trust: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class KeyStore(Protocol):
    """The persistence seam. Methods are synchronous and small; :meth:`open` may be slow (a key
    derivation) and is run in a worker thread. Every method raises :class:`KeyStoreError`
    subclasses on failure."""

    def open(self) -> StoreContents:
        """Unlock the store and return everything it holds."""
        ...

    def save_agent(self, record: dict[str, Any]) -> None:
        """Create or replace an agent's public record (``AgentRecord.to_dict()``)."""
        ...

    def save_private_key(self, key_id: str, agent_id: str, seed: bytes) -> None:
        """Store the 32-byte ed25519 seed of ``key_id`` (belonging to ``agent_id``)."""
        ...

    def delete_private_key(self, key_id: str) -> None:
        """Forget a private key (after rotation or revocation). Missing keys are ignored."""
        ...

    def save_trust(self, documents: list[dict[str, Any]]) -> None:
        """Replace the stored trust documents (edges, certificates, roots)."""
        ...


@runtime_checkable
class WatchedKeyStore(KeyStore, Protocol):
    """A key store that other processes may change while it is open (a directory): IATP's
    :meth:`~agent_os.iatp.IATP.refresh_keys` asks it what changed (``docs/trust.md``,
    "Revocation reaches running verifiers")."""

    def changed_agents(self) -> list[dict[str, Any]]:
        """The public agent records written since the store was opened or last asked (by
        anyone, this process included). Raises KeyStoreError subclasses when they cannot be
        read."""
        ...


class MemoryKeyStore:
    """A key store that keeps everything in this process's memory."""

    def __init__(self) -> None:
        self._agents: dict[str, dict[str, Any]] = {}
        self._keys: dict[str, tuple[str, bytes]] = {}
        self._trust: list[dict[str, Any]] = []

    def open(self) -> StoreContents:
        return StoreContents(
            agents=copy.deepcopy(list(self._agents.values())),
            private_keys=dict(self._keys),
            trust=copy.deepcopy(self._trust),
        )

    def save_agent(self, record: dict[str, Any]) -> None:
        self._agents[record["agent_id"]] = copy.deepcopy(record)

    def save_private_key(self, key_id: str, agent_id: str, seed: bytes) -> None:
        self._keys[key_id] = (agent_id, bytes(seed))

    def delete_private_key(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def save_trust(self, documents: list[dict[str, Any]]) -> None:
        self._trust = copy.deepcopy(documents)

    def __repr__(self) -> str:
        return f"MemoryKeyStore(agents={len(self._agents)}, private_keys={len(self._keys)})"
