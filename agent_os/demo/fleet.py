"""The fleet demo (``deploy/demos/fleet``): a fleet of agents coordinating over NATS through a
queue group of control-plane service instances, and one agent that misbehaves.

``python -m agent_os.demo.fleet keys DIR`` makes the key stores (the compose ``keys`` step);
``python -m agent_os.demo.fleet run ...`` runs the scenario: a coordinator assigns a task to
every worker and collects their results, in rounds, every message signed, checked by policy and
recorded by whichever instance takes it; the rogue agent is denied by policy, stopped and then
killed by the signals its violations carry; the fleet goes on. Traced (``OTEL_*``), each round
is one trace across the coordinator, the workers and the control plane. It prints what happened and exits
0 at the end (``--keep-running``: the fleet goes on working until SIGINT/SIGTERM). The story,
the URLs and what to look at: ``docs/deployment.md`` (The demos).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from agent_os.amb import AMB, Metadata, tracing
from agent_os.amb.deadletter import DLQ_ERROR, DLQ_REASON
from agent_os.commands._admin import AdminClient, AdminError, admin_options
from agent_os.demo._programs import (
    bus_options,
    keep_running_option,
    keys_step,
    passphrase_from_env,
    run_program,
)
from agent_os.iatp import ACCEPT_UNSIGNED, IATP
from agent_os.services._process import FiniteRange
from agent_os.services.control_plane_service import dead_letter_subject, delivery_subject, ingress_subject

COORDINATOR: Final = "coordinator"
ROGUE: Final = "rogue"
SERVICE: Final = "control-plane"
AGENTS: Final = 100

Printer = Callable[[str], None]


class FleetError(Exception):
    """The scenario did not go as documented (what was awaited and did not happen)."""


def roster(agents: int = AGENTS) -> list[str]:
    """The fleet's agents: the coordinator, ``agents - 2`` workers and the rogue. Raises
    ValueError for fewer than 3."""
    if agents < 3:
        raise ValueError("a fleet has at least 3 agents: the coordinator, a worker and the rogue")
    width = len(str(agents - 2))
    return [COORDINATOR, *(f"worker-{n:0{width}d}" for n in range(1, agents - 1)), ROGUE]


def key_stores(agents: int = AGENTS) -> dict[str, list[str]]:
    """The key stores of the demo: the control-plane service's (both instances open it) and the
    fleet's (every agent's key: one process runs them all)."""
    return {SERVICE: [SERVICE], "fleet": roster(agents)}


@dataclass
class FleetResult:
    """What the run observed: ``rounds`` done, ``results`` collected (one per worker and round),
    ``dead_letters`` of the rogue's messages by reason, the ``rogue`` steps in order, and the
    decisions each control-plane instance made (admin URL -> count)."""

    workers: int = 0
    rounds: int = 0
    results: int = 0
    round_seconds: list[float] = field(default_factory=list)
    dead_letters: Counter[str] = field(default_factory=Counter)
    rogue: list[str] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)


@dataclass
class _Fleet:
    say: Printer
    clients: dict[str, AMB]
    admins: list[AdminClient]
    timeout: float
    result: FleetResult
    results: dict[int, set[str]] = field(default_factory=dict)
    dead: list[tuple[str, str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def workers(self) -> list[str]:
        return [name for name in self.clients if name not in (COORDINATOR, ROGUE)]

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds (checked whenever a message arrives, and at least
        every 50 ms); raises FleetError naming ``what`` after the timeout."""
        deadline = time.monotonic() + self.timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(f"waited {self.timeout:g} s for {what}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.05))

    async def admin(self, call: Callable[[AdminClient], Any]) -> list[Any]:
        """``call(admin)`` for every instance, in threads (the admin client blocks)."""
        return list(await asyncio.gather(*(asyncio.to_thread(call, a) for a in self.admins)))

    async def rogue_states(self) -> list[tuple[str, int]]:
        """The rogue's state and held messages at each instance (``unknown`` if not seen)."""
        found = await self.admin(lambda a: a.agent(ROGUE))
        return [(s["state"], int(s.get("held", 0))) if s else ("unknown", 0) for s in found]

    async def everywhere(self, sig: str, unless: str) -> None:
        """Send ``sig`` to the rogue at every instance where its state is not ``unless``: each
        instance of a queue group keeps its own agents' states, so the operator makes one
        instance's signal hold for the whole group."""
        states = await self.rogue_states()
        for admin, (state, _) in zip(self.admins, states, strict=True):
            if state != unless:
                await asyncio.to_thread(admin.signal, ROGUE, sig)
                self.say(f"   operator: {sig} -> rogue at {admin.url} (it was {state} there)")


async def _connect(names: Iterable[str], broker: str, iatp: IATP) -> dict[str, AMB]:
    clients = {name: AMB("nats", broker, agent_id=name, middleware=[iatp.middleware()]) for name in names}
    try:
        await asyncio.gather(*(c.connect() for c in clients.values()))
    except BaseException:
        await asyncio.gather(*(c.close(timeout=1.0) for c in clients.values()), return_exceptions=True)
        raise
    return clients


async def _subscribe(fleet: _Fleet) -> None:
    clients, say = fleet.clients, fleet.say
    coordinator = clients[COORDINATOR]

    def worker_handler(worker: AMB) -> Callable[[Any, Metadata], Any]:
        async def work(task: Any, metadata: Metadata) -> None:
            answer = sum(int(c) for c in str(task["n"]))  # the work: a digit sum
            await worker.publish(
                ingress_subject("results.done"),
                {"round": task["round"], "by": worker.agent_id, "answer": answer},
                recipient=COORDINATOR,
            )

        return work

    async def collect(result: Any, metadata: Metadata) -> None:
        fleet.results.setdefault(int(result["round"]), set()).add(str(result["by"]))
        fleet.changed.set()

    async def dead_letter(message: Any, metadata: Metadata) -> None:
        reason = metadata.headers.get(DLQ_REASON, "?")
        subject = metadata.subject.split(".", 2)[-1]
        fleet.dead.append((subject, reason, metadata.headers.get(DLQ_ERROR, "")))
        fleet.result.dead_letters[reason] += 1
        say(f"   rogue    <- dead letter of its {subject}: {reason}")
        fleet.changed.set()

    for name in fleet.workers:
        await clients[name].subscribe(delivery_subject("tasks.>", agent=name), worker_handler(clients[name]))
    await coordinator.subscribe(delivery_subject("results.>", agent=COORDINATOR), collect)
    rogue = clients[ROGUE]
    await rogue.subscribe(dead_letter_subject(">", agent=ROGUE), dead_letter, context={ACCEPT_UNSIGNED: True})
    # (A NATS subscription is in place at the server when subscribe() returns.)


async def _round(fleet: _Fleet, number: int) -> None:
    """The coordinator assigns one task to every worker; wait for every result. Traced, the
    round is one trace: its tasks, the workers' handling and their results, through the
    control plane."""
    coordinator, workers = fleet.clients[COORDINATOR], fleet.workers
    started = time.perf_counter()
    attributes = {"agent_os.agent.id": COORDINATOR, "agent_os.fleet.round": number}
    with tracing.span(f"fleet round {number}", attributes):
        for i, worker in enumerate(workers):
            task = {"round": number, "n": number * 1000 + i}
            await coordinator.publish(ingress_subject("tasks.assign"), task, recipient=worker)
        await fleet.until(
            lambda: len(fleet.results.get(number, ())) == len(workers), f"round {number}'s results"
        )
    took = time.perf_counter() - started
    fleet.result.rounds += 1
    fleet.result.results += len(workers)
    fleet.result.round_seconds.append(took)
    fleet.say(
        f"round {number}: {len(workers)} tasks assigned, {len(workers)} results back in {took * 1000:.0f} ms "
        f"({2 * len(workers) / took:.0f} messages/s through the control plane)"
    )


async def _rogue(fleet: _Fleet) -> None:
    """Denied, stopped by its violation's SIGSTOP, held, continued, then killed by the next
    violation's SIGKILL; its next message is dropped."""
    say, rogue, result = fleet.say, fleet.clients[ROGUE], fleet.result

    say("rogue    -> secrets.exfiltrate (policy rule no-secrets: deny, on violation SIGSTOP)")
    await rogue.publish(ingress_subject("secrets.exfiltrate"), {"db_password": "hunter2"})
    await fleet.until(lambda: len(fleet.dead) >= 1, "the dead letter of secrets.exfiltrate")
    await _until_state(fleet, "stopped", "the rogue stopped by its violation")
    result.rogue.append(f"denied: {fleet.dead[0][1]} ({fleet.dead[0][2]})")
    result.rogue.append("stopped by SIGSTOP")
    await fleet.everywhere("SIGSTOP", unless="stopped")

    say("rogue    -> system.shutdown while stopped: held by the control plane, not decided")
    await rogue.publish(ingress_subject("system.shutdown"), {"now": True})
    await _until(fleet, lambda states: sum(held for _, held in states) == 1, "the held message")
    result.rogue.append("system.shutdown held")
    say("   operator: SIGCONT -> rogue (the held message is decided now)")
    await fleet.admin(lambda a: a.signal(ROGUE, "SIGCONT"))
    await fleet.until(lambda: len(fleet.dead) >= 2, "the dead letter of system.shutdown")
    await _until_state(fleet, "terminated", "the rogue killed by its violation")
    result.rogue.append(f"denied: {fleet.dead[1][1]} ({fleet.dead[1][2]})")
    result.rogue.append("killed by SIGKILL")
    await fleet.everywhere("SIGKILL", unless="terminated")

    say("rogue    -> tasks.assign after SIGKILL")
    await rogue.publish(ingress_subject("tasks.assign"), {"round": 0, "n": 0}, recipient=fleet.workers[0])
    await fleet.until(lambda: len(fleet.dead) >= 3, "the dead letter of the killed agent's message")
    result.rogue.append(f"dropped: {fleet.dead[2][1]}")


async def _until(fleet: _Fleet, condition: Callable[[list[tuple[str, int]]], bool], what: str) -> None:
    """Wait until ``condition`` holds for the rogue's states at the instances (polled)."""
    deadline = time.monotonic() + fleet.timeout
    while True:
        states = await fleet.rogue_states()
        if condition(states):
            return
        if time.monotonic() > deadline:
            raise FleetError(f"waited {fleet.timeout:g} s for {what}; the rogue at each instance: {states}")
        await asyncio.sleep(0.05)


async def _until_state(fleet: _Fleet, state: str, what: str) -> None:
    await _until(fleet, lambda states: any(s == state for s, _ in states), what)
    shown = ", ".join(
        f"{a.url}: {s}" for a, (s, _) in zip(fleet.admins, await fleet.rogue_states(), strict=True)
    )
    fleet.say(f"   rogue is {state} ({shown})")


async def _decisions(fleet: _Fleet) -> None:
    """The decisions each instance made (allowed and denied, summed over its agents)."""
    for admin, agents in zip(fleet.admins, await fleet.admin(AdminClient.agents), strict=True):
        total = sum(int(a["actions_count"]) + int(a["violations_count"]) for a in agents)
        fleet.result.decisions[admin.url] = total


@dataclass(frozen=True)
class FleetOptions:
    """How to run the scenario (the ``run`` command's options)."""

    broker: str
    identities: Path
    passphrase: str = field(repr=False)
    admins: Sequence[str]
    admin_token: str = field(repr=False)
    agents: int = AGENTS
    rounds: int = 3
    timeout: float = 30.0
    keep_running: bool = False
    interval: float = 2.0


async def run_fleet(
    options: FleetOptions, echo: Printer = print, stop: asyncio.Event | None = None
) -> FleetResult:
    """Run the scenario (module docstring); return what it observed. With ``keep_running``
    the fleet goes on with a round every ``interval`` seconds until ``stop`` is set. Raises
    FleetError when something awaited did not happen within ``timeout`` seconds, AdminError
    when an instance's admin API does not answer, the key store's and the bus's errors."""
    names = roster(options.agents)
    iatp = IATP("file", key_path=str(options.identities), passphrase=options.passphrase)
    await iatp.open()
    missing = [name for name in names if not iatp.registry.is_local(name)]
    if missing:
        raise FleetError(
            f"the key store {options.identities} holds no key for {len(missing)} agents ({missing[0]}, ...): "
            f"make it with `python -m agent_os.demo.fleet keys --agents {options.agents}`"
        )
    admins = [AdminClient(url, options.admin_token) for url in options.admins]
    result = FleetResult(workers=len(names) - 2)
    echo(f"fleet: {len(names)} agents on {options.broker}, through {len(admins)} control-plane instances")
    clients = await _connect(names, options.broker, iatp)
    fleet = _Fleet(echo, clients, admins, options.timeout, result)
    try:
        await _subscribe(fleet)
        echo(f"{len(fleet.workers)} workers subscribed to their own delivery subjects (deliver.<agent>.>)")
        number = 0
        for _ in range(options.rounds):
            number += 1
            await _round(fleet, number)
        await _rogue(fleet)
        number += 1
        await _round(fleet, number)
        await _decisions(fleet)
        _summary(fleet)
        if options.keep_running:
            echo(f"--keep-running: a round every {options.interval:g} s until SIGINT/SIGTERM")
            stopping = stop or asyncio.Event()
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), options.interval)
                if not stopping.is_set():
                    number += 1
                    await _round(fleet, number)
    finally:
        await asyncio.gather(*(c.close(timeout=1.0) for c in clients.values()), return_exceptions=True)
    return result


def _summary(fleet: _Fleet) -> None:
    result, say = fleet.result, fleet.say
    say("")
    say(f"done: {result.rounds} rounds, {result.results} results from {result.workers} workers")
    say("rogue: " + " -> ".join(result.rogue))
    shares = ", ".join(f"{url}: {n}" for url, n in result.decisions.items())
    say(f"decisions per control-plane instance (the queue group shares the load): {shares}")


# -- the commands ----------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The fleet demo: agents on NATS through a queue group of control-plane instances."""


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--agents", type=click.IntRange(min=3), default=AGENTS, show_default=True)
def keys(directory: Path, agents: int) -> None:
    """Make the key stores in DIRECTORY (passphrase in AGENTOS_KEY_PASSPHRASE): `control-plane`
    for the service instances, `fleet` for the agents. Does nothing when they exist."""
    keys_step(directory, key_stores(agents))


@main.command()
@bus_options("The fleet's")
@admin_options
@click.option("--agents", type=click.IntRange(min=3), default=AGENTS, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--timeout", type=FiniteRange(0, 1e9, min_open=True), default=30.0, show_default=True)
@keep_running_option("a round every --interval s")
@click.option("--interval", type=FiniteRange(0, 1e9, min_open=True), default=2.0, show_default=True)
def run(
    broker: str,
    identities: Path,
    admins: tuple[str, ...],
    admin_token: str,
    agents: int,
    rounds: int,
    timeout: float,
    keep_running: bool,
    interval: float,
) -> None:
    """Run the scenario; print what happened; exit 0 at its end (1 when it went otherwise)."""
    options = FleetOptions(
        broker,
        identities,
        passphrase_from_env(),
        admins,
        admin_token,
        agents=agents,
        rounds=rounds,
        timeout=timeout,
        keep_running=keep_running,
        interval=interval,
    )

    run_program(
        lambda stop: run_fleet(options, click.echo, stop),
        keep_running=keep_running,
        name="fleet",
        errors=(FleetError, AdminError, ValueError, OSError),
    )


if __name__ == "__main__":
    main()
