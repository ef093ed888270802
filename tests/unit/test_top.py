"""``agent-os top``'s view, from admin API answers: agents merged over the instances of a queue
group, rates from two snapshots, and the rendering (the live view in a terminal is
tests/integration/test_cli_top.py)."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console

from agent_os.commands.top import Snapshot, merge, render, with_rates


def _agent(agent_id: str, state: str, allowed: int, denied: int, held: int = 0) -> dict[str, Any]:
    return {
        "id": agent_id,
        "state": state,
        "actions_count": allowed,
        "violations_count": denied,
        "held": held,
    }


def test_instances_are_merged_counts_summed_and_the_gravest_state_shown() -> None:
    rows = merge(
        [
            [_agent("a", "running", 3, 1), _agent("rogue", "stopped", 0, 1, held=2)],
            [_agent("a", "running", 4, 0), _agent("rogue", "terminated", 1, 1), _agent("b", "waiting", 0, 0)],
        ]
    )
    assert {(r.id, r.state, r.allowed, r.denied, r.held) for r in rows.values()} == {
        ("a", "running", 7, 1, 0),
        ("rogue", "terminated", 1, 2, 2),
        ("b", "waiting", 0, 0, 0),
    }


def test_rates_are_the_decisions_since_the_last_snapshot_per_second() -> None:
    before = Snapshot(10.0, merge([[_agent("a", "running", 10, 2)]]))
    now = with_rates(
        Snapshot(12.0, merge([[_agent("a", "running", 30, 3), _agent("new", "running", 5, 0)]])), before
    )
    assert (now.agents["a"].allowed_rate, now.agents["a"].denied_rate) == (10.0, 0.5)
    assert now.agents["new"].allowed_rate == 0.0  # no earlier count to compare with
    assert with_rates(now, None) is now


def test_the_view_puts_grave_states_first_and_names_unreachable_instances() -> None:
    snapshot = Snapshot(1.0, merge([[_agent("calm", "running", 1, 0), _agent("rogue", "stopped", 0, 1, 1)]]))
    snapshot.errors = {"http://a:8787": None, "http://b:8787": "http://b:8787: no answer (refused)"}
    snapshot.records = [
        {
            "timestamp": "2026-12-05T10:00:00.123456+00:00",
            "agent_id": "rogue",
            "event_type": "policy_violation",
            "data": {
                "operation": "publish",
                "resource": "secrets.x",
                "decision": "deny",
                "rule": "no-secrets",
            },
        }
    ]
    console = Console(width=120, record=True, color_system=None)
    console.print(render(snapshot, rows=1))
    text = console.export_text()
    assert "1/2 control-plane instances answering" in text
    assert "http://b:8787: no answer (refused)" in text
    assert "2 agents: 1 stopped, 1 running" in text
    assert "rogue" in text
    assert "calm" not in text  # one row: the gravest state first
    assert "1 more agents" in text
    assert re.search(r"10:00:00\.123\s+rogue\s+policy_violation\s+publish secrets\.x deny no-secrets", text)
