"""The platform on the embedded defaults, narrated as it runs (``agent-os demo``).

Eight agents on the in-memory broker, each with an IATP identity, and an ops console reading
dead letters; a kernel with a YAML policy and a flight recorder in SQLite (in a temporary
directory) governs the agents:

1. identities and trust; 2. the bus: a queue group, a content filter, request/reply, a stream,
a dead letter and an expiry, every message signed and verified; 3. a forged and a tampered
message dead-lettered with their reasons; 4. the policy allowing and denying messages, with a
rate limit; 5. SIGSTOP / SIGCONT / SIGKILL; 6. EMK memory served over the bus; 7. CMVK's
agreement, no LLM; 8. the flight recorder verified, then tampered with in its SQLite file.

Needs only the core dependencies. :func:`run_demo` returns a :class:`DemoResult` with what it
observed (the tests check it).
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

from agent_os.control_plane import FlightRecorder, KernelSpace, Policy
from agent_os.demo import _audit, _bus, _governance, _knowledge
from agent_os.demo._scene import DemoResult, Narrator, Printer, Scene
from agent_os.iatp import IATP

__all__ = ["DemoResult", "run_demo"]


async def run_demo(echo: Printer = print, *, embedder: str = "auto") -> DemoResult:
    """Run the scenario, narrating through ``echo``; return what it observed.

    ``embedder``: ``auto`` (the local model when installed, else hashing), ``local`` or
    ``hashing``. Raises ValueError for another embedder, and any error of the platform (the demo
    is also a smoke test: it does not hide failures).
    """
    say = Narrator(echo)
    result = DemoResult()
    chosen = _knowledge.choose_embedder(embedder)
    with tempfile.TemporaryDirectory(prefix="agent-os-demo-") as folder:
        path = Path(folder) / "flight.db"
        iatp = IATP(trust_model="web")
        policy = Policy.from_yaml(_governance.POLICY_YAML)
        kernel = KernelSpace(
            policy=policy,
            flight_recorder=FlightRecorder("sqlite", str(path), retention_days=None, flush_interval=0.05),
            permissions=iatp.permissions,
        )
        scene = Scene(say, f"memory://demo-{uuid.uuid4().hex[:8]}", iatp, kernel, policy, path, result)
        echo("Agent OS demo: signed messages, policy, signals, a tamper-evident record, memory")
        echo(f"(in-memory broker {scene.url}; flight recorder {path})")
        # Load the embedding model (seconds, in a thread) while the other parts run.
        warm_up = asyncio.create_task(chosen.embed(["warm-up"]))
        try:
            await _bus.identities(scene)
            for name in ("coordinator", *_bus.TRUSTING, "auditor", "memory", "intruder"):
                scene.agent(name)
            console = scene.agent("ops", governed=False)
            await scene.watch_dead_letters(console)
            await _bus.bus(scene)
            await _bus.forgeries(scene)
            await _governance.policy(scene)
            await _governance.signals(scene)
            await _knowledge.memory(scene, chosen, warm_up)
            await _knowledge.agreement(scene)
        finally:
            warm_up.cancel()
            for client in scene.agents.values():
                await client.close(timeout=1.0)
        for client in scene.agents.values():
            for key, value in client.stats.as_dict().items():
                result.bus[key] = result.bus.get(key, 0) + value
            for mw in client._middleware:
                result.signed += getattr(mw, "signed", 0)
                result.verified += getattr(mw, "verified", 0)
        result.decisions = sum(m.decisions for m in scene.mediators)
        await _audit.flight_recorder(scene)
        await kernel.close()
    say.section("Summary")
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(result.dead_letters.items()))
    say.note(
        f"{result.signed} messages signed by their senders, {result.verified} deliveries verified; "
        f"{sum(result.dead_letters.values())} dead letters ({reasons}); {result.bus['expired']} expired"
    )
    say.note(
        f"{result.denied} publish denied, {result.rate_limited} rate-limited; {result.held} held by "
        f"SIGSTOP and released in order; worker-2 {result.killed_status} by SIGKILL mid-job"
    )
    say.note(
        f"{sum(result.records.values())} flight-recorder records; chain verified: {result.verified_chain}; "
        f"edited record #{result.tampered_seq} found: #{result.first_bad_seq}"
    )
    return result
