"""Envelopes and hypothesis strategies for the signing tests: a complete envelope to start from,
and, per signed field, values to tamper with it."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import strategies as st

from agent_os.amb import Envelope, new_id
from agent_os.iatp import UNSIGNED_HEADERS

texts = st.text(max_size=12)
payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | texts
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)


def make_env(**fields: Any) -> Envelope:
    """An envelope with every field set (``fields`` override them), not signed."""
    base: dict[str, Any] = {
        "id": new_id(),
        "topic": "tasks.process",
        "sender": "alice",
        "payload": {"task": 1},
        "recipient": "bob",
        "reply_to": "_INBOX.x.1",
        "correlation_id": "c-1",
        "timestamp": time.time_ns(),
        "expires_at": None,
        "priority": 0,
        "headers": {"content-type": "application/json"},
    }
    base.update(fields)
    return Envelope(**base)


# Values to tamper with each signed field of an envelope.
MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.text(min_size=1, max_size=20),
    "topic": st.text(min_size=1, max_size=20),
    "sender": st.sampled_from(["bob", "mallory", ""]),
    "recipient": st.none() | st.text(max_size=10),
    "reply_to": st.none() | st.text(max_size=10),
    "correlation_id": st.none() | st.text(max_size=10),
    "timestamp": st.integers(-(2**40), 2**40).map(lambda d: time.time_ns() + d),
    "expires_at": st.none() | st.integers(0, 2**63 - 1),
    "priority": st.integers(-(2**31), 2**31),
    "v": st.integers(0, 5),
    "payload": payloads,
    "headers": st.dictionaries(
        st.text(max_size=5).filter(lambda k: k not in UNSIGNED_HEADERS), st.text(max_size=5), max_size=3
    ),
}
