"""In-process storage for tests and tiny uses: the same semantics as PostgreSQL, exact search.

Rows live in a list that only retention rebuilds; ``memory://NAME`` shares a store in the process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime

from agent_os.emk._store import Filters, Found, Isolation, NamespaceInfo, Scope, may_supersede, visible
from agent_os.emk.errors import (
    AlreadySuperseded,
    ConfigError,
    EmbedderMismatch,
    ForeignSupersedes,
    UnknownSupersedes,
)
from agent_os.emk.records import RetentionRecord, Row

_SHARED: dict[str, MemoryStore] = {}


def memory_store(connection_string: str | None) -> MemoryStore:
    """The store for ``connection_string``: shared for ``memory://NAME``, else a new one."""
    if connection_string and connection_string.startswith("memory://") and connection_string != "memory://":
        return _SHARED.setdefault(connection_string, MemoryStore())
    return MemoryStore()


def _cosine_distance(a: Sequence[float], b: Sequence[float], norm_a: float) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm_b = math.sqrt(math.fsum(y * y for y in b))
    return 1.0 - dot / (norm_a * norm_b)


class MemoryStore:
    exact_only = True

    def __init__(self) -> None:
        self._rows: list[Row] = []
        self._by_id: dict[str, Row] = {}
        self._successor: dict[str, str] = {}
        self._retention: list[RetentionRecord] = []
        self._info: NamespaceInfo | None = None

    async def open(self, info: NamespaceInfo) -> None:
        if self._info is None:
            self._info = info
            return
        if self._info.dimension != info.dimension or self._info.isolation != info.isolation:
            raise ConfigError(
                f"this memory store holds {self._info.dimension}-dimension vectors in "
                f"{self._info.isolation!r} isolation, not {info.dimension} / {info.isolation!r}"
            )
        if self._info.model != info.model:
            raise EmbedderMismatch(f"this memory store was created with model {self._info.model!r}")

    async def close(self) -> None:
        return None

    async def build_index(self, maintenance_work_mem: str) -> None:
        return None  # searches are exact

    @property
    def _isolation(self) -> Isolation:
        assert self._info is not None
        return self._info.isolation

    async def insert(self, rows: Sequence[Row]) -> None:
        # Check the whole batch before changing anything: all or nothing.
        pending: dict[str, Row] = {}
        successors: dict[str, str] = {}
        for row in rows:
            if row.supersedes is None:
                pending[row.id] = row
                continue
            old = self._by_id.get(row.supersedes) or pending.get(row.supersedes)
            if old is None:
                raise UnknownSupersedes(f"no memory {row.supersedes} to supersede", row.supersedes)
            if not may_supersede(old, row, self._isolation):
                raise ForeignSupersedes(
                    f"memory {row.supersedes} belongs to another agent or session", row.supersedes
                )
            if row.supersedes in self._successor or row.supersedes in successors:
                raise AlreadySuperseded(
                    f"memory {row.supersedes} already has a newer version", row.supersedes
                )
            successors[row.supersedes] = row.id
            pending[row.id] = row
        self._rows.extend(rows)
        self._by_id.update(pending)
        self._successor.update(successors)

    def _select(self, scope: Scope, filters: Filters) -> list[Found]:
        out = []
        isolation = self._isolation
        wanted_tags = set(filters.tags)
        for row in self._rows:
            if not visible(row, scope, isolation):
                continue
            successor = self._successor.get(row.id)
            if successor is not None and not filters.include_superseded:
                continue
            if wanted_tags and not wanted_tags.issubset(row.tags):
                continue
            if filters.since is not None and row.created_at < filters.since:
                continue
            if filters.until is not None and row.created_at >= filters.until:
                continue
            if filters.metadata and not _contains(json.loads(row.metadata_json), filters.metadata):
                continue
            out.append(Found(row, successor))
        return out

    async def search(
        self, scope: Scope, vector: Sequence[float], limit: int, filters: Filters, exact: bool
    ) -> list[Found]:
        norm = math.sqrt(math.fsum(x * x for x in vector))
        scored = [
            Found(f.row, f.superseded_by, _cosine_distance(vector, f.row.embedding, norm))
            for f in self._select(scope, filters)
        ]
        scored.sort(key=lambda f: (f.distance, f.row.id))
        return scored[:limit]

    async def query(self, scope: Scope, limit: int, filters: Filters, newest_first: bool) -> list[Found]:
        found = self._select(scope, filters)
        if newest_first:
            found.reverse()
        return found[:limit]

    async def get(self, scope: Scope, record_id: str) -> Found | None:
        row = self._by_id.get(record_id)
        if row is None or not visible(row, scope, self._isolation):
            return None
        return Found(row, self._successor.get(row.id))

    async def history(self, scope: Scope, record_id: str) -> list[Found]:
        chain = []
        current = await self.get(scope, record_id)
        while current is not None:
            chain.append(current)
            if current.row.supersedes is None:
                break
            current = await self.get(scope, current.row.supersedes)
        return chain

    async def apply_retention(
        self, older_than: datetime, agent_id: str | None, reason: str, executed_at: datetime, log_id: str
    ) -> RetentionRecord:
        def expired(row: Row) -> bool:
            return row.created_at < older_than and (agent_id is None or row.agent_id == agent_id)

        gone = {row.id for row in self._rows if expired(row)}
        record = RetentionRecord(
            id=log_id,
            older_than=older_than,
            agent_id=agent_id,
            reason=reason,
            deleted=len(gone),
            executed_at=executed_at,
        )
        self._retention.append(record)
        self._rows = [row for row in self._rows if row.id not in gone]
        for record_id in gone:
            del self._by_id[record_id]
        self._successor = {
            old: new for old, new in self._successor.items() if old not in gone and new not in gone
        }
        return record

    async def retention_log(self) -> list[RetentionRecord]:
        return list(self._retention)


def _contains(doc: object, wanted: object) -> bool:
    """JSON containment, as PostgreSQL's ``jsonb @>`` defines it."""
    if isinstance(wanted, dict):
        return isinstance(doc, dict) and all(k in doc and _contains(doc[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(doc, list) and all(any(_contains(d, w) for d in doc) for w in wanted)
    if isinstance(doc, bool) or isinstance(wanted, bool):
        return doc is wanted
    return bool(doc == wanted)
