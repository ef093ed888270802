"""``agent-os top``: a live view of running control-plane instances, refreshed from their admin
APIs: each agent's state, its allowed and denied decisions per second, its held messages, and
the newest flight-recorder records. Several ``--admin`` URLs (the instances of a queue group)
are merged: an agent's counts are summed and its state is the gravest one any instance holds.

Needs ``rich`` (the ``console`` extra). Ctrl-C quits (exit 0); ``--once`` prints one view and
exits (1 when no instance answers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import click

from agent_os.commands._admin import AdminClient, AdminError, admin_options
from agent_os.services._process import FiniteRange

if TYPE_CHECKING:
    from rich.console import RenderableType

INSTALL_HINT: Final = "agent-os top needs rich: pip install 'agent-os[console]'"
GRAVITY: Final = {"terminated": 3, "stopped": 2, "running": 1, "waiting": 0}
"""How grave a state is: the merged view of an agent shows the gravest of its instances'."""


@dataclass
class AgentRow:
    """One agent as ``top`` shows it, merged over the instances."""

    id: str
    state: str
    allowed: int
    denied: int
    held: int
    allowed_rate: float = 0.0
    denied_rate: float = 0.0


@dataclass
class Snapshot:
    """What the instances answered at ``at`` (``time.monotonic()``): their agents merged,
    their newest records (newest first), and each instance's error (None: it answered)."""

    at: float
    agents: dict[str, AgentRow] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str | None] = field(default_factory=dict)


def merge(answers: Sequence[list[dict[str, Any]]]) -> dict[str, AgentRow]:
    """The agents of several instances' ``GET /agents`` answers, one row per agent id: counts
    and held messages summed, the gravest state (:data:`GRAVITY`)."""
    rows: dict[str, AgentRow] = {}
    for agents in answers:
        for agent in agents:
            allowed, denied = int(agent.get("actions_count", 0)), int(agent.get("violations_count", 0))
            held, state = int(agent.get("held", 0)), str(agent.get("state", "?"))
            row = rows.get(agent["id"])
            if row is None:
                rows[agent["id"]] = AgentRow(str(agent["id"]), state, allowed, denied, held)
                continue
            row.allowed += allowed
            row.denied += denied
            row.held += held
            if GRAVITY.get(state, -1) > GRAVITY.get(row.state, -1):
                row.state = state
    return rows


def with_rates(now: Snapshot, before: Snapshot | None) -> Snapshot:
    """``now`` with each agent's decisions per second since ``before`` (none: zero)."""
    if before is None or now.at <= before.at:
        return now
    seconds = now.at - before.at
    for agent_id, row in now.agents.items():
        old = before.agents.get(agent_id)
        if old is not None:
            row.allowed_rate = max(0, row.allowed - old.allowed) / seconds
            row.denied_rate = max(0, row.denied - old.denied) / seconds
    return now


def collect(admins: Sequence[AdminClient], records: int) -> Snapshot:
    """Ask every instance for its agents and its newest ``records`` records."""
    snapshot = Snapshot(time.monotonic())
    answers: list[list[dict[str, Any]]] = []
    for admin in admins:
        try:
            answers.append(admin.agents())
            snapshot.records.extend(admin.records(records) if records else [])
        except AdminError as exc:
            snapshot.errors[admin.url] = str(exc)
        else:
            snapshot.errors[admin.url] = None
    snapshot.agents = merge(answers)
    snapshot.records.sort(key=lambda r: str(r.get("timestamp", "")), reverse=True)
    del snapshot.records[records:]
    return snapshot


def render(snapshot: Snapshot, rows: int) -> RenderableType:
    """The view: instances, then the agents (gravest state and busiest first, at most
    ``rows``), then the newest records."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    up = [url for url, error in snapshot.errors.items() if error is None]
    head = Text(f"agent-os top: {len(up)}/{len(snapshot.errors)} control-plane instances answering")
    for error in snapshot.errors.values():
        if error is not None:  # it names the instance
            head.append(f"\n  {error}", style="red")
    states: dict[str, int] = {}
    for row in snapshot.agents.values():
        states[row.state] = states.get(row.state, 0) + 1
    counts = ", ".join(
        f"{n} {state}" for state, n in sorted(states.items(), key=lambda s: -GRAVITY.get(s[0], -1))
    )
    head.append(f"\n{len(snapshot.agents)} agents" + (f": {counts}" if counts else ""))

    agents = Table(expand=True, box=None, header_style="bold")
    for name, justify in (
        ("AGENT", "left"),
        ("STATE", "left"),
        ("ALLOW/S", "right"),
        ("DENY/S", "right"),
        ("ALLOWED", "right"),
        ("DENIED", "right"),
        ("HELD", "right"),
    ):
        agents.add_column(name, justify=justify)  # type: ignore[arg-type]
    ordered = sorted(
        snapshot.agents.values(),
        key=lambda r: (-GRAVITY.get(r.state, -1), -r.denied_rate, -r.allowed_rate, r.id),
    )
    style = {"terminated": "red", "stopped": "yellow"}
    for row in ordered[:rows]:
        agents.add_row(
            row.id,
            Text(row.state, style=style.get(row.state, "")),
            f"{row.allowed_rate:.1f}",
            f"{row.denied_rate:.1f}",
            str(row.allowed),
            str(row.denied),
            str(row.held),
        )
    if len(ordered) > rows:
        agents.caption = f"{len(ordered) - rows} more agents"

    records = Table(title="last decisions", expand=True, box=None, header_style="bold")
    for name in ("TIME", "AGENT", "EVENT", "DETAIL"):
        records.add_column(name)
    for record in snapshot.records:
        given = record.get("data")
        data: dict[str, Any] = given if isinstance(given, dict) else {}
        what = " ".join(
            str(data[k])
            for k in ("operation", "resource", "decision", "rule", "signal", "reason")
            if data.get(k)
        )
        records.add_row(
            str(record.get("timestamp", ""))[11:23],
            str(record.get("agent_id")),
            str(record.get("event_type")),
            what,
        )
    return Group(head, agents, records)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@admin_options
@click.option(
    "--interval", type=FiniteRange(0.1), default=1.0, show_default=True, help="Seconds between views."
)
@click.option("--records", type=click.IntRange(0, 100), default=8, show_default=True, help="Records shown.")
@click.option("--rows", type=click.IntRange(min=1), help="Agents shown (default: what fits the terminal).")
@click.option("--once", is_flag=True, help="Print one view and exit.")
def main(
    admins: tuple[str, ...], admin_token: str, interval: float, records: int, rows: int | None, once: bool
) -> None:
    """A live view of running control-plane instances: agents, their rates, held messages and
    the newest decisions (Ctrl-C quits)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise click.ClickException(INSTALL_HINT) from None
    try:
        clients = [AdminClient(url, admin_token) for url in admins]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--admin") from None
    console = Console()

    def fit() -> int:
        return rows or max(3, console.height - records - len(clients) - 9)

    snapshot = collect(clients, records)
    if once:
        console.print(render(snapshot, fit()))
        if not any(error is None for error in snapshot.errors.values()):
            raise click.ClickException("no control-plane instance answered")
        return
    try:
        with Live(render(snapshot, fit()), console=console, screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                snapshot = with_rates(collect(clients, records), snapshot)
                live.update(render(snapshot, fit()), refresh=True)
    except KeyboardInterrupt:
        return
