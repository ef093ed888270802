"""Hostile trace headers: a malformed or over-long ``traceparent`` starts a new trace, an
over-long ``tracestate`` is ignored with its ``traceparent`` kept; the message is delivered
either way and the ignored header counted (``docs/limits.md``)."""

from __future__ import annotations

import pytest

from agent_os.amb import AMB, tracing
from tests.support import Collector, memory_url
from tests.support.closing import Closing
from tests.support.tracing import traced


async def _untraced(closing: Closing, url: str) -> AMB:
    """A client that sends trace headers as it is given them: connected while tracing is off."""
    assert not tracing.active
    client = closing(AMB("memory", url, agent_id="mallory"))
    await client.connect()
    return client


@pytest.mark.parametrize(
    "traceparent",
    [
        "not a traceparent",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id
        "00-" + "a" * 32 + "-" + "b" * 16 + "-01" + "x" * 500,  # over-long
        "zz-" + "a" * 32 + "-" + "b" * 16 + "-01",
    ],
    ids=["garbage", "zero-trace-id", "over-long", "bad-version"],
)
async def test_a_malformed_traceparent_starts_a_new_trace_and_is_delivered(
    closing: Closing, traceparent: str
) -> None:
    url = memory_url("trace")
    mallory = await _untraced(closing, url)
    with traced() as memory:
        b = closing(AMB("memory", url, agent_id="bob"))
        got = Collector()
        await b.subscribe("tasks.*", got)
        await mallory.publish("tasks.x", 1, headers={"traceparent": traceparent, "tracestate": "k=v"})
        await got.wait_for(1)
        process = memory.finished().one("process tasks.*")
    assert process.parent_id is None  # a root: a new trace
    assert got.messages == [1]
    assert b.stats.handled == 1
    assert b.stats.dead_lettered == 0
    assert b._tracing is not None
    assert b._tracing.ignored_headers == 1


async def test_an_over_long_tracestate_is_ignored_the_parent_kept(closing: Closing) -> None:
    url = memory_url("trace")
    mallory = await _untraced(closing, url)
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    with traced() as memory:
        b = closing(AMB("memory", url, agent_id="bob"))
        got = Collector()
        await b.subscribe("tasks.*", got)
        await mallory.publish("tasks.x", 1, headers={"traceparent": parent, "tracestate": "k=" + "v" * 5000})
        await mallory.publish("tasks.x", 2, headers={"tracestate": "k=" + "v" * 600})  # no parent at all
        await got.wait_for(2)
        first, second = memory.finished().named("process tasks.*")
    assert (first.trace_id, first.parent_id) == ("a" * 32, "b" * 16)
    assert second.parent_id is None
    assert got.messages == [1, 2]
    assert b._tracing is not None
    assert b._tracing.ignored_headers == 1
