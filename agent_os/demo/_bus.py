"""Parts 1 and 2: identities and trust, the bus with every message signed, and forgeries."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from agent_os.amb import AMB, Metadata, MsgpackSerializer
from agent_os.demo._scene import Scene
from agent_os.iatp import IATP

TRUSTING = ("worker-1", "worker-2", "analytics", "status")


async def identities(scene: Scene) -> None:
    say, iatp = scene.say, scene.iatp
    say.section("1. Identities and trust (IATP, ed25519)")
    for name in ("coordinator", *TRUSTING, "auditor", "memory", "intruder"):
        identity = await iatp.register_agent(name)
        say.note(f"{name:<12} key {identity.key_id[:16]}...")
    for name in TRUSTING:
        await iatp.establish_trust(name, "coordinator", 0.9, ["assign_task"])
    say.note(f"{', '.join(TRUSTING)} grant coordinator 'assign_task' (trust 0.9);")
    say.note("intruder has a valid key but no grant from anyone.")


def _check(metadata: Metadata) -> str:
    result = metadata.context["iatp"]
    return f"[signed by {result.sender}, verified, trust {result.trust_level:.2f}]"


async def bus(scene: Scene) -> None:
    """Queue group, content filter, request/reply, a stream, a dead letter and an expiry."""
    say = scene.say
    say.section("2. The bus: every message signed by its sender and verified by its receiver")
    coordinator = scene.agents["coordinator"]
    done = scene.completed
    events_seen = asyncio.Event()

    for name in ("worker-1", "worker-2"):
        worker = scene.agents[name]

        async def work(message: Any, metadata: Metadata, worker: AMB = worker) -> None:
            if message.get("poison"):
                raise ValueError(f"cannot process {message['task_id']}")
            say(worker.agent_id, "<-", metadata.topic, f"{message['task_id']} {_check(metadata)}")
            done.append(message["task_id"])
            await worker.publish("events.task.done", {"task_id": message["task_id"], "by": worker.agent_id})

        await worker.subscribe("tasks.process", work, queue="workers")

    async def monitor(message: Any, metadata: Metadata) -> None:
        say("analytics", "<-", metadata.topic, f"{message['task_id']} (its filter: high + analytics)")

    await scene.agents["analytics"].subscribe(
        "tasks.*", monitor, filter={"priority": "high", "department": "analytics"}
    )

    status = scene.agents["status"]

    async def answer(message: Any, metadata: Metadata) -> None:
        say("status", "<-", metadata.topic, f"asked about {message['agent_id']} {_check(metadata)}")
        await status.reply(metadata, {"agent_id": message["agent_id"], "completed": len(done)})

    await status.subscribe("agents.status", answer)

    events = scene.agents["auditor"].stream("events.>", with_metadata=True)
    await events.start()  # subscribed before anything is published

    async def audit() -> None:
        seen = 0
        async with events:  # unsubscribes when done
            async for message, metadata in events:
                seen += 1
                text = f"event #{seen}: {message['task_id']} by {message['by']}"
                say("auditor", "<~", metadata.topic, text)
                if seen == 4:
                    events_seen.set()
                    return

    auditor = asyncio.create_task(audit())

    say.note("tasks go to a queue group of two workers; analytics filters; the auditor streams events")
    tasks: list[dict[str, Any]] = [
        {"task_id": "task_1", "priority": "high", "department": "analytics"},
        {"task_id": "task_2", "priority": "low", "department": "analytics"},
        {"task_id": "task_3", "priority": "high", "department": "sales"},
        {"task_id": "task_4", "priority": "high", "department": "analytics"},
        {"task_id": "task_5", "priority": "low", "department": "ops", "poison": True},
    ]
    for task in tasks:
        text = f"{task['task_id']} ({task['priority']}, {task['department']})"
        say("coordinator", "->", "tasks.process", text + (" - poisoned" if task.get("poison") else ""))
        await coordinator.publish("tasks.process", task)
    await asyncio.wait_for(events_seen.wait(), 5)
    await asyncio.wait_for(auditor, 5)
    await scene.dead_letters(1)

    reply = await coordinator.request("agents.status", {"agent_id": "worker-1"}, timeout=2)
    say("coordinator", "<-", "reply", f"{reply}")

    # A message that outlives its time to live is never handed to a handler.
    analytics = scene.agents["analytics"]
    gate = asyncio.Event()

    async def busy(message: Any, metadata: Metadata) -> None:
        if message == "block":
            await gate.wait()
        else:
            say("analytics", "<-", metadata.topic, f"{message}")

    await analytics.subscribe("metrics.cpu", busy)
    await coordinator.publish("metrics.cpu", "block")
    say("coordinator", "->", "metrics.cpu", "'cpu at 95%' with ttl=20ms while analytics is busy")
    await coordinator.publish("metrics.cpu", "cpu at 95%", ttl=0.02)
    await asyncio.sleep(0.05)
    gate.set()
    await scene.until(lambda: analytics.stats.expired == 1, "the expired message")
    say.note(f"analytics dropped the expired message ({analytics.stats.expired} expired)")


async def forgeries(scene: Scene) -> None:
    """A message signed with someone else's key, and a signed message altered in transit."""
    say = scene.say
    say.section("3. Forged and tampered messages never reach a handler")
    wire = MsgpackSerializer()
    coordinator = scene.agents["coordinator"]
    before = len(scene.dead)

    # Mallory holds a key of her own and claims to be the coordinator.
    mallory = IATP()
    await mallory.register_agent("coordinator")
    forged = await mallory.sign(
        "coordinator", {"task_id": "task_6", "cmd": "rm -rf /"}, topic="tasks.process"
    )
    say("mallory", "->", "tasks.process", "task_6 signed with her own key, claiming to be coordinator")
    await coordinator.broker.publish("tasks.process", wire.encode(forged))

    # A genuine signature, then the payload is changed on the way.
    genuine = await scene.iatp.sign("coordinator", {"task_id": "task_7", "amount": 10}, topic="tasks.process")
    tampered = dataclasses.replace(genuine, payload={"task_id": "task_7", "amount": 10_000})
    say("(wire)", "->", "tasks.process", "task_7 signed by coordinator, amount changed 10 -> 10000")
    await coordinator.broker.publish("tasks.process", wire.encode(tampered))
    await scene.dead_letters(before + 2)
