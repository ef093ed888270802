"""Prometheus metrics of a kernel, read at scrape time from its counters: agents and their
decisions, hold queues, policy decisions by rule, signals, and the flight recorder's writing
and chain. Names and labels: ``docs/observability.md``. prometheus_client is imported only
when collected.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.stats import OTHER_REASON
from agent_os.control_plane.kernel.gate import DECISION_LABELS
from agent_os.control_plane.recorder.sqlite import Checkpoints

if TYPE_CHECKING:
    from agent_os.control_plane.kernel.space import KernelSpace

MAX_AGENT_SERIES: Final = 1000
"""The most agents with series of their own (``agent`` label) per kernel; the counts of any
further agents are summed under ``agent="other"``."""


class KernelMetrics:
    """A prometheus_client collector over ``kernel``'s counters (register it in a
    ``CollectorRegistry``; the admin API does)."""

    def __init__(self, kernel: KernelSpace) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[Any]:
        """The metric families, read now. Raises ImportError without prometheus_client."""
        yield from self._agents()
        yield from self._decisions()
        yield from self._recorder()

    def _agents(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        states = GaugeMetricFamily("agentos_agents", "Agents known to the kernel, by state", labels=["state"])
        decided = CounterMetricFamily(
            "agentos_agent_decisions",
            "Decisions on each agent's messages and actions, by outcome (allowed, denied)",
            labels=["agent", "outcome"],
        )
        depth = GaugeMetricFamily(
            "agentos_hold_queue_depth", "Messages in each agent's hold queue", labels=["agent"]
        )
        by_state: dict[str, int] = {}
        per_agent: dict[str, list[int]] = {}
        allowed = denied = 0
        for proc in list(self.kernel.processes):
            by_state[proc.life.value] = by_state.get(proc.life.value, 0) + 1
            allowed += proc.actions_count
            denied += proc.violations_count
            name = proc.id if len(per_agent) < MAX_AGENT_SERIES or proc.id in per_agent else OTHER_REASON
            counts = per_agent.setdefault(name, [0, 0, 0])
            counts[0] += proc.actions_count
            counts[1] += proc.violations_count
            counts[2] += proc.held
        for state, count in by_state.items():
            states.add_metric([state], count)
        for agent, (ok, refused, held) in per_agent.items():
            decided.add_metric([agent, "allowed"], ok)
            decided.add_metric([agent, "denied"], refused)
            depth.add_metric([agent], held)
        yield states
        yield GaugeMetricFamily(
            "agentos_agent_actions", "Allowed actions of the agents the kernel knows now", value=allowed
        )
        yield GaugeMetricFamily(
            "agentos_agent_violations", "Denied actions of the agents the kernel knows now", value=denied
        )
        yield decided
        yield depth

    def _decisions(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        decisions = CounterMetricFamily(
            "agentos_policy_decisions",
            "Recorded decisions on messages and actions, by operation, action, rule and record event type",
            labels=list(DECISION_LABELS),
        )
        for key, count in list(self.kernel.gate.decisions.items()):
            decisions.add_metric(list(key), count)
        yield decisions
        signals = CounterMetricFamily(
            "agentos_signals",
            "Signals to agents, by signal and outcome (delivered, ignored, handler_error, ...)",
            labels=["signal", "outcome"],
        )
        for key, count in list(self.kernel.signals.counts.items()):
            signals.add_metric(list(key), count)
        yield signals

    def _recorder(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        recorder = self.kernel.recorder
        yield CounterMetricFamily(
            "agentos_recorder_records_appended", "Flight-recorder records appended", value=recorder.appended
        )
        yield CounterMetricFamily(
            "agentos_recorder_records_written", "Flight-recorder records written", value=recorder.flushed
        )
        yield GaugeMetricFamily(
            "agentos_recorder_records_pending",
            "Flight-recorder records appended and not yet written",
            value=recorder.appended - recorder.flushed,
        )
        checkpoints = getattr(recorder.storage, "checkpoints", None)
        if isinstance(checkpoints, Checkpoints):
            yield CounterMetricFamily(
                "agentos_recorder_checkpoints",
                "Checkpoints of the SQLite flight recorder's file run beside its writer",
                value=checkpoints.done,
            )
            yield CounterMetricFamily(
                "agentos_recorder_checkpoint_failures",
                "Checkpoints of the SQLite flight recorder's file that failed",
                value=checkpoints.failed,
            )
        since = recorder.unwritten_since_ns
        yield GaugeMetricFamily(
            "agentos_recorder_lag_seconds",
            "Age of the oldest flight-recorder record not yet written (0: all written)",
            value=max(0.0, time.time() - since / 1e9) if since is not None else 0.0,
        )
        last = recorder.last_verification
        if last is not None:
            result, at = last
            yield GaugeMetricFamily(
                "agentos_recorder_chain_valid",
                "1 when the latest verification of the flight recorder's chain passed, 0 when it failed",
                value=int(result.ok),
            )
            yield GaugeMetricFamily(
                "agentos_recorder_chain_verified_timestamp_seconds",
                "When the latest verification of the flight recorder's chain ended (Unix time)",
                value=at,
            )
