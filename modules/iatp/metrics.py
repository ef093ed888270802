"""Prometheus metrics of IATP on the bus: what the :class:`~agent_os.iatp.IATPMiddleware` of AMB
clients signed, verified and refused (by reason), read from its counters at scrape time.
Names and labels: ``docs/observability.md``. prometheus_client is imported only when collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from agent_os.iatp.middleware import IATPMiddleware

if TYPE_CHECKING:
    from agent_os.amb import AMB

_COUNTERS: Final = (
    # (IATPMiddleware attribute, metric name without _total, help)
    ("signed", "agentos_iatp_signed", "Messages the client's IATP middleware signed"),
    ("verified", "agentos_iatp_verified", "Deliveries whose signature verified"),
    ("accepted_unsigned", "agentos_iatp_accepted_unsigned", "Unsigned deliveries a subscription accepted"),
)


class TrustCollector:
    """A prometheus_client collector over the IATP middleware of AMB clients (held weakly; a
    client without IATP contributes nothing). The ``agent`` label is the client's ``agent_id``
    (several clients of one agent are summed); failures carry the ``reason``, a
    :class:`~agent_os.iatp.Reason` value (a fixed set)."""

    def __init__(self, clients: Iterable[AMB] = ()) -> None:
        self._clients: weakref.WeakSet[AMB] = weakref.WeakSet(clients)

    def add(self, client: AMB) -> None:
        """Collect ``client``'s IATP metrics too."""
        self._clients.add(client)

    def collect(self) -> Iterator[Any]:
        """The metric families, read now. Raises ImportError without prometheus_client."""
        from prometheus_client.core import CounterMetricFamily

        totals: dict[tuple[str, str], int] = {}
        failures: dict[tuple[str, str], int] = {}
        for client in list(self._clients):
            for layer in client.middleware:
                if not isinstance(layer, IATPMiddleware):
                    continue
                agent = client.agent_id
                for field, name, _ in _COUNTERS:
                    totals[agent, name] = totals.get((agent, name), 0) + getattr(layer, field)
                for reason, count in list(layer.rejected.items()):
                    failures[agent, reason] = failures.get((agent, reason), 0) + count
        families = {name: CounterMetricFamily(name, text, labels=["agent"]) for _, name, text in _COUNTERS}
        for (agent, name), value in totals.items():
            families[name].add_metric([agent], value)
        failed = CounterMetricFamily(
            "agentos_iatp_verification_failures",
            "Deliveries refused by IATP, by reason (unsigned, bad_signature, replayed_nonce, ...)",
            labels=["agent", "reason"],
        )
        for (agent, reason), count in failures.items():
            failed.add_metric([agent, reason], count)
        yield from families.values()
        yield failed
