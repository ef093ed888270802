"""The errors of the Episodic Memory Kernel.

Every error EMK raises derives from :class:`EMKError`::

    EMKError
    ├── ConfigError (ValueError)             bad option, unknown storage or model, schema mismatch
    │   └── EmbedderMismatch                 the namespace was created with another embedding model
    ├── StateError (RuntimeError)            call made on a closed EMK
    ├── InvalidInput (ValueError)            bad input from the caller; nothing was stored
    │   ├── EmptyContent                     content is empty or only whitespace
    │   ├── ContentTooLarge                  content larger than ``Limits.max_content_bytes``
    │   ├── InvalidTag                       a tag is not a short non-empty string
    │   ├── InvalidMetadata                  metadata is not a small JSON object with string keys
    │   ├── InvalidEmbedding                 a vector has NaN/inf values or no direction
    │   │   └── DimensionMismatch            a vector's dimension differs from the namespace's
    │   ├── MissingSession                   ``session`` isolation needs a ``session_id``
    │   └── SupersedeError                   the ``supersedes`` reference is not allowed
    │       ├── UnknownSupersedes (LookupError)     no record has that id
    │       ├── ForeignSupersedes (PermissionError) the record belongs to another agent/session
    │       └── AlreadySuperseded                   the record already has a newer version
    ├── RecordNotFound (LookupError)         no record with that id is visible to the caller
    ├── IntegrityError                       a stored record does not match its content hash
    ├── ImmutableRecord                      the database refused an UPDATE/DELETE/TRUNCATE
    ├── EmbeddingError                       the embedding model failed or answered nonsense
    └── StorageError                         the database failed; the operation was rolled back
        └── StorageUnavailable (ConnectionError)  the connection was lost or refused
"""

from __future__ import annotations


class EMKError(Exception):
    """Root of every error raised by the Episodic Memory Kernel."""


class ConfigError(EMKError, ValueError):
    """An option is invalid, or the storage does not match the configuration."""


class EmbedderMismatch(ConfigError):
    """The namespace was created with a different embedding model than the one configured."""


class StateError(EMKError, RuntimeError):
    """The EMK was used after ``close()``."""


class InvalidInput(EMKError, ValueError):
    """The caller's input was refused before anything was written."""


class EmptyContent(InvalidInput):
    """The content is empty or only whitespace."""


class ContentTooLarge(InvalidInput):
    """The content is larger than the configured limit (UTF-8 bytes)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"content of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidTag(InvalidInput):
    """A tag is not a non-empty string within the length limit, or there are too many tags."""


class InvalidMetadata(InvalidInput):
    """Metadata is not a JSON object with string keys within the size limit."""


class InvalidEmbedding(InvalidInput):
    """A vector has non-finite values or is all zeros (it has no direction to compare)."""


class DimensionMismatch(InvalidEmbedding):
    """A vector's dimension differs from the dimension of the namespace's vectors."""

    def __init__(self, got: int, expected: int, what: str = "vector") -> None:
        super().__init__(f"{what} has {got} dimensions, the memory store has {expected}")
        self.got = got
        self.expected = expected


class MissingSession(InvalidInput):
    """``session`` isolation was configured but the call carries no ``session_id``."""


class SupersedeError(InvalidInput):
    """The record named in ``supersedes`` cannot be superseded by this caller."""

    def __init__(self, message: str, record_id: str) -> None:
        super().__init__(message)
        self.record_id = record_id


class UnknownSupersedes(SupersedeError, LookupError):
    """No record has the id given in ``supersedes``."""


class ForeignSupersedes(SupersedeError, PermissionError):
    """The record belongs to another agent (or, in ``session`` isolation, another session)."""


class AlreadySuperseded(SupersedeError):
    """The record already has a newer version; supersede the newest one instead."""


class RecordNotFound(EMKError, LookupError):
    """No record with this id is visible to the caller (absent, or outside its isolation scope)."""


class IntegrityError(EMKError):
    """A record read from storage does not match its content hash: it was altered outside EMK."""

    def __init__(self, record_id: str) -> None:
        super().__init__(f"memory {record_id} does not match its content hash: it was altered in storage")
        self.record_id = record_id


class ImmutableRecord(EMKError):
    """The database refused to change or remove a memory (memories are append-only)."""


class EmbeddingError(EMKError):
    """The embedding model failed, or returned something that is not one vector per text."""


class StorageError(EMKError):
    """The database failed; the operation was rolled back and nothing of it was stored."""


class StorageUnavailable(StorageError, ConnectionError):
    """The database cannot be reached, or the connection was lost during the operation."""
