"""Metrics: the bus collector over AMB clients, the bounded dead-letter reasons, the services'
latency histograms, the metrics port (/metrics, /healthz, its token) and its options."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import click
import pytest
from prometheus_client import CollectorRegistry

from agent_os.amb import AMB, Metadata
from agent_os.amb.durations import Durations
from agent_os.amb.metrics import BUS_COUNTERS, BusCollector
from agent_os.amb.stats import MAX_DEAD_LETTER_REASONS, OTHER_REASON, PATTERNS_MAX, BusStats
from agent_os.emk import EMK, HashingEmbedder
from agent_os.services._metrics import (
    METRICS_PORTS,
    MetricsOptions,
    MetricsServer,
    metrics_from_options,
    ready_line,
)
from tests.support import Collector, memory_url, wait_until
from tests.support.closing import Closing
from tests.support.prometheus import samples


def test_dead_letter_reasons_stay_a_bounded_label_set() -> None:
    stats = BusStats()
    stats.count_dead_letter("malformed")
    stats.count_dead_letter("malformed")
    stats.count_dead_letter("Message id 0193 of alice")  # free text: never a label value
    stats.count_dead_letter("x" * 65)
    for i in range(MAX_DEAD_LETTER_REASONS + 5):
        stats.count_dead_letter(f"reason_{i}")
    reasons = stats.dead_letter_reasons
    assert reasons["malformed"] == 2
    # malformed, other (the unfit ones), then reason_0 to reason_29 fill the 32; the rest: other
    assert len(reasons) == MAX_DEAD_LETTER_REASONS
    assert "reason_29" in reasons
    assert "reason_30" not in reasons
    assert reasons[OTHER_REASON] == 2 + 7
    assert stats.dead_lettered == sum(reasons.values())
    stats.count_dead_letter("reason_0")  # a reason counted apart already stays apart
    assert reasons["reason_0"] == 2
    assert "dead_letter_reasons" not in stats.as_dict()


async def test_the_bus_collector_reads_the_clients_at_scrape_time(closing: Closing) -> None:
    url = "memory://metrics-bus-collector"
    alice = closing(AMB("memory", url, agent_id="alice"))
    bob = closing(AMB("memory", url, agent_id="bob"))
    bob_too = closing(AMB("memory", url, agent_id="bob"))  # a second client of the same agent
    registry = CollectorRegistry()
    registry.register(BusCollector([alice, bob, bob_too]))
    assert samples(registry)[("agentos_bus_connected", (("agent", "alice"),))] == 0  # not connected yet

    async def fail(message: Any, metadata: Metadata) -> None:
        raise RuntimeError("no")

    got = Collector()
    await bob.subscribe("jobs.ok", got)
    await bob_too.subscribe("jobs.fail", fail)
    await alice.connect()
    for _ in range(3):
        await alice.publish("jobs.ok", "x")
    await alice.publish("jobs.fail", "y")
    await got.wait_for(3)
    await wait_until(lambda: bob_too.stats.dead_lettered == 1)

    found = samples(registry)
    assert found[("agentos_bus_messages_published_total", (("agent", "alice"),))] == 4
    assert found[("agentos_bus_messages_delivered_total", (("agent", "bob"),))] == 4  # both bob clients
    assert found[("agentos_bus_messages_handled_total", (("agent", "bob"),))] == 3
    assert found[("agentos_bus_handler_errors_total", (("agent", "bob"),))] == 1
    assert found[("agentos_bus_dead_letters_total", (("agent", "bob"), ("reason", "handler_error")))] == 1
    assert found[("agentos_bus_connected", (("agent", "bob"),))] == 1
    for _, name, _ in BUS_COUNTERS:
        assert (f"{name}_total", (("agent", "alice"),)) in found
    assert found[("agentos_bus_published_by_pattern_total", (("agent", "alice"), ("pattern", "jobs.>")))] == 4
    handled = "agentos_bus_handled_by_pattern_total"
    assert found[(handled, (("agent", "bob"), ("pattern", "jobs.ok")))] == 3
    assert found[(handled, (("agent", "bob"), ("pattern", "jobs.fail")))] == 0
    await bob_too.close()
    assert samples(registry)[("agentos_bus_connected", (("agent", "bob"),))] == 0  # one of them is down


async def test_patterns_stay_a_bounded_label_set(closing: Closing) -> None:
    # Published subjects count by their first token, subscriptions by their pattern; past
    # PATTERNS_MAX of either, the rest count as "other".
    where = memory_url("patterns")
    alice = closing(AMB("memory", where, agent_id="alice"))
    registry = CollectorRegistry()
    registry.register(BusCollector([alice]))
    for i in range(PATTERNS_MAX + 3):
        await alice.subscribe(f"t{i}.in", Collector())
    await alice.connect()
    for i in range(PATTERNS_MAX + 6):
        await alice.publish(f"r{i}.x.y", i)
    found = samples(registry)
    published = {dict(labels)["pattern"]: v for (name, labels), v in found.items() if "published_by" in name}
    assert len(published) == PATTERNS_MAX + 1
    assert published[OTHER_REASON] == 6
    assert published["r0.>"] == 1
    handled = [dict(labels)["pattern"] for (name, labels) in found if "handled_by_pattern" in name]
    assert len(handled) == PATTERNS_MAX + 1
    assert OTHER_REASON in handled


def test_durations_are_cumulative_histogram_buckets() -> None:
    durations = Durations([0.1, 1.0])
    for seconds in (0.05, 0.1, 0.5, 3.0):
        durations.observe(("store",), seconds)
    durations.observe(("search",), 0.2)
    assert durations.count(("store",)) == 4
    assert durations.count(("get",)) == 0

    class Family:
        def collect(self) -> Any:
            yield durations.family("agentos_test_seconds", "test", ["operation"])

    registry = CollectorRegistry()
    registry.register(Family())
    found = samples(registry)
    bucket = "agentos_test_seconds_bucket"
    assert found[(bucket, (("le", "0.1"), ("operation", "store")))] == 2  # le: at most the bound
    assert found[(bucket, (("le", "1.0"), ("operation", "store")))] == 3
    assert found[(bucket, (("le", "+Inf"), ("operation", "store")))] == 4
    assert found[("agentos_test_seconds_count", (("operation", "store"),))] == 4
    assert found[("agentos_test_seconds_sum", (("operation", "store"),))] == pytest.approx(3.65)
    assert found[(bucket, (("le", "1.0"), ("operation", "search")))] == 1


async def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_the_metrics_port_serves_metrics_and_health() -> None:
    healthy = True
    registry = CollectorRegistry()
    server = MetricsServer(registry, lambda: healthy)
    url = await server.start("127.0.0.1", 0)
    try:
        assert url.startswith("http://127.0.0.1:")
        status, body = await fetch(url + "/metrics")
        assert status == 200
        assert "python_gc_objects_collected_total" not in body  # only what the registry holds
        assert await fetch(url + "/healthz") == (200, "ok\n")
        healthy = False
        assert (await fetch(url + "/healthz"))[0] == 503
        assert (await fetch(url + "/other"))[0] == 404
    finally:
        await server.stop()
    await server.stop()  # idempotent


async def test_a_metrics_token_guards_metrics_but_not_health() -> None:
    token = "metrics-token-0123456789"
    registry = CollectorRegistry()
    server = MetricsServer(registry, lambda: True, token=token)
    url = await server.start("127.0.0.1", 0)
    try:
        assert (await fetch(url + "/metrics"))[0] == 401
        assert (await fetch(url + "/metrics", "metrics-token-wrong-0000"))[0] == 401
        assert server.unauthorized == 2
        assert (await fetch(url + "/metrics", token))[0] == 200
        assert (await fetch(url + "/healthz"))[0] == 200
    finally:
        await server.stop()


async def test_a_taken_metrics_port_is_an_os_error() -> None:
    first = MetricsServer(CollectorRegistry(), lambda: True)
    url = await first.start("127.0.0.1", 0)
    try:
        second = MetricsServer(CollectorRegistry(), lambda: True)
        with pytest.raises(OSError, match=r"in use|address"):
            await second.start("127.0.0.1", int(url.rsplit(":", 1)[1]))
    finally:
        await first.stop()


def test_metrics_options() -> None:
    assert metrics_from_options(True, "127.0.0.1", 9465, None) is None
    options = metrics_from_options(False, "0.0.0.0", 0, "a-long-enough-token")
    assert options == MetricsOptions("0.0.0.0", 0, "a-long-enough-token")
    assert "token" not in repr(options)
    with pytest.raises(click.UsageError, match="at least 16"):
        metrics_from_options(False, "127.0.0.1", 9465, "short")
    assert len(set(METRICS_PORTS.values())) == len(METRICS_PORTS)  # side by side on one host
    assert ready_line("ready x", None) == "ready x"
    assert ready_line("ready x", "http://h:1") == "ready x metrics=http://h:1"


async def test_the_memory_service_serves_its_metrics(
    capsys: pytest.CaptureFixture[str], closing: Closing
) -> None:
    from agent_os.services.memory_service import serve

    url = "memory://metrics-memory-serve"
    stop = asyncio.Event()
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    options = MetricsOptions("127.0.0.1", 0)
    task = asyncio.create_task(
        serve(broker=url, emk=emk, trust_bus=True, prefix="mm", stop=stop, metrics=options)
    )
    try:
        async with AMB("memory", url, agent_id="alice") as alice:
            out = ""

            def ready() -> bool:
                nonlocal out
                out += capsys.readouterr().out
                return " metrics=http://127.0.0.1:" in out

            await wait_until(ready, 10, what="the ready line")
            metrics = out.split(" metrics=", 1)[1].split()[0]
            assert (await alice.request("mm.store", {"content": "Scraped."}, timeout=5))["ok"] is True
            status, body = await fetch(metrics + "/metrics")
            assert status == 200
            assert 'agentos_emk_requests_total{operation="store",outcome="ok"} 1.0' in body
            assert 'agentos_emk_request_duration_seconds_count{operation="store"} 1.0' in body
            assert 'agentos_bus_connected{agent="memory-service"} 1.0' in body
            assert await fetch(metrics + "/healthz") == (200, "ok\n")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
