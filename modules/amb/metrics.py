"""Prometheus metrics of AMB clients, read at scrape time from their
:class:`~agent_os.amb.stats.BusStats` and latency histograms (for which the message path pays
two clock reads per delivery). Names and labels: ``docs/observability.md``. prometheus_client
(the ``service`` or ``observability`` extra) is imported only when a scrape collects.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.durations import Durations
from agent_os.amb.stats import OTHER_REASON, PATTERNS_MAX

if TYPE_CHECKING:
    from agent_os.amb.client import AMB

BUS_COUNTERS: Final = (
    # (BusStats field, metric name without _total, help)
    ("published", "agentos_bus_messages_published", "Messages the client published (replies included)"),
    ("delivered", "agentos_bus_messages_delivered", "Messages the broker delivered to the client"),
    ("handled", "agentos_bus_messages_handled", "Deliveries a handler took without error"),
    ("handler_errors", "agentos_bus_handler_errors", "Handler calls that raised"),
    ("retried", "agentos_bus_retries", "Deliveries handed back to the broker to be delivered again"),
    ("dead_letter_failures", "agentos_bus_dead_letter_failures", "Dead letters that could not be published"),
    ("malformed", "agentos_bus_messages_malformed", "Deliveries whose bytes are not an envelope"),
    ("invalid_subjects", "agentos_bus_invalid_subjects", "Messages refused for a subject no broker takes"),
    ("rejected", "agentos_bus_messages_rejected", "Deliveries a middleware refused (IATP, policy)"),
    ("expired", "agentos_bus_messages_expired", "Deliveries dropped past their expires_at"),
    ("filtered", "agentos_bus_messages_filtered", "Deliveries a subscription's filter left out"),
    ("requests", "agentos_bus_requests", "Requests the client sent"),
    ("request_timeouts", "agentos_bus_request_timeouts", "Requests that got no reply in time"),
    ("late_replies", "agentos_bus_late_replies", "Replies that came after their request gave up"),
    ("mismatched_replies", "agentos_bus_mismatched_replies", "Replies dropped as not from the peer asked"),
)


class BusCollector:
    """A prometheus_client collector over AMB clients (register it in a ``CollectorRegistry``).

    Each scrape reads the clients' ``stats``, ``healthy`` and latency histograms (collecting a
    client turns them on: :meth:`~agent_os.amb.AMB.keep_latency`); clients are held weakly (a
    closed, dropped client disappears). The ``agent`` label is a client's ``agent_id``; the
    counters of clients that share one are summed. Dead letters carry a ``reason`` label, a
    bounded set (see :class:`~agent_os.amb.stats.BusStats`); request times an ``outcome``.
    """

    def __init__(self, clients: Iterable[AMB] = ()) -> None:
        self._clients: weakref.WeakSet[AMB] = weakref.WeakSet()
        for client in clients:
            self.add(client)

    def add(self, client: AMB) -> None:
        """Collect ``client``'s metrics too (and keep its latency histograms from now on)."""
        client.keep_latency()
        self._clients.add(client)

    def discard(self, client: AMB) -> None:
        """Stop collecting ``client``'s metrics."""
        self._clients.discard(client)

    def collect(self) -> Iterator[Any]:
        """The metric families, read now. Raises ImportError without prometheus_client."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {name: CounterMetricFamily(name, text, labels=["agent"]) for _, name, text in BUS_COUNTERS}
        dead = CounterMetricFamily(
            "agentos_bus_dead_letters",
            "Dead letters the client published, by reason",
            labels=["agent", "reason"],
        )
        connected = GaugeMetricFamily(
            "agentos_bus_connected", "1 while the client's broker connection is up, else 0", labels=["agent"]
        )
        published = CounterMetricFamily(
            "agentos_bus_published_by_pattern",
            "Messages the client published, by subject pattern (the subject's first token, then >)",
            labels=["agent", "pattern"],
        )
        handled = CounterMetricFamily(
            "agentos_bus_handled_by_pattern",
            "Deliveries a handler took without error, by the pattern of the live subscription",
            labels=["agent", "pattern"],
        )
        by_pattern: dict[tuple[str, str], int] = {}
        by_subscription: dict[tuple[str, str], int] = {}
        sums: dict[str, dict[str, int]] = {}
        reasons: dict[tuple[str, str], int] = {}
        up: dict[str, int] = {}
        handler_times, request_times = Durations(), Durations()
        for client in list(self._clients):
            agent = client.agent_id
            if client.handler_latency is not None:
                handler_times.merge(client.handler_latency, (agent,))
            if client.request_latency is not None:
                request_times.merge(client.request_latency, (agent,))
            for (root,), count in list((client.published_by_pattern or {}).items()):
                pattern = root if root == OTHER_REASON else f"{root}.>"
                by_pattern[agent, pattern] = by_pattern.get((agent, pattern), 0) + count
            for i, sub in enumerate(client.subscriptions):
                pattern = sub.pattern if i < PATTERNS_MAX else OTHER_REASON
                by_subscription[agent, pattern] = by_subscription.get((agent, pattern), 0) + sub.handled
            stats = client.stats
            per_agent = sums.setdefault(agent, {})
            for field, name, _ in BUS_COUNTERS:
                per_agent[name] = per_agent.get(name, 0) + getattr(stats, field)
            for reason, count in list(stats.dead_letter_reasons.items()):
                reasons[agent, reason] = reasons.get((agent, reason), 0) + count
            up[agent] = min(up.get(agent, 1), int(client.healthy))
        for agent, values in sums.items():
            for name, value in values.items():
                counters[name].add_metric([agent], value)
        for (agent, reason), count in reasons.items():
            dead.add_metric([agent, reason], count)
        for agent, value in up.items():
            connected.add_metric([agent], value)
        for labels, count in by_pattern.items():
            published.add_metric(list(labels), count)
        for labels, count in by_subscription.items():
            handled.add_metric(list(labels), count)
        yield published
        yield handled
        yield from counters.values()
        yield dead
        yield connected
        yield handler_times.family(
            "agentos_bus_handler_duration_seconds",
            "Time of one handler call, its middleware included (IATP verification, policy)",
            ["agent"],
        )
        yield request_times.family(
            "agentos_bus_request_duration_seconds",
            "Time from sending a request to its reply, timeout or error reply, by outcome",
            ["agent", "outcome"],
        )
