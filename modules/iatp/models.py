"""Trust models (web, hierarchical, pki): how much a verifier trusts a sender, computed from
checked trust documents, never from the message (``docs/trust.md``, "Trust").
"""

from __future__ import annotations

from typing import Final, Protocol

from agent_os.iatp.trust import TrustStore

ENDORSE: Final = "endorse"


class TrustModel(Protocol):
    """Computes trust levels and permissions from a :class:`~agent_os.iatp.trust.TrustStore`."""

    name: str

    def level(
        self, store: TrustStore, viewer: str | None, sender: str, key_id: str | None, now_ns: int
    ) -> float:
        """How much ``viewer`` trusts ``sender`` (signing with ``key_id``), in [0, 1]."""
        ...

    def permissions(self, store: TrustStore, from_agent: str, to_agent: str, now_ns: int) -> frozenset[str]:
        """What ``from_agent`` grants ``to_agent``."""
        ...


def _direct_permissions(store: TrustStore, from_agent: str, to_agent: str, now_ns: int) -> frozenset[str]:
    edge = store.edge(from_agent, to_agent)
    if edge is None or not store.edge_live(edge, now_ns):
        return frozenset()
    return edge.permissions


class WebOfTrust:
    """Trust along paths of explicit edges, decaying per hop (see ``docs/trust.md``)."""

    name = "web"

    def __init__(self, decay: float = 0.8, max_depth: int = 3) -> None:
        if not 0.0 < decay <= 1.0 or max_depth < 1:
            raise ValueError("decay must be in (0, 1] and max_depth at least 1")
        self.decay = decay
        self.max_depth = max_depth

    def level(
        self, store: TrustStore, viewer: str | None, sender: str, key_id: str | None, now_ns: int
    ) -> float:
        if viewer is None:
            return 0.0
        if viewer == sender:
            return 1.0
        best: dict[str, float] = {viewer: 1.0}
        frontier = {viewer: 1.0}
        for depth in range(1, self.max_depth + 1):
            factor = 1.0 if depth == 1 else self.decay
            following: dict[str, float] = {}
            for node, value in frontier.items():
                for target, edge in store.out_edges.get(node, {}).items():
                    score = value * edge.trust_level * factor
                    if score > best.get(target, 0.0) and store.edge_live(edge, now_ns):
                        best[target] = score
                        following[target] = score
            frontier = following
            if not frontier:
                break
        return best.get(sender, 0.0)

    def permissions(self, store: TrustStore, from_agent: str, to_agent: str, now_ns: int) -> frozenset[str]:
        return _direct_permissions(store, from_agent, to_agent, now_ns)


class HierarchicalTrust:
    """Endorsement by root authorities, optionally delegated (see ``docs/trust.md``)."""

    name = "hierarchical"

    def __init__(self, max_depth: int = 3) -> None:
        if max_depth < 1:
            raise ValueError("max_depth must be at least 1")
        self.max_depth = max_depth

    def level(
        self, store: TrustStore, viewer: str | None, sender: str, key_id: str | None, now_ns: int
    ) -> float:
        if sender in store.roots:
            return 1.0
        best: dict[str, float] = dict.fromkeys(store.roots, 1.0)
        frontier = dict(best)
        for _ in range(self.max_depth):
            following: dict[str, float] = {}
            for node, value in frontier.items():
                for target, edge in store.out_edges.get(node, {}).items():
                    score = value * edge.trust_level
                    if score > best.get(target, 0.0) and store.edge_live(edge, now_ns):
                        best[target] = score
                        if ENDORSE in edge.permissions:  # only delegated authorities endorse further
                            following[target] = score
            frontier = following
            if not frontier:
                break
        return best.get(sender, 0.0)

    def permissions(self, store: TrustStore, from_agent: str, to_agent: str, now_ns: int) -> frozenset[str]:
        if self.level(store, None, to_agent, None, now_ns) <= 0.0:
            return frozenset()
        return _direct_permissions(store, from_agent, to_agent, now_ns)


class PkiTrust:
    """Root-signed certificates for agent keys (see ``docs/trust.md``)."""

    name = "pki"

    def level(
        self, store: TrustStore, viewer: str | None, sender: str, key_id: str | None, now_ns: int
    ) -> float:
        if sender in store.roots:
            return 1.0
        best = 0.0
        for cert in store.certificates.get(sender, ()):
            if cert.trust_level > best and cert.subject == sender and store.cert_live(cert, key_id, now_ns):
                best = cert.trust_level
        return best

    def permissions(self, store: TrustStore, from_agent: str, to_agent: str, now_ns: int) -> frozenset[str]:
        if self.level(store, None, to_agent, None, now_ns) <= 0.0:
            return frozenset()
        return _direct_permissions(store, from_agent, to_agent, now_ns)


def make_model(name: str) -> TrustModel:
    """The trust model called ``name`` (``"web"``, ``"hierarchical"``, ``"pki"``); raises ValueError."""
    models: dict[str, type[WebOfTrust] | type[HierarchicalTrust] | type[PkiTrust]] = {
        "web": WebOfTrust,
        "hierarchical": HierarchicalTrust,
        "pki": PkiTrust,
    }
    try:
        return models[name]()
    except KeyError:
        raise ValueError(f"unknown trust model {name!r}; choose one of {sorted(models)}") from None
