"""EMK's own logic without a database: hashes, input checks, embedders, memory storage details."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from array import array
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_os.emk import (
    EMK,
    ConfigError,
    DimensionMismatch,
    HashingEmbedder,
    IntegrityError,
    InvalidEmbedding,
    InvalidInput,
    InvalidTag,
    LiteLLMEmbedder,
    LocalEmbedder,
    StateError,
    resolve_embedder,
)
from agent_os.emk._memory_store import MemoryStore, _contains
from agent_os.emk.records import (
    Limits,
    MemoryRecord,
    canonical_metadata,
    check_embedding,
    check_tags,
    check_time,
    content_hash,
    decode_metadata,
    float32_embedding,
    micros,
    relevance,
)
from tests.support.closing import Closing

FIELDS: dict[str, Any] = {
    "id": "6f1c1a53-9a53-4a1e-9d7e-1f0f7b9c7a10",
    "agent_id": "agent_123",
    "session_id": None,
    "content": "User prefers dark mode.",
    "metadata_json": '{"type":"preference"}',
    "tags": ("ui", "user_preference"),
    "supersedes": None,
    "created_at": datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC),
    "embedding": (0.5, -0.25, 1.0),
}


def test_content_hash_is_the_documented_sha256() -> None:
    doc = [
        1,
        FIELDS["id"],
        "agent_123",
        None,
        "User prefers dark mode.",
        '{"type":"preference"}',
        ["ui", "user_preference"],
        None,
        1705314600123456,
        hashlib.sha256(struct.pack(">3f", 0.5, -0.25, 1.0)).hexdigest(),
    ]
    expected = hashlib.sha256(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
    assert content_hash(**FIELDS) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "6f1c1a53-9a53-4a1e-9d7e-1f0f7b9c7a11"),
        ("agent_id", "agent_124"),
        ("session_id", "s1"),
        ("content", "User prefers light mode."),
        ("metadata_json", '{"type":"fact"}'),
        ("tags", ("ui",)),
        ("supersedes", "6f1c1a53-9a53-4a1e-9d7e-1f0f7b9c7a12"),
        ("created_at", FIELDS["created_at"] + timedelta(microseconds=1)),
        ("embedding", (0.5, -0.25, 1.0000001)),
    ],
)
def test_every_field_is_covered_by_the_hash(field: str, value: Any) -> None:
    assert content_hash(**(FIELDS | {field: value})) != content_hash(**FIELDS)


def test_a_memory_record_is_frozen_and_compared_by_its_fields() -> None:
    fields: dict[str, Any] = {
        "id": "6f1c1a53-9a53-4a1e-9d7e-1f0f7b9c7a10",
        "agent_id": "agent_123",
        "session_id": None,
        "content": "User prefers dark mode.",
        "metadata": {"type": "preference"},
        "tags": ("ui",),
        "supersedes": None,
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        "content_hash": "a" * 64,
    }
    record = MemoryRecord(**fields)
    assert record == MemoryRecord(**fields)
    assert record != MemoryRecord(**{**fields, "content": "other"})
    assert (record.superseded_by, record.relevance) == (None, None)
    with pytest.raises(AttributeError):
        record.content = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        MemoryRecord(*fields.values())  # type: ignore[call-arg]  # keywords only
    assert msgspec.structs.replace(record, relevance=0.5).relevance == 0.5
    assert record.to_dict()["created_at"] == "2026-01-02T03:04:05.000006+00:00"


def test_micros_is_exact() -> None:
    assert micros(datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == 1
    assert micros(datetime(2262, 1, 1, tzinfo=UTC)) == 9_214_646_400_000_000


def test_embeddings_are_rounded_to_float32_and_checked() -> None:
    vec = check_embedding([0.1, 2, -3.5], 3)
    assert vec == struct.unpack("<3f", struct.pack("<3f", 0.1, 2.0, -3.5))
    assert isinstance(vec, tuple)
    with pytest.raises(InvalidEmbedding):
        check_embedding("abc", 3)
    with pytest.raises(InvalidEmbedding):
        check_embedding([1.0, float("-inf"), 1.0], 3)
    with pytest.raises(InvalidEmbedding):
        check_embedding([1.0, None, 1.0], 3)


def test_a_query_vector_is_checked_alike_and_kept_as_float32() -> None:
    vec = float32_embedding([0.1, 2, -3.5], 3)
    assert vec.typecode == "f"
    assert tuple(vec) == check_embedding([0.1, 2, -3.5], 3)
    for bad in ("abc", [1.0, float("nan"), 1.0], [0.0, 0.0, 0.0], [1e39, 1.0, 1.0]):
        with pytest.raises(InvalidEmbedding):
            float32_embedding(bad, 3)


def _float32_reference(values: list[Any]) -> tuple[float, ...] | None:
    """What float32_embedding keeps, written the plain way: None where it must refuse."""
    try:
        f32 = [struct.unpack("f", struct.pack("f", v))[0] for v in values]
    except (struct.error, OverflowError, TypeError):
        return None
    if not all(math.isfinite(x) for x in f32) or not any(f32):
        return None
    return tuple(f32)


_FLOAT32_MAX = struct.unpack("f", b"\xff\xff\x7f\x7f")[0]


@given(
    st.lists(
        st.one_of(
            st.floats(width=32),  # NaN, infinities, zeros and subnormals among them
            st.floats(allow_nan=True, allow_infinity=True),  # beyond float32 too
            st.sampled_from([_FLOAT32_MAX, -_FLOAT32_MAX, 2.0**127, -(2.0**128), 1e39, -0.0, 5e-324]),
            st.integers(-(2**130), 2**130),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_vector_is_kept_or_refused_as_the_plain_float32_check_says(values: list[Any]) -> None:
    expected = _float32_reference(values)
    if expected is None:
        with pytest.raises(InvalidEmbedding):
            float32_embedding(values, len(values))
    else:
        assert tuple(float32_embedding(values, len(values))) == expected
        assert tuple(float32_embedding(iter(values), len(values))) == expected


def test_float32_boundaries_and_other_inputs() -> None:
    # The largest float32 values are finite, though their exponent byte looks like an infinity's.
    assert tuple(float32_embedding([_FLOAT32_MAX, -_FLOAT32_MAX, 2.0**127], 3)) == (
        _FLOAT32_MAX,
        -_FLOAT32_MAX,
        2.0**127,
    )
    for bad in ([1.0, 2.0**128], [float("inf"), 1.0], [1.0, -1e39], [-0.0, 0.0], [1.0, "2"], [b"ab", 1.0]):
        with pytest.raises(InvalidEmbedding):
            float32_embedding(bad, 2)
    with pytest.raises(DimensionMismatch):
        float32_embedding((x for x in [1.0, 2.0, 3.0]), 2)
    array_in = float32_embedding(array("d", [0.5, -0.25]), 2)
    assert tuple(array_in) == (0.5, -0.25)

    class Number:
        def __float__(self) -> float:
            return 0.75

    assert tuple(float32_embedding([Number(), 1], 2)) == (0.75, 1.0)


def test_hostile_vectors_are_refused_with_the_embedding_error() -> None:
    class BadIter:
        def __iter__(self) -> Any:
            return 5

    class RaisingIter:
        def __iter__(self) -> Any:
            raise RuntimeError("no")

    class LyingList(list[float]):
        def __len__(self) -> int:
            raise RuntimeError("no")

    def text_inside() -> Any:
        yield 1.0
        yield "x"

    import numpy as np

    for bad in (
        np.array(1.0),
        BadIter(),
        RaisingIter(),
        text_inside(),
        bytearray(b"\x01\x02"),
        memoryview(b"ab"),
    ):
        with pytest.raises(InvalidEmbedding):
            float32_embedding(bad, 2)
    with pytest.raises(InvalidEmbedding):  # a subclass is copied, which asks its __len__
        float32_embedding(LyingList([1.0, 2.0]), 2)
    # A dimension given as a float (an embedder's 16.0) still fits.
    assert tuple(float32_embedding([1.0, 0.5], 2.0)) == (1.0, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "metadata",
    [
        {"a": 1, "b": [1.5, None, True], "c": {"d": "x"}},
        {"big": 2**100, "tiny": 5e-324, "huge": 1.7976931348623157e308, "neg": -0.0},
        {"emoji": "\U0001f600", "lone": "\ud800x", "nul-free": "\u00e9\n\t\"'"},
        {},
    ],
)
def test_stored_metadata_decodes_as_the_standard_library_reads_it(metadata: dict[str, Any]) -> None:
    # msgspec reads it first; a lone surrogate's escape, which msgspec refuses, falls back.
    text = canonical_metadata(metadata, Limits())
    decoded = decode_metadata(text)
    assert decoded == json.loads(text)
    assert json.dumps(decoded, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)


def test_metadata_is_canonical_json() -> None:
    limits = Limits()
    assert canonical_metadata({"b": 1, "a": {"d": [1.5, None], "c": True}}, limits) == (
        '{"a":{"c":true,"d":[1.5,null]},"b":1}'
    )
    assert canonical_metadata(None, limits) == "{}"
    assert json.loads(canonical_metadata({"big": 1e20}, limits)) == {"big": 1e20}


def test_tags_are_sorted_and_unique() -> None:
    assert check_tags(["b", "a", "b"], Limits()) == ("a", "b")
    assert check_tags(None, Limits()) == ()


def test_times_become_utc_and_naive_means_local() -> None:
    aware = datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert check_time(aware, "since") == datetime(2024, 1, 1, 10, tzinfo=UTC)
    naive = datetime(2024, 6, 1, 12)
    assert check_time(naive, "since") == naive.astimezone(UTC)
    assert check_time(None, "since") is None


def test_relevance_maps_cosine_distance_to_0_1() -> None:
    assert relevance(0.0) == 1.0
    assert relevance(1.0) == 0.5
    assert relevance(2.0) == 0.0
    assert relevance(2.0000001) == 0.0


# -- embedders ---------------------------------------------------------------------------------


async def test_hashing_embedder_is_deterministic_normalised_and_similarity_aware() -> None:
    model = HashingEmbedder(128)
    a, a2, b, c, punct = await model.embed(
        [
            "User prefers dark mode",
            "User prefers dark mode",
            "the user prefers a dark theme",
            "budget meeting",
            "!!!",
        ]
    )
    assert a == a2
    assert len(a) == 128
    for v in (a, b, c, punct):
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-9)

    def cos(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert cos(a, b) > cos(a, c)
    assert model.model == "hashing-128"
    with pytest.raises(ConfigError):
        HashingEmbedder(4)


def test_model_names_resolve_to_embedders() -> None:
    assert isinstance(resolve_embedder("hashing"), HashingEmbedder)
    assert resolve_embedder("hashing-32").dimension == 32
    assert isinstance(resolve_embedder("all-MiniLM-L6-v2"), LocalEmbedder)
    assert isinstance(resolve_embedder("local"), LocalEmbedder)
    litellm = resolve_embedder("text-embedding-3-small")
    assert isinstance(litellm, LiteLLMEmbedder)
    assert litellm.dimension == 1536
    custom = HashingEmbedder(16)
    assert resolve_embedder(custom) is custom
    with pytest.raises(ConfigError):
        resolve_embedder("hashing-x")
    with pytest.raises(ConfigError):
        resolve_embedder(42)  # type: ignore[arg-type]


# -- the EMK facade and the memory store -----------------------------------------------------


def test_bad_configuration_is_refused_up_front() -> None:
    with pytest.raises(ConfigError):
        EMK("sqlite", embedding_model="hashing")
    with pytest.raises(ConfigError):
        EMK("memory", embedding_model="hashing", isolation="team")
    with pytest.raises(ConfigError):
        EMK("postgresql", embedding_model="hashing")
    with pytest.raises(ConfigError):
        EMK("postgresql", "postgresql://x/y", embedding_model="hashing", namespace="bad name; drop")


async def test_a_closed_emk_refuses_calls(closing: Closing) -> None:
    emk = closing(EMK("memory", embedding_model="hashing"))
    await emk.store("a1", "x")
    await emk.close()
    with pytest.raises(StateError):
        await emk.search("a1", "x")


async def test_lone_surrogates_in_ids_and_tags_are_refused_and_counted(closing: Closing) -> None:
    # UTF-8 cannot carry them: the content hash and the database could not either.
    emk = closing(EMK("memory", embedding_model="hashing"))
    lone = "agent\ud800"
    with pytest.raises(InvalidInput, match="lone surrogate"):
        await emk.store(lone, "x")
    with pytest.raises(InvalidInput, match="lone surrogate"):
        await emk.store("a1", "x", session_id=lone)
    with pytest.raises(InvalidTag, match="lone surrogate"):
        await emk.store("a1", "x", tags=["ok", "\udfff"])
    with pytest.raises(InvalidInput, match="lone surrogate"):
        await emk.search(lone, "x")
    assert emk.rejected == {"InvalidInput": 3, "InvalidTag": 1}
    assert await emk.search("a1", "x") == []  # nothing was stored
    assert check_tags(["é", "😀"], Limits()) == ("é", "😀")  # other text is fine


async def test_memory_storage_checks_the_content_hash_on_read(closing: Closing) -> None:
    emk = closing(EMK("memory", embedding_model="hashing"))
    record = await emk.store("a1", "User prefers dark mode.")
    store = emk._store
    assert isinstance(store, MemoryStore)
    # Tamper behind the API (the memory store's rows are private and never replaced).
    forged = store._rows[0]._replace(content="User prefers light mode.")
    store._rows[0] = forged
    store._by_id[record.id] = forged
    with pytest.raises(IntegrityError):
        await emk.get(record.id, agent_id="a1")
    with pytest.raises(IntegrityError):
        await emk.search("a1", "mode")
    assert emk.rejected["IntegrityError"] == 2


@pytest.mark.parametrize(
    ("doc", "wanted", "contained"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": {"b": [1, 2, 3]}}, {"a": {"b": [3, 1]}}, True),
        ({"a": [1, 2]}, {"a": [4]}, False),
        ({"a": True}, {"a": 1}, False),
        ({"a": 1}, {"a": 1.0}, True),
        ({"a": None}, {"a": None}, True),
        ({}, {"a": None}, False),
    ],
)
def test_memory_storage_filters_like_jsonb_containment(doc: Any, wanted: Any, contained: bool) -> None:
    assert _contains(doc, wanted) is contained
