"""Memory records, their content hash (:func:`content_hash`; the format is in
``docs/memory.md``), and the checks every input goes through."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import sys
import uuid
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec

from agent_os.emk.errors import (
    ContentTooLarge,
    DimensionMismatch,
    EmptyContent,
    InvalidEmbedding,
    InvalidInput,
    InvalidMetadata,
    InvalidTag,
)

HASH_VERSION = 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Size limits checked before anything is embedded or written."""

    max_content_bytes: int = 64 * 1024
    max_tags: int = 32
    max_tag_length: int = 128
    max_metadata_bytes: int = 64 * 1024
    max_id_length: int = 256
    max_limit: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class NewMemory:
    """One memory to store with :meth:`EMK.store_many` (the arguments of :meth:`EMK.store`)."""

    agent_id: str
    content: str
    metadata: Mapping[str, Any] | None = None
    tags: Sequence[str] = ()
    supersedes: str | None = None
    session_id: str | None = None
    embedding: Sequence[float] | None = None


class MemoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An immutable memory as stored (a frozen msgspec Struct: ``docs/memory.md``, "Records").

    ``superseded_by`` (the id of the newer version, if any) and ``relevance`` (search only:
    ``1 - cosine_distance / 2``, in [0, 1], 1 for the same direction, 0.5 for unrelated) are
    facts about the record at read time and are not covered by ``content_hash``.
    """

    id: str
    agent_id: str
    session_id: str | None
    content: str
    metadata: Mapping[str, Any]
    tags: tuple[str, ...]
    supersedes: str | None
    created_at: datetime
    content_hash: str
    superseded_by: str | None = None
    relevance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-friendly dict (``created_at`` as ISO-8601 text)."""
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "session_id": self.session_id,
            "content": self.content,
            "metadata": dict(self.metadata),
            "tags": list(self.tags),
            "supersedes": self.supersedes,
            "created_at": self.created_at.isoformat(),
            "content_hash": self.content_hash,
            "superseded_by": self.superseded_by,
            "relevance": self.relevance,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionRecord:
    """One retention run: which memories were removed, when, why, and how many."""

    id: str
    older_than: datetime
    agent_id: str | None
    reason: str
    deleted: int
    executed_at: datetime


class Row(NamedTuple):
    """A record ready to be written, or read back: validated fields, the float32 embedding and
    the hash. (A named tuple: a search builds ten of them, and a frozen dataclass costs
    several times as much to build.)"""

    id: str
    agent_id: str
    session_id: str | None
    content: str
    metadata_json: str
    tags: tuple[str, ...]
    supersedes: str | None
    created_at: datetime
    embedding: tuple[float, ...]
    content_hash: str
    embedding_sha256: str | None = None
    """The embedding's digest when the store computed it instead of returning the vector
    (PostgreSQL: a row read back carries this and an empty ``embedding``)."""


_MICROSECOND = timedelta(microseconds=1)


def micros(ts: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    return (ts - EPOCH) // _MICROSECOND


def embedding_digest(embedding: Sequence[float]) -> str:
    """SHA-256 of the vector as big-endian float32."""
    packed = array("f", embedding)
    if sys.byteorder == "little":
        packed.byteswap()
    return hashlib.sha256(packed.tobytes()).hexdigest()


_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def decode_metadata(text: str) -> Any:
    """The metadata a record's ``metadata_json`` holds (as ``json.loads`` gives it).

    msgspec first, about ten times faster; what it refuses (a lone surrogate's escape, which
    ``json.dumps`` writes and the standard library reads back) goes to ``json.loads``, so the
    result is the same for every text :func:`canonical_metadata` writes."""
    try:
        return _decode_json(text)
    except msgspec.DecodeError:
        return json.loads(text)


def content_hash(
    *,
    id: str,
    agent_id: str,
    session_id: str | None,
    content: str,
    metadata_json: str,
    tags: Sequence[str],
    supersedes: str | None,
    created_at: datetime,
    embedding: Sequence[float] | None = None,
    embedding_sha256: str | None = None,
) -> str:
    """The record's SHA-256 (hex) over the compact JSON array :func:`row_hash` builds (see
    ``docs/memory.md``); the embedding enters it as its :func:`embedding_digest`, given as
    ``embedding_sha256`` when already known (one of the two is required)."""
    if embedding_sha256 is None:
        if embedding is None:
            raise TypeError("content_hash needs the embedding or its digest")
        embedding_sha256 = embedding_digest(embedding)
    return row_hash(
        Row(
            id,
            agent_id,
            session_id,
            content,
            metadata_json,
            tuple(tags),
            supersedes,
            created_at,
            (),
            "",
            embedding_sha256,
        )
    )


def row_hash(row: Row) -> str:
    """The hash :func:`content_hash` describes, of a row (its ``content_hash`` is not read): the
    check of every record read back, so without keyword arguments (a third less time)."""
    id_, agent_id, session_id, content, metadata_json, tags, supersedes, created_at, embedding, _, digest = (
        row
    )
    return _digest(
        (
            HASH_VERSION,
            id_,
            agent_id,
            session_id,
            content,
            metadata_json,
            tags,
            supersedes,
            micros(created_at),
            embedding_digest(embedding) if digest is None else digest,
        )
    )


def _digest(doc: tuple[Any, ...]) -> str:
    try:
        # The same bytes as json.dumps(list(doc), ensure_ascii=False, separators=(",", ":")) in
        # UTF-8 (tests/unit/test_emk_hash.py holds the two to it), several times faster.
        data = _encode_json(doc)
    except (TypeError, ValueError, UnicodeError):  # what msgspec refuses, the reference decides
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


# -- checks -------------------------------------------------------------------------------------


def check_identifier(value: object, what: str, limits: Limits) -> str:
    """An agent or session id: a non-empty string without NUL within the length limit."""
    if not isinstance(value, str) or not value or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    if len(value) > limits.max_id_length:
        raise InvalidInput(f"{what} is longer than {limits.max_id_length} characters")
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    if not _unicode(value):
        raise InvalidInput(f"{what} is not valid Unicode text (lone surrogate)")
    return value


def _unicode(text: str) -> bool:
    """True unless ``text`` holds a lone surrogate, which UTF-8 (and so the database and the
    content hash) cannot carry."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_record_id(value: object, what: str = "record id") -> str:
    """A record id: a UUID in canonical text form. Raises InvalidInput otherwise."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidInput(f"{what} {value[:64]!r} is not a memory id") from None


def check_content(content: object, limits: Limits) -> str:
    if not isinstance(content, str):
        raise InvalidInput("content must be a string")
    if not content.strip():
        raise EmptyContent("content is empty")
    size = len(content.encode("utf-8", "surrogatepass"))
    if size > limits.max_content_bytes:
        raise ContentTooLarge(size, limits.max_content_bytes)
    if "\x00" in content:
        raise InvalidInput("content must not contain NUL characters")
    if not _unicode(content):
        raise InvalidInput("content is not valid Unicode text (lone surrogate)")
    return content


def check_tags(tags: object, limits: Limits) -> tuple[str, ...]:
    """Tags as a sorted tuple without duplicates. Any characters but NUL are allowed: tags are
    always passed to the database as parameters, never spliced into SQL."""
    if tags is None:
        return ()
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise InvalidTag("tags must be a list of strings")
    out = set()
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise InvalidTag(f"tag {tag!r} is not a non-empty string")
        if len(tag) > limits.max_tag_length:
            raise InvalidTag(f"tag {tag[:32]!r}... is longer than {limits.max_tag_length} characters")
        if "\x00" in tag:
            raise InvalidTag("tags must not contain NUL characters")
        if not _unicode(tag):
            raise InvalidTag("tags must be valid Unicode text (no lone surrogate)")
        out.add(tag)
    if len(out) > limits.max_tags:
        raise InvalidTag(f"{len(out)} tags exceed the limit of {limits.max_tags}")
    return tuple(sorted(out))


def _reject_nul(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidMetadata("metadata must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_nul(key)
            _reject_nul(item)
    elif isinstance(value, list):
        for item in value:
            _reject_nul(item)


def canonical_metadata(metadata: object, limits: Limits) -> str:
    """Metadata as canonical JSON text (sorted keys, no NaN). Keys may contain any characters
    but NUL; they are data, never SQL."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise InvalidMetadata("metadata must be a mapping")
    if not all(isinstance(k, str) for k in metadata):
        raise InvalidMetadata("metadata keys must be strings")
    try:
        text = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadata(f"metadata is not JSON: {exc}") from None
    if len(text.encode("utf-8")) > limits.max_metadata_bytes:
        raise InvalidMetadata(f"metadata exceeds {limits.max_metadata_bytes} bytes as JSON")
    _reject_nul(json.loads(text))
    return text


def check_filter(metadata: object, limits: Limits) -> dict[str, Any] | None:
    """A metadata filter (matched by JSON containment). None or empty means no filter."""
    if not metadata:
        return None
    parsed: dict[str, Any] = json.loads(canonical_metadata(metadata, limits))
    return parsed


def check_embedding(vector: object, dimension: int, what: str = "embedding") -> tuple[float, ...]:
    """A vector of ``dimension`` finite numbers, not all zero, rounded to float32."""
    return tuple(float32_embedding(vector, dimension, what))


def float32_embedding(vector: object, dimension: int, what: str = "embedding") -> array[float]:
    """:func:`check_embedding`'s checks, the vector kept as a float32 array (a query vector
    goes to the store as it is: no tuple to build). Raises InvalidEmbedding,
    DimensionMismatch."""
    if isinstance(vector, str | bytes | bytearray | memoryview) or not isinstance(vector, Iterable):
        raise InvalidEmbedding(f"{what} must be a sequence of numbers")
    try:
        # A list or tuple as it is; anything else (a subclass too) read once, by iteration.
        values = vector if type(vector) is list or type(vector) is tuple else tuple(vector)
    except Exception:  # whatever a hostile iterable raises: refused, as anything not numbers
        raise InvalidEmbedding(f"{what} must be a sequence of numbers") from None
    if len(values) != dimension:
        raise DimensionMismatch(len(values), dimension, what)
    # struct converts each value once, at a third of array("f", values)'s cost, and refuses
    # finite values beyond float32 where the array would make them infinite.
    try:
        packed = _float32_packer(dimension).pack(*values)
    except OverflowError:
        raise InvalidEmbedding(f"{what} contains values beyond float32") from None
    except (struct.error, TypeError, ValueError):
        raise InvalidEmbedding(f"{what} must contain only numbers") from None
    f32 = array("f")
    f32.frombytes(packed)
    # The checks run on the float32 values themselves. A NaN or an infinity has every exponent
    # bit set, so the byte holding the sign and the exponent's top 7 bits is 0x7f or 0xff;
    # where no value has such a byte (any value below 2**127 in magnitude) all are finite,
    # else each value is looked at (a float64 sum of float32 values cannot overflow: it is
    # finite iff every value is).
    top = packed[_TOP_BYTE::4]
    if (b"\x7f" in top or b"\xff" in top) and not math.isfinite(sum(f32)):
        raise InvalidEmbedding(f"{what} contains NaN or infinite values")
    if not any(f32):
        raise InvalidEmbedding(f"{what} is all zeros: it has no direction to compare")
    return f32


_TOP_BYTE = 3 if sys.byteorder == "little" else 0
"""Where a native float32's sign and top exponent bits are in its 4 bytes."""


@functools.cache
def _float32_packer(dimension: int) -> struct.Struct:
    return struct.Struct(f"={int(dimension)}f")  # an embedder may give 16.0


def check_limit(limit: object, limits: Limits) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.max_limit:
        raise InvalidInput(f"limit must be an integer between 1 and {limits.max_limit}")
    return limit


def check_time(value: object, what: str) -> datetime | None:
    """A datetime in UTC. A naive datetime is local time, as ``datetime.now()`` gives it."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime")
    return value.astimezone(UTC)


def now() -> datetime:
    """The current time in UTC, truncated to microseconds (what PostgreSQL stores)."""
    return datetime.now(UTC)


def relevance(distance: float) -> float:
    """Cosine distance (0..2) to relevance (1..0)."""
    return max(0.0, min(1.0, 1.0 - distance / 2.0))
