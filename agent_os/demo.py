"""A small multi-agent scenario on the in-memory broker, narrated as it runs.

A coordinator hands tasks to two workers sharing a queue group; an analytics monitor listens
only to high-priority analytics tasks (a content filter); a status service answers requests;
an auditor follows every event as a stream; one poisoned task is dead-lettered with its reason;
one message expires before anyone reads it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from amb import AMB, Metadata, decode

Printer = Callable[[str], None]


class Narrator:
    def __init__(self, echo: Printer) -> None:
        self._echo = echo
        self._t0 = time.perf_counter()

    def __call__(self, agent: str, arrow: str, topic: str, text: str) -> None:
        ms = (time.perf_counter() - self._t0) * 1000
        self._echo(f"[{ms:7.2f} ms] {agent:<13} {arrow} {topic:<24} {text}")


async def run_demo(echo: Printer = print) -> dict[str, int]:
    """Run the scenario and return the bus counters summed over all agents."""
    url = f"memory://demo-{uuid.uuid4().hex[:8]}"
    say = Narrator(echo)
    agents = {
        name: AMB("memory", url, agent_id=name)
        for name in ("coordinator", "worker-1", "worker-2", "analytics", "status", "auditor")
    }
    coordinator = agents["coordinator"]
    done = asyncio.Event()
    results: list[str] = []

    for worker_name in ("worker-1", "worker-2"):
        worker = agents[worker_name]

        async def work(message: Any, metadata: Metadata, worker: AMB = worker) -> None:
            if message.get("poison"):
                raise ValueError(f"cannot process {message['task_id']}")
            say(worker.agent_id, "<-", metadata.topic, f"{message['task_id']} from {metadata.sender}")
            results.append(message["task_id"])
            await worker.publish("events.task.done", {"task_id": message["task_id"], "by": worker.agent_id})

        await worker.subscribe("tasks.process", work, queue="workers")

    async def monitor(message: Any, metadata: Metadata) -> None:
        say("analytics", "<-", metadata.topic, f"{message['task_id']} (filter: high + analytics)")

    await agents["analytics"].subscribe(
        "tasks.*", monitor, filter={"priority": "high", "department": "analytics"}
    )

    async def status(message: Any, metadata: Metadata) -> None:
        say("status", "<-", metadata.topic, f"asked about {message['agent_id']} by {metadata.sender}")
        await agents["status"].reply(metadata, {"agent_id": message["agent_id"], "completed": len(results)})

    await agents["status"].subscribe("agents.status", status)

    async def dead_letters(message: Any, metadata: Metadata) -> None:
        original = decode(message)
        say(
            "coordinator",
            "<-",
            metadata.topic,
            f"dead letter: {original.payload['task_id']} ({metadata.headers['dlq-reason']}: "
            f"{metadata.headers['dlq-error']})",
        )

    await coordinator.subscribe("_DLQ.>", dead_letters)

    async def audit() -> None:
        seen = 0
        async for message, metadata in agents["auditor"].stream("events.>", with_metadata=True):
            seen += 1
            say("auditor", "<~", metadata.topic, f"event #{seen}: {message}")
            if seen == 4:
                done.set()
                return

    auditor = asyncio.create_task(audit())
    await asyncio.sleep(0)

    echo("Agent OS demo: six agents on the in-memory broker")
    echo("")
    tasks: list[dict[str, Any]] = [
        {"task_id": "task_1", "priority": "high", "department": "analytics"},
        {"task_id": "task_2", "priority": "low", "department": "analytics"},
        {"task_id": "task_3", "priority": "high", "department": "sales"},
        {"task_id": "task_4", "priority": "high", "department": "analytics"},
        {"task_id": "task_5", "priority": "low", "department": "ops", "poison": True},
    ]
    for task in tasks:
        say(
            "coordinator",
            "->",
            "tasks.process",
            f"{task['task_id']} ({task['priority']}, {task['department']})",
        )
        await coordinator.publish("tasks.process", task)

    await asyncio.wait_for(done.wait(), 5)
    reply = await coordinator.request("agents.status", {"agent_id": "worker-1"}, timeout=2)
    say("coordinator", "<-", "reply", f"{reply}")

    # A message that outlives its time to live is never handed to a handler.
    analytics = agents["analytics"]
    gate = asyncio.Event()

    async def busy(message: Any, metadata: Metadata) -> None:
        if message == "block":
            await gate.wait()
        else:
            say("analytics", "<-", metadata.topic, f"{message}")

    await analytics.subscribe("alerts.cpu", busy)
    await coordinator.publish("alerts.cpu", "block")
    say("coordinator", "->", "alerts.cpu", "'cpu at 95%' with ttl=20ms while analytics is busy")
    await coordinator.publish("alerts.cpu", "cpu at 95%", ttl=0.02)
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.sleep(0.01)

    await asyncio.wait_for(auditor, 5)
    for agent in agents.values():
        await agent.close()

    totals: dict[str, int] = {}
    for agent in agents.values():
        for key, value in agent.stats.as_dict().items():
            totals[key] = totals.get(key, 0) + value
    echo("")
    echo(
        "Summary: {published} published, {handled} handled, {filtered} filtered out, "
        "{dead_lettered} dead-lettered, {expired} expired, {requests} request(s) answered".format(**totals)
    )
    return totals
