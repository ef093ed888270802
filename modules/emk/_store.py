"""The storage seam: what EMK asks of a backend, and the isolation rules both backends share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

from agent_os.emk.records import RetentionRecord, Row

Isolation = Literal["agent", "session", "global"]
ISOLATIONS: tuple[Isolation, ...] = ("agent", "session", "global")


@dataclass(frozen=True, slots=True)
class Scope:
    """Who is asking; what it may see and supersede depends on the namespace's isolation
    (:func:`visible`, :func:`may_supersede`; see ``docs/memory.md``)."""

    agent_id: str
    session_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Filters:
    """What a search or a query selects within the caller's scope."""

    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_superseded: bool = False


class Found(NamedTuple):
    """A stored row, the id of its newer version (if any), and its distance (searches only)."""

    row: Row
    superseded_by: str | None
    distance: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceInfo:
    """What a namespace is created with and must be opened with again."""

    dimension: int
    isolation: Isolation
    model: str


def visible(row: Row, scope: Scope, isolation: Isolation) -> bool:
    if isolation == "global":
        return True
    if row.agent_id != scope.agent_id:
        return False
    return isolation == "agent" or row.session_id == scope.session_id


def may_supersede(old: Row, new: Row, isolation: Isolation) -> bool:
    if old.agent_id != new.agent_id:
        return False
    return isolation != "session" or old.session_id == new.session_id


class Store(Protocol):
    """A backend. Every read takes the caller's :class:`Scope` and returns only what it may see;
    ``insert`` is all-or-nothing and raises the SupersedeError subclasses itself."""

    exact_only: bool

    async def open(self, info: NamespaceInfo) -> None: ...

    async def close(self) -> None: ...

    async def build_index(self, maintenance_work_mem: str) -> None: ...

    async def insert(self, rows: Sequence[Row]) -> None: ...

    async def search(
        self, scope: Scope, vector: Sequence[float], limit: int, filters: Filters, exact: bool
    ) -> list[Found]: ...

    async def query(self, scope: Scope, limit: int, filters: Filters, newest_first: bool) -> list[Found]: ...

    async def get(self, scope: Scope, record_id: str) -> Found | None: ...

    async def history(self, scope: Scope, record_id: str) -> list[Found]: ...

    async def apply_retention(
        self, older_than: datetime, agent_id: str | None, reason: str, executed_at: datetime, log_id: str
    ) -> RetentionRecord: ...

    async def retention_log(self) -> list[RetentionRecord]: ...
