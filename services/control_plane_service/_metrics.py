"""The control-plane service's own Prometheus metrics, read from its counters at scrape time
(names and meaning: ``docs/observability.md``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from agent_os.services.control_plane_service._service import ControlPlaneService

SERVICE_COUNTERS: Final = (
    ("forwarded", "Messages delivered to at least one agent"),
    ("deliveries", "Copies forwarded to agents (one per recipient)"),
    ("deliveries_denied", "Recipients the deliver policy refused"),
    ("replies_forwarded", "Replies forwarded to their requesters"),
    ("forward_failures", "Allowed messages that could not be forwarded"),
    ("released_dead_lettered", "Held messages dead-lettered after their release"),
    ("dead_letter_failures", "Held messages that could not be dead-lettered"),
    ("agent_dead_letters", "Dead-letter copies published to the agent concerned"),
    ("agent_dead_letter_failures", "Dead-letter copies that could not be published"),
)


class ControlPlaneMetrics:
    """A prometheus_client collector over a :class:`ControlPlaneService`'s counters:
    ``agentos_control_plane_<counter>_total`` for each of its ``stats``, held messages dropped
    or failed on release, unverified senders, unmatched replies, rate-limit store failures,
    actions forwarded, denied, with outcomes and failed, and the gauge
    ``agentos_control_plane_pending_requests``."""

    def __init__(self, service: ControlPlaneService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = self.service
        stats = service.stats
        for field, text in SERVICE_COUNTERS:
            yield CounterMetricFamily(f"agentos_control_plane_{field}", text, value=getattr(stats, field))
        for name, text, value in (
            ("held", "Messages held for a stopped agent", service.mediator.holds.messages_held),
            ("held_dropped", "Held messages dropped before their release", service.mediator.held_dropped),
            ("release_failures", "Held messages failed on release", service.mediator.release_failures),
            ("unverified", "Messages refused for want of a verified sender", service.unverified),
            ("unmatched_replies", "Replies that matched no pending request", service.pending.unmatched),
            (
                "rate_limit_store_failures",
                "Rate-limit checks refused because the shared store failed",
                service.kernel.gate.rate_store_failures,
            ),
            ("actions_forwarded", "Allowed actions forwarded to the tool service", service.actions.forwarded),
            ("actions_denied", "Actions denied and answered by the service", service.actions.denied),
            ("action_outcomes", "Outcomes recorded from tool-service answers", service.actions.outcomes),
            (
                "action_failures",
                "Actions that failed (no answer forwarded, or the denial could not be answered)",
                service.actions.failed + service.actions.answer_failures,
            ),
        ):
            yield CounterMetricFamily(f"agentos_control_plane_{name}", text, value=value)
        yield GaugeMetricFamily(
            "agentos_control_plane_pending_requests",
            "Requests forwarded whose reply has not come yet",
            value=len(service.pending),
        )
