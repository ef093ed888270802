"""Parts 4 and 5: a YAML policy on every message (with a rate limit), and signals."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from agent_os.amb import Metadata
from agent_os.control_plane import AgentSignal, PolicyViolationError, RateLimitExceeded
from agent_os.demo._scene import Scene

POLICY_YAML: Final = """\
name: demo-policy
version: "1.0"
default_action: deny
require_verified_sender: true      # a sender IATP did not verify is denied
rules:
  - name: no-secrets
    action: deny
    resource: "secrets.*"
    reason: secrets never travel on the bus
  - name: tasks-need-a-grant
    action: allow
    operation: deliver
    resource: "tasks.*"
    conditions: {permission: assign_task}   # granted by the recipient to the sender (IATP)
  - name: tasks-without-grant
    action: deny
    operation: deliver
    resource: "tasks.*"
    reason: the recipient did not grant the sender assign_task
  - name: alerts-rate
    action: allow
    operation: publish
    resource: "alerts.*"
    rate_limit: 3/1m
  - name: agent-traffic
    action: allow
    resource: "*"
"""


async def policy(scene: Scene) -> None:
    say = scene.say
    say.section("4. Policy from YAML, checked on every publish and every delivery")
    pol = scene.policy
    say.note(f"policy {pol.name!r} v{pol.version}, default {pol.default_action}, verified senders only;")
    say.note("its rules, first match wins:")
    for rule in pol.rules:
        p = rule.pattern
        extra = f" if {dict(p.conditions)}" if p.conditions else ""
        if rule.rate_limit is not None:
            extra += f", at most {rule.rate_limit.limit} per {rule.rate_limit.per:g} s per agent"
        say.note(f"  {rule.name:<20} {rule.action:<5} {p.operation:<8} {p.resource}{extra}")
    coordinator = scene.agents["coordinator"]
    result = scene.result

    say("coordinator", "->", "secrets.db", "a database password")
    try:
        await coordinator.publish("secrets.db", {"password": "hunter2"})
    except PolicyViolationError as exc:
        result.denied += 1
        reason = exc.decision.reason if exc.decision is not None else str(exc)
        say("coordinator", "x ", "secrets.db", f"denied before it left: {reason}")

    before = len(scene.dead)
    intruder = scene.agents["intruder"]
    say("intruder", "->", "tasks.process", "task_8, validly signed")
    await intruder.publish("tasks.process", {"task_id": "task_8"})
    await scene.dead_letters(before + 1)

    monitor = scene.agents["analytics"]
    say.note("alerts.* allows 3 publishes per minute per agent; analytics sends a burst of 5")
    for n in range(1, 6):
        try:
            await monitor.publish("alerts.disk", {"n": n, "disk": "92%"})
        except RateLimitExceeded as exc:
            result.rate_limited += 1
            name = exc.decision.rule_name if exc.decision is not None else "?"
            say("analytics", "x ", "alerts.disk", f"alert {n}: denied, over the rate limit of rule {name}")
        else:
            say("analytics", "->", "alerts.disk", f"alert {n}: allowed")


async def signals(scene: Scene) -> None:
    say = scene.say
    say.section("5. Signals: SIGSTOP holds an agent's deliveries, SIGCONT releases them, SIGKILL stops it")
    kernel, result = scene.kernel, scene.result
    coordinator = scene.agents["coordinator"]
    auditor = scene.agents["auditor"]
    received: list[str] = []

    async def report(message: Any, metadata: Metadata) -> None:
        received.append(message["report"])
        say("auditor", "<-", metadata.topic, f"{message['report']}")

    await auditor.subscribe("reports.daily", report, concurrency=3)
    await kernel.send_signal("auditor", AgentSignal.SIGSTOP)
    say.note(f"SIGSTOP -> auditor (state: {kernel.get_agent_status('auditor').state})")
    for n in range(1, 4):
        say("coordinator", "->", "reports.daily", f"report-{n}")
        await coordinator.publish("reports.daily", {"report": f"report-{n}"})
    proc = kernel.get_agent("auditor")
    await scene.until(lambda: proc.held == 3, "3 held deliveries")
    result.held = proc.held
    say.note(f"auditor is stopped: {proc.held} deliveries held, {len(received)} handled")
    await kernel.send_signal("auditor", AgentSignal.SIGCONT)
    say.note("SIGCONT -> auditor")
    await scene.until(lambda: len(received) == 3, "the released deliveries")
    result.released = list(received)
    say.note(f"released in order: {', '.join(received)}")

    worker = scene.agents["worker-2"]
    started = asyncio.Event()
    finished: list[str] = []

    async def crunch(message: Any, metadata: Metadata) -> None:
        say("worker-2", "<-", metadata.topic, f"{message['job']}: crunching (takes 30 s)")
        started.set()
        await asyncio.sleep(30)
        finished.append(message["job"])

    await worker.subscribe("jobs.crunch", crunch)
    before = len(scene.dead)
    say("coordinator", "->", "jobs.crunch", "job-9")
    await coordinator.publish("jobs.crunch", {"job": "job-9", "task_id": "job-9"})
    await asyncio.wait_for(started.wait(), 5)
    await kernel.send_signal("worker-2", AgentSignal.SIGKILL)
    await scene.dead_letters(before + 1)
    result.killed_status = kernel.get_agent_status("worker-2").state
    say.note(f"SIGKILL -> worker-2 mid-job: state {result.killed_status}, job finished: {bool(finished)}")
    say("coordinator", "->", "tasks.process", "task_9 (only worker-1 is left in the queue group)")
    await coordinator.publish("tasks.process", {"task_id": "task_9", "priority": "low", "department": "ops"})
    await scene.until(lambda: "task_9" in scene.completed, "task_9")
