"""The Kafka adapter's subject -> topic mapping (no broker needed)."""

from __future__ import annotations

from agent_os.bus_adapters.kafka import topic_for
from agent_os.bus_adapters.kafka._config import _topic_for


def test_reply_subjects_map_to_their_inbox_topic_without_filling_the_cache() -> None:
    assert topic_for("_INBOX.client-1.1f") == "_INBOX.client-1"
    assert topic_for("_INBOX.client-1.a.b") == "_INBOX.client-1"
    assert topic_for("_INBOX.client-1") == "_INBOX.client-1"
    assert topic_for("orders.new") == "orders.new"
    assert topic_for("odd.t\u00e9.x") == "odd.t_xe9_.x"
    before = _topic_for.cache_info().currsize
    for n in range(10_000):  # a request each: one cached entry, the inbox's
        assert topic_for(f"_INBOX.client-2.{n:x}") == "_INBOX.client-2"
    assert _topic_for.cache_info().currsize <= before + 1
