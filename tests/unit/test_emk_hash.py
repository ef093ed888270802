"""The content hash's JSON (agent_os.emk.records.content_hash): msgspec writes exactly the bytes
of the reference formula, json.dumps(..., ensure_ascii=False, separators=(",", ":")) in UTF-8,
so records hashed before and after read back the same."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_os.emk.records import HASH_VERSION, Row, content_hash, embedding_digest, micros, row_hash

text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=200)


def reference(**fields: object) -> str:
    doc = [
        HASH_VERSION,
        fields["id"],
        fields["agent_id"],
        fields["session_id"],
        fields["content"],
        fields["metadata_json"],
        list(fields["tags"]),  # type: ignore[call-overload]
        fields["supersedes"],
        micros(fields["created_at"]),  # type: ignore[arg-type]
        fields["embedding_sha256"],
    ]
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


@settings(max_examples=400, deadline=None)
@given(
    id=text,
    agent_id=text,
    session_id=st.none() | text,
    content=text,
    metadata_json=text,
    tags=st.lists(text, max_size=5),
    supersedes=st.none() | text,
    created_at=st.datetimes(timezones=st.just(UTC)),
    digest=st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_the_fast_json_hashes_what_the_reference_formula_hashes(
    id: str,
    agent_id: str,
    session_id: str | None,
    content: str,
    metadata_json: str,
    tags: list[str],
    supersedes: str | None,
    created_at: datetime,
    digest: str,
) -> None:
    fields = {
        "id": id,
        "agent_id": agent_id,
        "session_id": session_id,
        "content": content,
        "metadata_json": metadata_json,
        "tags": tags,
        "supersedes": supersedes,
        "created_at": created_at,
        "embedding_sha256": digest,
    }
    assert content_hash(**fields) == reference(**fields)  # type: ignore[arg-type]
    # A record read back is checked with row_hash: the same hash, the digest given or computed.
    given_digest = Row(
        id, agent_id, session_id, content, metadata_json, tuple(tags), supersedes, created_at, (), "", digest
    )
    assert row_hash(given_digest) == reference(**fields)
    vector = (0.5, -1.25, float(len(tags)))
    with_vector = given_digest._replace(embedding=vector, embedding_sha256=None)
    assert row_hash(with_vector) == reference(**{**fields, "embedding_sha256": embedding_digest(vector)})


def test_control_characters_escapes_and_astral_text_hash_alike() -> None:
    tricky = "".join(map(chr, range(0x30))) + '\x7f\u2028\u2029é😀"\\</script>'
    fields = {
        "id": tricky,
        "agent_id": "a",
        "session_id": None,
        "content": tricky * 3,
        "metadata_json": '{"k":"\\u0000"}',
        "tags": [tricky, ""],
        "supersedes": None,
        "created_at": datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "embedding_sha256": "0" * 64,
    }
    assert content_hash(**fields) == reference(**fields)  # type: ignore[arg-type]
