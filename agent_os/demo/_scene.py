"""What every part of the demo shares: the narrator, the agents, the kernel, the dead letters."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_os.amb import AMB, EnvelopeError, Metadata, decode
from agent_os.amb.deadletter import DLQ_ERROR, DLQ_REASON
from agent_os.control_plane import KernelSpace, Mediator, Policy
from agent_os.iatp import ACCEPT_UNSIGNED, IATP

Printer = Callable[[str], None]


class Narrator:
    """Prints the scenario: section titles, notes, and one line per message event."""

    def __init__(self, echo: Printer) -> None:
        self.echo = echo
        self._t0 = time.perf_counter()

    def section(self, title: str) -> None:
        self.echo("")
        self.echo(f"== {title}")

    def note(self, text: str) -> None:
        self.echo(f"   {text}")

    def __call__(self, agent: str, arrow: str, topic: str, text: str) -> None:
        ms = (time.perf_counter() - self._t0) * 1000
        self.echo(f"[{ms:8.2f} ms] {agent:<12} {arrow} {topic:<22} {text}")


@dataclass
class DemoResult:
    """What the demo observed, for tests and the summary line.

    ``bus``: the bus counters summed over all agents; ``dead_letters``: dead letters by reason;
    ``signed``/``verified``: IATP signatures made and checked; ``denied``: publishes the policy
    refused; ``decisions``: what the control plane decided on messages;
    ``rate_limited``: publishes past the rate limit; ``held``/``released``: deliveries
    held by SIGSTOP and the order SIGCONT released them in; ``killed_status``: the state of the
    agent after SIGKILL; ``records``: flight-recorder records by type; ``verified_chain``: the
    first ``verify()``; ``tampered_seq``: the record edited in the SQLite file;
    ``first_bad_seq``: what ``verify()`` named afterwards; ``embedder``: the EMK embedder's
    model; ``recalled``: the memory recalled first; ``foreign_hits``: what another agent found;
    ``agreements``: ``(answer_a, answer_b, agree, score)`` of CMVK's agreement.
    """

    bus: dict[str, int] = field(default_factory=dict)
    dead_letters: Counter[str] = field(default_factory=Counter)
    signed: int = 0
    verified: int = 0
    decisions: int = 0
    denied: int = 0
    rate_limited: int = 0
    held: int = 0
    released: list[str] = field(default_factory=list)
    killed_status: str = ""
    records: Counter[str] = field(default_factory=Counter)
    verified_chain: bool = False
    checked: int = 0
    tampered_seq: int | None = None
    first_bad_seq: int | None = None
    tamper_reason: str = ""
    embedder: str = ""
    recalled: str = ""
    foreign_hits: int = -1
    agreements: list[tuple[str, str, bool, float]] = field(default_factory=list)


@dataclass
class Scene:
    """The running platform: one in-memory broker, one IATP, one kernel with its recorder."""

    say: Narrator
    url: str
    iatp: IATP
    kernel: KernelSpace
    policy: Policy
    recorder_path: Path
    result: DemoResult
    agents: dict[str, AMB] = field(default_factory=dict)
    mediators: list[Mediator] = field(default_factory=list)
    dead: list[tuple[str, str, str]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def agent(self, name: str, *, governed: bool = True) -> AMB:
        """A bus client for ``name`` signing and verifying with IATP; governed by the kernel
        (policy, signals, recorder) unless ``governed`` is False."""
        client = AMB("memory", self.url, agent_id=name, middleware=[self.iatp.middleware()])
        if governed:
            self.mediators.append(self.kernel.attach(client))
        self.agents[name] = client
        return client

    async def watch_dead_letters(self, console: AMB) -> None:
        """Narrate every dead letter. Dead letters are written by the bus itself, unsigned, so the
        console accepts unsigned messages on ``_DLQ.>`` only."""

        async def on_dead(message: Any, metadata: Metadata) -> None:
            reason = metadata.headers.get(DLQ_REASON, "?")
            error = metadata.headers.get(DLQ_ERROR, "")
            try:
                what = _describe(decode(message).payload)
            except EnvelopeError:
                what = "bytes that are not an envelope"
            self.dead.append((metadata.topic, reason, error))
            self.result.dead_letters[reason] += 1
            self.say("ops", "<-", metadata.topic, f"dead letter ({reason}): {what}")

        await console.subscribe("_DLQ.>", on_dead, context={ACCEPT_UNSIGNED: True})

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        """Wait until ``condition()`` holds; raises TimeoutError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo waited {timeout:g} s for {what}")
            await asyncio.sleep(0.005)

    async def dead_letters(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` dead letters have arrived in total."""
        await self.until(lambda: len(self.dead) >= count, f"{count} dead letters", timeout)


def _describe(payload: Any) -> str:
    if isinstance(payload, dict) and "task_id" in payload:
        return str(payload["task_id"])
    return repr(payload)[:60]
