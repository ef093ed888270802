"""The EMK facade: validation, embedding, hashing and isolation in front of a storage backend.

Over 400 lines: the facade of the public API (``docs/memory.md``), one class whose methods each
validate and delegate.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

from agent_os.amb import tracing as _tracing
from agent_os.emk._embedded import start_embedded
from agent_os.emk._memory_store import memory_store
from agent_os.emk._postgres import PostgresStore
from agent_os.emk._store import ISOLATIONS, Filters, Found, Isolation, NamespaceInfo, Scope, Store
from agent_os.emk.embeddings import LOCAL_MODEL, Embedder, resolve_embedder
from agent_os.emk.errors import (
    ConfigError,
    EmbeddingError,
    EMKError,
    IntegrityError,
    InvalidInput,
    MissingSession,
    RecordNotFound,
    StateError,
)
from agent_os.emk.records import (
    Limits,
    MemoryRecord,
    NewMemory,
    RetentionRecord,
    Row,
    canonical_metadata,
    check_content,
    check_embedding,
    check_filter,
    check_identifier,
    check_limit,
    check_record_id,
    check_tags,
    check_time,
    content_hash,
    decode_metadata,
    float32_embedding,
    now,
    relevance,
    row_hash,
)

Storage = Literal["embedded", "postgresql", "memory"]
STORAGES: tuple[str, ...] = ("embedded", "postgresql", "postgres", "memory")


class EMK:
    """Episodic Memory Kernel: append-only agent memory with semantic and temporal search.

    Args:
        storage: ``"embedded"`` (default: a private PostgreSQL with pgvector from the
            ``pgserver`` wheel; ``connection_string`` is its data directory),
            ``"postgresql"`` (``connection_string`` is a libpq URI) or ``"memory"`` (in-process;
            ``memory://NAME`` shares a store within the process).
        connection_string: see ``storage``.
        embedding_model: a model name (see :func:`agent_os.emk.embeddings.resolve_embedder`; default the
            local all-MiniLM-L6-v2) or an :class:`~agent_os.emk.embeddings.Embedder`.
        isolation: ``"agent"`` (default), ``"session"`` (every call needs ``session_id``) or
            ``"global"``: what a caller sees (see ``docs/memory.md``).
        namespace: the PostgreSQL schema holding this memory (an identifier); it keeps the
            dimension, isolation and model it was created with.
        limits: size limits on input (:class:`~agent_os.emk.records.Limits`).
        pool_size, ef_search, iterative_scan, settings: PostgreSQL tuning (connections, HNSW
            candidate list, iterative index scans: None = when pgvector has them, extra
            ``SET`` values for each connection).
        defer_index: create a new namespace without its HNSW index, for a bulk load; call
            :meth:`build_index` after loading (until then searches scan exactly).

    Guarantees: memories are never changed or removed except by the recorded
    :meth:`apply_retention`; every record read is checked against its content hash
    (IntegrityError); a batch is stored completely or not at all; every read is restricted to
    the caller's scope.

    Raises ConfigError for an unknown storage, isolation or model.
    """

    def __init__(
        self,
        storage: Storage | str = "embedded",
        connection_string: str | None = None,
        embedding_model: str | Embedder = LOCAL_MODEL,
        isolation: Isolation | str = "agent",
        *,
        namespace: str = "emk",
        limits: Limits | None = None,
        pool_size: int = 4,
        ef_search: int = 40,
        iterative_scan: bool | None = None,
        settings: Mapping[str, str] | None = None,
        defer_index: bool = False,
    ) -> None:
        if storage not in STORAGES:
            raise ConfigError(f"unknown storage {storage!r}: use one of embedded, postgresql, memory")
        if isolation not in ISOLATIONS:
            raise ConfigError(f"unknown isolation {isolation!r}: use one of {', '.join(ISOLATIONS)}")
        if storage in ("postgresql", "postgres") and not connection_string:
            raise ConfigError("postgresql storage needs a connection_string (postgresql://...)")
        self.storage = "postgresql" if storage == "postgres" else storage
        self.connection_string = connection_string
        self.embedder = resolve_embedder(embedding_model)
        self.isolation: Isolation = isolation
        self.namespace = namespace
        self.limits = limits or Limits()
        self.dimension = self.embedder.dimension
        self.rejected: Counter[str] = Counter()
        self.stored = 0
        self._pg_options: dict[str, Any] = {
            "pool_size": pool_size,
            "ef_search": ef_search,
            "iterative_scan": iterative_scan,
            "settings": settings,
            "defer_index": defer_index,
        }
        self._extra = "embedded" if self.storage == "embedded" else "postgres"  # named when missing
        self._store: Store | None = None
        self._server: Any = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        if self.storage != "memory":  # validates the options now
            PostgresStore(connection_string or "", namespace, extra=self._extra, **self._pg_options)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or migrate the namespace, check its dimension/isolation/model.

        Idempotent; the other methods call it on first use. Raises ConfigError,
        EmbedderMismatch, or StorageUnavailable.
        """
        if self._closed:
            raise StateError("this EMK is closed")
        if self._store is not None:
            return
        async with self._open_lock:
            if self._store is not None:
                return
            store: Store
            if self.storage == "memory":
                store = memory_store(self.connection_string)
            else:
                conninfo = self.connection_string or ""
                if self.storage == "embedded":
                    self._server, conninfo = await start_embedded(self.connection_string)
                store = PostgresStore(conninfo, self.namespace, extra=self._extra, **self._pg_options)
            await store.open(
                NamespaceInfo(dimension=self.dimension, isolation=self.isolation, model=self.embedder.model)
            )
            self._store = store

    async def close(self) -> None:
        """Close the connections. Idempotent. The embedded server stops at process exit."""
        self._closed = True
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> EMK:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _ready(self) -> Store:
        if self._store is None:
            await self.open()
        assert self._store is not None
        return self._store

    async def build_index(self, maintenance_work_mem: str = "1GB") -> None:
        """Create the namespace's HNSW index if it is missing (after a ``defer_index`` bulk load).

        Idempotent; a no-op for memory storage. Raises StorageError.
        """
        store = await self._ready()
        await store.build_index(maintenance_work_mem)

    @property
    def exact_search(self) -> bool:
        """True when every search is exact (memory storage, or pgvector without iterative scans)."""
        return self._store is not None and self._store.exact_only

    # -- helpers -----------------------------------------------------------------------------

    def _scope(self, agent_id: object, session_id: object) -> Scope:
        agent = check_identifier(agent_id, "agent_id", self.limits)
        session = None if session_id is None else check_identifier(session_id, "session_id", self.limits)
        if self.isolation == "session" and session is None:
            raise MissingSession("session isolation: pass the caller's session_id")
        return Scope(agent, session)

    def _reject(self, exc: EMKError) -> EMKError:
        """Count a refused call by error class (``emk.rejected``) and hand the error back."""
        self.rejected[type(exc).__name__] += 1
        return exc

    def _record(self, found: Found, verify: bool = True) -> MemoryRecord:
        row, superseded_by, distance = found
        # Unpacked once: a named tuple's field read is a descriptor call.
        id_, agent_id, session_id, content, metadata_json, tags, supersedes, created_at, _, digest, _ = row
        if verify and row_hash(row) != digest:
            raise self._reject(IntegrityError(id_))
        return MemoryRecord(
            id=id_,
            agent_id=agent_id,
            session_id=session_id,
            content=content,
            metadata=decode_metadata(metadata_json),
            tags=tags,
            supersedes=supersedes,
            created_at=created_at,
            content_hash=digest,
            superseded_by=superseded_by,
            relevance=None if distance is None else relevance(distance),
        )

    def _span_attributes(self, agent_id: object, **more: Any) -> dict[str, Any]:
        """The attributes of an EMK span (tracing on; ``docs/observability.md``)."""
        return {
            "agent_os.agent.id": agent_id if isinstance(agent_id, str) else None,
            "agent_os.emk.storage": self.storage,
            "agent_os.emk.isolation": self.isolation,
            **more,
        }

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        attributes = {
            "gen_ai.operation.name": "embeddings",
            "gen_ai.request.model": self.embedder.model,
            "agent_os.emk.texts": len(texts),
        }
        with _tracing.span("emk.embed", attributes):
            vectors = await self.embedder.embed(texts)
        if len(vectors) != len(texts):
            raise EmbeddingError(f"the embedder returned {len(vectors)} vectors for {len(texts)} texts")
        return vectors

    def _filters(
        self,
        tags: Sequence[str] | None,
        metadata: Mapping[str, Any] | None,
        since: datetime | None,
        until: datetime | None,
        include_superseded: bool,
    ) -> Filters:
        return Filters(
            tags=check_tags(tags, self.limits),
            metadata=check_filter(metadata, self.limits),
            since=check_time(since, "since"),
            until=check_time(until, "until"),
            include_superseded=bool(include_superseded),
        )

    async def _prepare(self, items: Sequence[NewMemory]) -> list[Row]:
        checked = []
        for item in items:
            scope = self._scope(item.agent_id, item.session_id)
            content = check_content(item.content, self.limits)
            checked.append(
                (
                    scope,
                    content,
                    canonical_metadata(item.metadata, self.limits),
                    check_tags(item.tags, self.limits),
                    None if item.supersedes is None else check_record_id(item.supersedes, "supersedes"),
                    None if item.embedding is None else check_embedding(item.embedding, self.dimension),
                )
            )
        missing = [i for i, c in enumerate(checked) if c[5] is None]
        if missing:
            vectors = await self._embed([checked[i][1] for i in missing])
            for i, vector in zip(missing, vectors, strict=True):
                c = checked[i]
                checked[i] = (
                    *c[:5],
                    check_embedding(vector, self.dimension, f"the {self.embedder.model} vector"),
                )
        rows = []
        for scope, content, metadata_json, tags, supersedes, embedding in checked:
            assert embedding is not None
            record_id = str(uuid.uuid4())
            created_at = now()
            fields = {
                "id": record_id,
                "agent_id": scope.agent_id,
                "session_id": scope.session_id,
                "content": content,
                "metadata_json": metadata_json,
                "tags": tags,
                "supersedes": supersedes,
                "created_at": created_at,
                "embedding": embedding,
            }
            rows.append(Row(**fields, content_hash=content_hash(**fields)))  # type: ignore[arg-type]
        return rows

    # -- the API -----------------------------------------------------------------------------

    async def store(
        self,
        agent_id: str,
        content: str,
        metadata: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        supersedes: str | None = None,
        session_id: str | None = None,
        *,
        embedding: Sequence[float] | None = None,
    ) -> MemoryRecord:
        """Store one memory and return it (id, content hash, created_at).

        ``supersedes`` names the record this one replaces (it must be the caller's own and not
        already superseded). ``embedding`` skips the model with a precomputed vector.

        Raises EmptyContent, ContentTooLarge, InvalidTag, InvalidMetadata, InvalidEmbedding /
        DimensionMismatch, MissingSession, UnknownSupersedes, ForeignSupersedes,
        AlreadySuperseded, EmbeddingError, StorageError / StorageUnavailable.
        """
        records = await self.store_many(
            [
                NewMemory(
                    agent_id=agent_id,
                    content=content,
                    metadata=metadata,
                    tags=tags or (),
                    supersedes=supersedes,
                    session_id=session_id,
                    embedding=embedding,
                )
            ]
        )
        return records[0]

    async def store_many(self, items: Sequence[NewMemory]) -> list[MemoryRecord]:
        """Store a batch in one transaction: all of it, or (on any error) none of it.

        Every item is checked before anything is embedded or written. A later item may
        supersede an earlier one of the same batch. Raises what :meth:`store` raises.
        """
        store = await self._ready()
        if not items:
            return []
        attributes = self._span_attributes(items[0].agent_id, **{"agent_os.emk.records": len(items)})
        with _tracing.span("emk.store", attributes):
            try:
                rows = await self._prepare(items)
                await store.insert(rows)
            except InvalidInput as exc:
                self._reject(exc)
                raise
        self.stored += len(rows)
        # Hashed a moment ago from these very fields: nothing to verify yet.
        return [self._record(Found(row, None), verify=False) for row in rows]

    async def search(
        self,
        agent_id: str,
        query: str | None = None,
        limit: int = 10,
        min_relevance: float = 0.0,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        include_superseded: bool = False,
        *,
        session_id: str | None = None,
        embedding: Sequence[float] | None = None,
        exact: bool = False,
    ) -> list[MemoryRecord]:
        """The caller's memories closest in meaning to ``query`` (or ``embedding``), best first.

        ``relevance`` on each record is ``1 - cosine_distance / 2`` (1: same direction, 0.5:
        unrelated, 0: opposite); records below ``min_relevance`` are left out. ``tags`` keeps
        records carrying all of them; ``metadata`` keeps records whose metadata contains it
        (JSON containment); ``since`` is inclusive, ``until`` exclusive. ``exact=True`` scans
        instead of using the index (recall 1, slower).

        Raises InvalidInput (bad limit, tags, filter, vector), MissingSession, EmbeddingError,
        IntegrityError, StorageError.
        """
        store = await self._ready()
        attributes = self._span_attributes(
            agent_id, **{"agent_os.emk.limit": limit, "agent_os.emk.exact": exact}
        )
        with _tracing.span("emk.search", attributes) as span:
            try:
                scope = self._scope(agent_id, session_id)
                count = check_limit(limit, self.limits)
                if not isinstance(min_relevance, int | float) or not 0.0 <= min_relevance <= 1.0:
                    raise InvalidInput("min_relevance must be a number between 0 and 1")
                filters = self._filters(tags, metadata, since, until, include_superseded)
                if embedding is not None:
                    vector = float32_embedding(embedding, self.dimension, "query embedding")
                elif isinstance(query, str) and query.strip():
                    (raw,) = await self._embed([check_content(query, self.limits)])
                    vector = float32_embedding(raw, self.dimension, f"the {self.embedder.model} vector")
                else:
                    raise InvalidInput("search needs a non-empty query text or an embedding")
            except InvalidInput as exc:
                self._reject(exc)
                raise
            found = await store.search(scope, vector, count, filters, exact)
            records = [self._record(f) for f in found]
            kept = [r for r in records if r.relevance is not None and r.relevance >= min_relevance]
            if span is not None:
                span.set_attribute("agent_os.emk.results", len(kept))
            return kept

    async def query(
        self,
        agent_id: str,
        since: datetime | None = None,
        until: datetime | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int = 100,
        include_superseded: bool = False,
        *,
        session_id: str | None = None,
        newest_first: bool = True,
    ) -> list[MemoryRecord]:
        """The caller's memories in a time range (``since`` inclusive, ``until`` exclusive),
        newest first by default, with the same tag/metadata filters as :meth:`search`.
        Naive datetimes are local time. Raises InvalidInput, MissingSession, IntegrityError,
        StorageError."""
        store = await self._ready()
        try:
            scope = self._scope(agent_id, session_id)
            count = check_limit(limit, self.limits)
            filters = self._filters(tags, metadata, since, until, include_superseded)
        except InvalidInput as exc:
            self._reject(exc)
            raise
        return [self._record(f) for f in await store.query(scope, count, filters, newest_first)]

    async def get(self, record_id: str, *, agent_id: str, session_id: str | None = None) -> MemoryRecord:
        """One memory by id, superseded or not. Raises RecordNotFound when it does not exist or
        is outside the caller's scope (the two are not told apart), IntegrityError, StorageError."""
        store = await self._ready()
        try:
            scope = self._scope(agent_id, session_id)
            rid = check_record_id(record_id)
        except InvalidInput as exc:
            self._reject(exc)
            raise
        found = await store.get(scope, rid)
        if found is None:
            raise RecordNotFound(f"no memory {rid} visible to agent {scope.agent_id!r}")
        return self._record(found)

    async def history(
        self, record_id: str, *, agent_id: str, session_id: str | None = None
    ) -> list[MemoryRecord]:
        """The record and the versions it superseded, newest first (the chain ends early where
        retention removed a version). Raises RecordNotFound, IntegrityError, StorageError."""
        store = await self._ready()
        try:
            scope = self._scope(agent_id, session_id)
            rid = check_record_id(record_id)
        except InvalidInput as exc:
            self._reject(exc)
            raise
        chain = await store.history(scope, rid)
        if not chain:
            raise RecordNotFound(f"no memory {rid} visible to agent {scope.agent_id!r}")
        return [self._record(f) for f in chain]

    async def apply_retention(
        self, older_than: datetime, *, reason: str, agent_id: str | None = None
    ) -> RetentionRecord:
        """Remove memories created before ``older_than`` (of one agent, or all), and record it.

        The only way memories leave storage. The run is written to the retention log in the same
        transaction as the deletion (PostgreSQL refuses a DELETE without it) and is returned.
        This is an operator's action: it is not offered over the bus. Raises InvalidInput,
        StorageError.
        """
        store = await self._ready()
        when = check_time(older_than, "older_than")
        if when is None:
            raise self._reject(InvalidInput("older_than is required"))
        if not isinstance(reason, str) or not reason.strip():
            raise self._reject(InvalidInput("a retention run needs a reason"))
        agent = None if agent_id is None else check_identifier(agent_id, "agent_id", self.limits)
        return await store.apply_retention(when, agent, reason, now(), str(uuid.uuid4()))

    async def retention_log(self) -> list[RetentionRecord]:
        """Every retention run of the namespace, oldest first."""
        store = await self._ready()
        return await store.retention_log()

    def __repr__(self) -> str:
        return (
            f"EMK(storage={self.storage!r}, namespace={self.namespace!r}, isolation={self.isolation!r}, "
            f"model={self.embedder.model!r}, dimension={self.dimension})"
        )
