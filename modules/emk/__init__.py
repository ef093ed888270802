"""Episodic Memory Kernel: append-only agent memory with semantic search (PostgreSQL + pgvector).

The entry point is :class:`agent_os.emk.EMK`; the guide is ``docs/memory.md``, the error tree
is in :mod:`agent_os.emk.errors`.
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
