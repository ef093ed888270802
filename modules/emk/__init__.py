"""Episodic Memory Kernel: append-only agent memory with semantic search (PostgreSQL + pgvector).

Example::

    from agent_os.modules import EMK

    async with EMK(storage="memory", embedding_model="hashing") as emk:
        record = await emk.store("agent_123", "User prefers dark mode.", tags=["ui"])
        hits = await emk.search("agent_123", "display settings", limit=5)

See :class:`agent_os.emk.EMK` for the guarantees and :mod:`agent_os.emk.errors` for what can go wrong.
"""

from agent_os.emk.embeddings import (
    Embedder,
    HashingEmbedder,
    LiteLLMEmbedder,
    LocalEmbedder,
    resolve_embedder,
)
from agent_os.emk.errors import (
    AlreadySuperseded,
    ConfigError,
    ContentTooLarge,
    DimensionMismatch,
    EmbedderMismatch,
    EmbeddingError,
    EMKError,
    EmptyContent,
    ForeignSupersedes,
    ImmutableRecord,
    IntegrityError,
    InvalidEmbedding,
    InvalidInput,
    InvalidMetadata,
    InvalidTag,
    MissingSession,
    RecordNotFound,
    StateError,
    StorageError,
    StorageUnavailable,
    SupersedeError,
    UnknownSupersedes,
)
from agent_os.emk.kernel import EMK
from agent_os.emk.records import Limits, MemoryRecord, NewMemory, RetentionRecord

__all__ = [
    "EMK",
    "AlreadySuperseded",
    "ConfigError",
    "ContentTooLarge",
    "DimensionMismatch",
    "EMKError",
    "Embedder",
    "EmbedderMismatch",
    "EmbeddingError",
    "EmptyContent",
    "ForeignSupersedes",
    "HashingEmbedder",
    "ImmutableRecord",
    "IntegrityError",
    "InvalidEmbedding",
    "InvalidInput",
    "InvalidMetadata",
    "InvalidTag",
    "Limits",
    "LiteLLMEmbedder",
    "LocalEmbedder",
    "MemoryRecord",
    "MissingSession",
    "NewMemory",
    "RecordNotFound",
    "RetentionRecord",
    "StateError",
    "StorageError",
    "StorageUnavailable",
    "SupersedeError",
    "UnknownSupersedes",
    "resolve_embedder",
]
