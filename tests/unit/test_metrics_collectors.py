"""The collectors beyond the bus counters: the bus's latency histograms, IATP's signatures and
refusals, and a kernel's decisions, holds, signals and flight recorder, read from a
control-plane service on the in-memory broker; and the bounded label sets they count in."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent_os.amb import AMB, Metadata
from agent_os.amb.client import LATENCY_SAMPLE
from agent_os.amb.durations import LATENCY_BUCKETS, Durations
from agent_os.amb.errors import RequestTimeout
from agent_os.amb.metrics import BusCollector
from agent_os.amb.stats import OTHER_REASON, LabelCounts
from agent_os.control_plane import AgentSignal, FlightRecorder, KernelSpace
from agent_os.control_plane.kernel.metrics import KernelMetrics
from agent_os.control_plane.recorder import sqlite as sqlite_storage
from agent_os.iatp.metrics import TrustCollector
from agent_os.services.control_plane_service._metrics import ControlPlaneMetrics
from agent_os.services.control_plane_service._serve import verifying
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.holds import deploy
from tests.support.identities import identities
from tests.support.prometheus import samples


def test_label_counts_stay_bounded() -> None:
    counts = LabelCounts(2, limit=3)
    for key in [("a", "x"), ("b", "x"), ("a", "x"), ("c", "x"), ("d", "x"), ("e", "y")]:
        counts.add(key)
    assert counts == {("a", "x"): 2, ("b", "x"): 1, ("c", "x"): 1, (OTHER_REASON, OTHER_REASON): 2}
    counts.add(("a", "x"), 3)  # a tuple counted apart stays apart
    assert counts["a", "x"] == 5


def test_durations_merge_sums_series_under_a_prefix() -> None:
    one, two, merged = Durations(), Durations(), Durations()
    one.observe(("ok",), 0.00005)
    two.observe(("ok",), 0.2)
    two.observe(("timeout",), 5.0)
    merged.merge(one, ("alice",))
    merged.merge(two, ("alice",))
    assert merged.count(("alice", "ok")) == 2
    assert merged.count(("alice", "timeout")) == 1
    assert merged.series(("alice", "ok"))[-1] == pytest.approx(0.20005)
    with pytest.raises(ValueError, match="other buckets"):
        merged.merge(Durations([1.0]))
    assert LATENCY_BUCKETS[0] == 0.0001  # a handler on the in-memory bus is counted apart from 1 ms


async def test_collected_clients_time_their_handlers_and_requests(closing: Closing) -> None:
    url = f"memory://metrics-latency-{uuid.uuid4().hex}"
    alice = closing(AMB("memory", url, agent_id="alice"))
    bob = closing(AMB("memory", url, agent_id="bob"))
    untimed = closing(AMB("memory", url, agent_id="carol"))
    registry = CollectorRegistry()
    registry.register(BusCollector([alice, bob]))
    assert untimed.handler_latency is None  # only the clients collected pay for the clock reads

    async def answer(message: Any, metadata: Metadata) -> None:
        await asyncio.sleep(0.002)  # over 100 µs: every call is timed
        if message == "fail":
            raise RuntimeError("no")
        await bob.reply(metadata, message)

    async def slow(message: Any, metadata: Metadata) -> None:
        await asyncio.sleep(0.002)

    await bob.subscribe("ask.*", answer)
    await bob.subscribe("jobs.*", slow)
    for i in range(3):
        await alice.publish("jobs.x", i)
    await wait_until(lambda: bob.stats.handled == 3)
    assert await alice.request("ask.x", "hi", timeout=5) == "hi"
    with pytest.raises(RequestTimeout):
        await alice.request("nobody.x", "hi", timeout=0.05)
    with pytest.raises(Exception, match="handler_error"):
        await alice.request("ask.x", "fail", timeout=5)

    found = samples(registry)
    handler = "agentos_bus_handler_duration_seconds_count"
    assert found[(handler, (("agent", "bob"),))] == 5  # 3 jobs, 2 requests (one raised)
    # Alice's inbox took two replies. The first call is timed; if it took under 100 µs the
    # second is skipped by the sampling (count 1), else it is timed too (count 2). So 0 or 3
    # (sampling broken, or a call counted twice) fail, whatever the machine's speed.
    assert found[(handler, (("agent", "alice"),))] in (1, 2)
    requests = "agentos_bus_request_duration_seconds_count"
    assert found[(requests, (("agent", "alice"), ("outcome", "ok")))] == 1
    assert found[(requests, (("agent", "alice"), ("outcome", "timeout")))] == 1
    assert found[(requests, (("agent", "alice"), ("outcome", "error")))] == 1
    timed_out = (("agent", "alice"), ("outcome", "timeout"))
    assert found[("agentos_bus_request_duration_seconds_sum", timed_out)] >= 0.05
    assert found[("agentos_bus_handler_duration_seconds_bucket", (("agent", "bob"), ("le", "+Inf")))] == 5
    assert found[("agentos_bus_handler_duration_seconds_sum", (("agent", "bob"),))] >= 5 * 0.002


@pytest.mark.parametrize("concurrency", [1, 4])  # the inline path, and _process
async def test_fast_handler_calls_are_sampled_and_weighted(closing: Closing, concurrency: int) -> None:
    """Handler calls under 100 µs: one in LATENCY_SAMPLE is timed and counts for the calls
    skipped before it, so the count follows the calls (to within LATENCY_SAMPLE)."""
    url = f"memory://metrics-sampled-{uuid.uuid4().hex}"
    alice = closing(AMB("memory", url, agent_id="alice"))
    bob = closing(AMB("memory", url, agent_id="bob"))
    bob.keep_latency()
    got = Collector()
    await bob.subscribe("jobs.*", got, concurrency=concurrency)
    calls = 5 * LATENCY_SAMPLE
    for i in range(calls):
        await alice.publish("jobs.x", i)
    await got.wait_for(calls)
    assert bob.handler_latency is not None
    counted = bob.handler_latency.count(())
    assert calls - LATENCY_SAMPLE < counted <= calls


async def test_the_trust_collector_counts_signatures_and_refusals_by_reason(closing: Closing) -> None:
    url = f"memory://metrics-iatp-{uuid.uuid4().hex}"
    keys = await identities("bob", "alice")
    alice = closing(AMB("memory", url, agent_id="alice", middleware=[keys["alice"].middleware()]))
    bob = closing(AMB("memory", url, agent_id="bob", middleware=[keys["bob"].middleware()]))
    forger = closing(AMB("memory", url, agent_id="mallory"))  # no IATP: nothing to collect
    registry = CollectorRegistry()
    registry.register(TrustCollector([alice, bob, forger]))
    got = Collector()
    await bob.subscribe("jobs.*", got)
    await alice.publish("jobs.x", "signed")
    await forger.publish("jobs.x", "unsigned", sender_id="alice")
    await got.wait_for(1)
    await wait_until(lambda: bob.stats.rejected == 1)
    found = samples(registry)
    assert found[("agentos_iatp_signed_total", (("agent", "alice"),))] == 1
    assert found[("agentos_iatp_verified_total", (("agent", "bob"),))] == 1
    assert found[("agentos_iatp_accepted_unsigned_total", (("agent", "bob"),))] == 0
    failures = "agentos_iatp_verification_failures_total"
    assert found[(failures, (("agent", "bob"), ("reason", "unsigned")))] == 1
    assert not any(labels == (("agent", "mallory"),) for _, labels in found)


async def test_kernel_metrics_show_decisions_by_rule_holds_signals_and_the_recorder() -> None:
    d = await deploy("memory", f"memory://metrics-kernel-{uuid.uuid4().hex}")
    a_id = d.a.agent_id
    assert a_id is not None
    registry = CollectorRegistry()
    registry.register(KernelMetrics(d.kernel))
    registry.register(ControlPlaneMetrics(d.service))
    try:
        await d.a.publish(d.to("tasks.work"), "fine")
        await d.got.wait_for(1)
        await d.a.publish(d.to("tasks.secret"), "denied")
        await d.dead.wait_for(1)
        await d.kernel.send_signal(a_id, AgentSignal.SIGSTOP)
        await d.a.publish(d.to("tasks.work"), "held")
        await wait_until(lambda: d.kernel.get_agent(a_id).held == 1)
        found = samples(registry)
        decisions = "agentos_policy_decisions_total"

        def decision(operation: str, action: str, rule: str, event: str) -> float:
            labels = (("action", action), ("event", event), ("operation", operation), ("rule", rule))
            return found[(decisions, labels)]

        assert decision("publish", "allow", "rule-2", "policy_decision") == 1
        assert decision("publish", "deny", "rule-1", "policy_violation") == 1
        assert decision("deliver", "allow", "rule-4", "policy_decision") == 1
        assert found[("agentos_signals_total", (("outcome", "delivered"), ("signal", "SIGSTOP")))] == 1
        assert found[("agentos_hold_queue_depth", (("agent", a_id),))] == 1
        assert found[("agentos_control_plane_held_total", ())] == 1
        assert found[("agentos_agent_decisions_total", (("agent", a_id), ("outcome", "denied")))] == 1
        assert found[("agentos_agent_decisions_total", (("agent", a_id), ("outcome", "allowed")))] == 1
        appended = found[("agentos_recorder_records_appended_total", ())]
        pending = found[("agentos_recorder_records_pending", ())]
        assert appended - found[("agentos_recorder_records_written_total", ())] == pending
        assert ("agentos_recorder_chain_valid", ()) not in found  # never verified yet
        await d.kernel.recorder.flush()
        assert (await d.kernel.recorder.verify()).ok
        found = samples(registry)
        assert found[("agentos_recorder_records_pending", ())] == 0
        assert found[("agentos_recorder_lag_seconds", ())] == 0
        assert found[("agentos_recorder_chain_valid", ())] == 1
        verified_at = found[("agentos_recorder_chain_verified_timestamp_seconds", ())]
        assert verified_at == pytest.approx(time.time(), abs=60)
        await d.kernel.send_signal(a_id, AgentSignal.SIGCONT)
        await d.got.wait_for(2)
    finally:
        await d.close()


async def test_the_sqlite_recorder_counts_its_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_storage, "CHECKPOINT_BYTES", 64 << 10)
    path = str(tmp_path / "audit.db")
    async with KernelSpace("permissive", flight_recorder=FlightRecorder("sqlite", path)) as kernel:
        recorder = kernel.recorder
        registry = CollectorRegistry()
        registry.register(KernelMetrics(kernel))
        for i in range(2_000):
            await recorder.log("note", "alice", {"i": i, "pad": "x" * 100})
        await recorder.flush()
        checkpoints = getattr(recorder.storage, "checkpoints", None)
        assert isinstance(checkpoints, sqlite_storage.Checkpoints)
        await wait_until(lambda: checkpoints.done >= 1)
        found = samples(registry)
        assert found[("agentos_recorder_checkpoints_total", ())] == checkpoints.done
        assert found[("agentos_recorder_checkpoint_failures_total", ())] == 0
    async with KernelSpace("permissive", flight_recorder=FlightRecorder("memory")) as kernel:
        registry = CollectorRegistry()
        registry.register(KernelMetrics(kernel))
        assert ("agentos_recorder_checkpoints_total", ()) not in samples(registry)


async def test_the_recorder_lag_is_the_age_of_the_oldest_unwritten_record() -> None:
    async with FlightRecorder("memory", flush_interval=3600) as recorder:
        assert recorder.unwritten_since_ns is None
        first = await recorder.log("note", "alice")
        await recorder.log("note", "alice")
        assert recorder.unwritten_since_ns == first.ts
        await recorder.flush()
        assert recorder.unwritten_since_ns is None


async def test_the_service_verifies_the_chain_periodically_and_says_when_it_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, closing: Closing
) -> None:
    db = tmp_path / "audit.db"
    async with FlightRecorder("sqlite", str(db)) as recorder:
        for i in range(5):
            await recorder.log("note", "alice", {"i": i})
        await recorder.flush()
        registry = CollectorRegistry()
        registry.register(KernelMetrics(closing(KernelSpace(flight_recorder=recorder))))
        async with verifying(recorder, 0.05):
            await wait_until(lambda: recorder.last_verification is not None)
            assert samples(registry)[("agentos_recorder_chain_valid", ())] == 1
            with sqlite3.connect(db) as conn:  # an edit behind the recorder's back
                conn.execute("UPDATE flight_records SET agent_id = 'mallory' WHERE seq = 3")

            def broken() -> bool:
                last = recorder.last_verification
                return last is not None and not last[0].ok

            await wait_until(broken)
        assert samples(registry)[("agentos_recorder_chain_valid", ())] == 0
        assert "chain is broken at 3" in caplog.text
