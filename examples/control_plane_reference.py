"""The original project's control-plane examples, run as written (imports adjusted, sleeps
shortened); ``docs/api-reference.md`` is the reference of what they call.

The signal snippets run on one kernel: ``SignalDispatcher(kernel, ...)`` becomes the kernel's
dispatcher, so its ``graceful_shutdown`` (SIGTERM) and ``dump_state`` (SIGUSR1) handlers run
whether the signal comes from ``dispatcher.send`` or ``kernel.send_signal``; ``agent.cleanup()``,
``save_state()`` and ``get_state()`` are those of ``kernel.get_agent``'s process.

.venv/bin/python examples/control_plane_reference.py
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent_os import (
    ActionRequest,
    AgentSignal,
    FlightRecorder,
    KernelSpace,
    Pattern,
    Policy,
    SignalDispatcher,
)
from agent_os.amb import AMB, Metadata
from agent_os.control_plane import AgentStoppedError
from agent_os.control_plane.actions import Http


async def transform(data: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v).upper() for k, v in data.items()}


async def kernel_examples() -> None:
    kernel = KernelSpace(policy="strict")

    @kernel.register(name="data_processor", permissions=["read", "write"], rate_limit=60)
    async def data_processor(input_data: dict[str, Any]) -> dict[str, Any]:
        result = await transform(input_data)
        return {"status": "success", "data": result}

    @kernel.register
    async def analyzer(data: str) -> dict[str, Any]:
        return {"analyzed": True, "length": len(data)}

    print(await kernel.execute(data_processor, {"a": "x"}))
    result = await kernel.execute(
        analyzer, "sample data", context={"user_id": "user_123", "session_id": "sess_456"}
    )
    print(result)  # {"analyzed": True, "length": 11}

    @kernel.register
    async def coordinator(tasks: list[str]) -> list[dict[str, Any]]:
        child_ids = []
        for task in tasks:
            child_id = await kernel.spawn(
                worker_agent, task, parent_id=kernel.current_agent_id, additional_restrictions=["no_network"]
            )
            child_ids.append(child_id)
        results = await kernel.wait_all(child_ids)
        return results

    @kernel.register
    async def worker_agent(task: str) -> dict[str, Any]:
        return {"task": task, "status": "complete"}

    print(await kernel.execute(coordinator, ["t1", "t2"]))

    status = kernel.get_agent_status(kernel.current_agent_id or "")
    print(status.name, status.state)
    await kernel.close()


async def until(condition: Callable[[], bool]) -> None:
    """Wait (up to 5 s) for something the example's agents do in the background."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("the example's agents did not get there")


async def signal_control_example() -> None:
    """The reference's "Example: Signal-based agent control" (sleeps shortened)."""
    kernel = KernelSpace(policy="strict")

    async def process_iteration(i: int) -> None:
        kernel.current_agent.data["iteration"] = i  # published: part of get_state()

    @kernel.register
    async def long_running_agent(iterations: int):
        """Agent that can be paused and resumed."""
        for i in range(iterations):
            # Check for pause signal
            if kernel.is_stopped():
                await kernel.wait_for_continue()

            await process_iteration(i)
            await asyncio.sleep(0.01)

        return {"completed": iterations}

    async def main() -> None:
        # Start agent
        task = asyncio.create_task(kernel.execute(long_running_agent, 30))

        # Pause after 5 seconds
        await asyncio.sleep(0.05)
        await kernel.send_signal(kernel.current_agent_id, AgentSignal.SIGSTOP)
        print("Agent paused")
        print("state while paused:", kernel.get_agent_status(kernel.current_agent_id).state)

        # Resume after 3 seconds
        await asyncio.sleep(0.03)
        await kernel.send_signal(kernel.current_agent_id, AgentSignal.SIGCONT)
        print("Agent resumed")

        result = await task
        print(result)

    await main()
    await kernel.close()


async def dispatcher_examples() -> None:
    """The reference's SignalDispatcher section: the constructor, ``send`` and the two handlers,
    on bus agents ``agent_123`` and ``agent_456`` of the same kernel."""
    flight_recorder = FlightRecorder(storage="memory")
    policy = Policy("signals", default_action="deny")
    policy.add_rule("allow", Pattern("*", "jobs.*"))
    kernel = KernelSpace(policy=policy, flight_recorder=flight_recorder)

    dispatcher = SignalDispatcher(kernel, queue_size=1000, async_delivery=True)

    @dispatcher.register_handler(AgentSignal.SIGTERM)
    async def graceful_shutdown(agent_id: str, signal: AgentSignal):
        """Custom handler for graceful shutdown."""
        agent = kernel.get_agent(agent_id)
        await agent.cleanup()
        await agent.save_state()
        return True  # Allow termination

    @dispatcher.register_handler(AgentSignal.SIGUSR1)
    async def dump_state(agent_id: str, signal: AgentSignal):
        """Custom handler for state dumping."""
        agent = kernel.get_agent(agent_id)
        state = await agent.get_state()
        await flight_recorder.log_state_dump(agent_id, state)

    # Two bus agents governed by the kernel. agent_123 counts its jobs in its published state;
    # agent_456 holds a connection it releases when it shuts down gracefully.
    agent_123 = AMB("memory", "memory://signals-example", agent_id="agent_123")
    agent_456 = AMB("memory", "memory://signals-example", agent_id="agent_456")
    client = AMB("memory", "memory://signals-example", agent_id="client")
    kernel.attach(agent_123)
    kernel.attach(agent_456)
    done: list[str] = []

    async def job(message: str, metadata: Metadata) -> None:
        me = kernel.current_agent
        me.data["jobs"] = me.data.get("jobs", 0) + 1
        done.append(message)

    async def close_connection() -> None:
        kernel.get_agent("agent_456").data["connection"] = "closed"
        print("agent_456: connection closed")

    await agent_123.subscribe("jobs.123", job, concurrency=2)
    kernel.get_agent("agent_456").data["connection"] = "open"
    kernel.get_agent("agent_456").add_cleanup(close_connection)
    await agent_456.connect()
    await client.publish("jobs.123", "job-1")
    await until(lambda: done == ["job-1"])

    # Send SIGSTOP to pause agent
    await dispatcher.send(agent_id="agent_123", signal=AgentSignal.SIGSTOP)
    await client.publish("jobs.123", "job-2")
    await client.publish("jobs.123", "job-3")
    process = kernel.get_agent("agent_123")
    await until(lambda: process.held == 2)
    print("agent_123", kernel.get_agent_status("agent_123").state, "held:", process.held)

    # SIGUSR1: dump_state records the state (the handler runs in the background: drain waits)
    await kernel.send_signal("agent_123", AgentSignal.SIGUSR1)
    await dispatcher.drain()
    (dump,) = await flight_recorder.query(event_type="state_dump", agent_id="agent_123")
    state = dump.data["state"]
    print("state dump:", state["id"], state["state"], "held:", state["held"], "data:", state["data"])

    # Send SIGCONT to resume
    await dispatcher.send(agent_id="agent_123", signal=AgentSignal.SIGCONT)
    await until(lambda: len(done) == 3)
    print("agent_123", kernel.get_agent_status("agent_123").state, "handled:", done)

    # SIGTERM: graceful_shutdown cleans up, saves the state, allows the termination
    await kernel.send_signal("agent_456", AgentSignal.SIGTERM)
    await dispatcher.drain()
    (saved,) = await flight_recorder.query(event_type="state_saved", agent_id="agent_456")
    state = saved.data["state"]
    print("state saved:", state["id"], state["state"], "data:", state["data"])
    print("agent_456", kernel.get_agent_status("agent_456").state)

    # Terminate with SIGKILL (non-catchable)
    await dispatcher.send(agent_id="agent_123", signal=AgentSignal.SIGKILL)
    print("agent_123", kernel.get_agent_status("agent_123").state)
    print("dispatcher is the kernel's:", kernel.signals is dispatcher)

    for bus in (client, agent_123, agent_456):
        await bus.close()
    await kernel.close()


def policy_examples() -> None:
    policy = Policy(name="healthcare_policy", default_action="deny")
    policy.add_rule(
        action="allow",
        pattern=Pattern(operation="read", resource="data/*", exclude=["data/phi/*", "data/pii/*"]),
        reason="Allow reading non-sensitive data",
    )
    policy.add_rule(
        action="deny",
        pattern=Pattern(operation="write", resource="data/phi/*"),
        reason="PHI write requires explicit approval",
        on_violation="SIGKILL",
    )
    policy.add_rule(
        action="allow",
        pattern=Pattern(operation="network", resource="https://api.approved-service.com/*"),
        rate_limit=100,
    )
    for op, resource in (("read", "data/reports/q1"), ("read", "data/phi/p1"), ("write", "data/phi/p1")):
        decision = policy.evaluate(op, resource)
        print(op, resource, decision.action, decision.reason, decision.signal)


def workspace(folder: str) -> Path:
    """The agents' workspace: a report to read, a folder of PHI not to write."""
    root = Path(folder).resolve()
    (root / "data/reports").mkdir(parents=True)
    (root / "data/phi").mkdir()
    (root / "data/reports/q1.json").write_text('{"region": "north", "revenue": "41"}')
    return root


async def action_examples(root: Path) -> None:
    """The reference's "Register with permissions" and healthcare policy, as actions: what the
    agents do goes through ``kernel.submit``; the violations are found as the reference queries
    them."""
    data = f"{root}/data"

    policy = Policy(name="healthcare_policy", default_action="deny")
    policy.add_rule(
        action="allow",
        pattern=Pattern(operation="read", resource=f"{data}/*", exclude=[f"{data}/phi/*", f"{data}/pii/*"]),
        reason="Allow reading non-sensitive data",
    )
    policy.add_rule(
        action="deny",
        pattern=Pattern(operation="write", resource=f"{data}/phi/*"),
        reason="PHI write requires explicit approval",
        on_violation="SIGKILL",  # Immediate termination
    )
    policy.add_rule(action="allow", pattern=Pattern(operation="write", resource=f"{data}/reports/*"))
    policy.add_rule(
        action="allow",
        pattern=Pattern(operation="network", resource="https://api.approved-service.com/*"),
        rate_limit=100,  # Max 100 calls per minute
    )
    kernel = KernelSpace(policy=policy, workspace=root)
    Http(["api.approved-service.com"]).register(kernel.actions)  # net.http, for agents with `network`

    @kernel.register(name="data_processor", permissions=["read", "write"], rate_limit=60)
    async def data_processor(input_data: dict[str, Any]) -> dict[str, Any]:
        """Process data with read/write permissions."""
        # Kernel enforces: only read/write actions allowed
        source = await kernel.submit(ActionRequest("fs.read", input_data["path"]))
        result = await transform(json.loads(source.output))
        saved = await kernel.submit(
            ActionRequest("fs.write", "data/reports/q1.upper.json", {"content": json.dumps(result)})
        )
        # Network calls would be blocked
        call = await kernel.submit(
            ActionRequest("net.http", "https://api.approved-service.com/v1/push", {"method": "POST"})
        )
        print("network:", call.allowed, call.error)
        return {"status": "success", "data": result, "saved": saved.ok}

    @kernel.register(name="records_clerk", permissions=["read", "write"])
    async def records_clerk(patient: str) -> str:
        await kernel.submit(ActionRequest("fs.write", f"data/phi/{patient}.json", {"content": "{}"}))
        return "written"  # not reached: the denying rule's SIGKILL ends the agent

    print(await kernel.execute(data_processor, {"path": "data/reports/q1.json"}))
    try:
        await kernel.execute(records_clerk, "patient_001")
    except AgentStoppedError as exc:
        print("records_clerk:", type(exc).__name__)

    violations = await kernel.recorder.query(
        event_type="policy_violation",
        start_time=datetime.now() - timedelta(hours=1),
        end_time=datetime.now(),
        limit=100,
    )
    for v in violations:
        print(v.event_type, v.data["agent_name"], v.data["action"], v.data["target"], v.data["reason"])
    denials = await kernel.recorder.query(event_type=["policy_violation", "permission_denied"])
    print("denials:", [(d.event_type, d.data["action"]) for d in denials])
    await kernel.close()


async def recorder_examples(folder: Path) -> None:
    recorder = FlightRecorder(storage="sqlite", connection_string=str(folder / "audit.db"))
    await recorder.log(
        event_type="action_blocked",
        agent_id="agent_123",
        data={
            "action": "write",
            "resource": "data/phi/patient_001.json",
            "policy_rule": "deny_phi_write",
            "reason": "PHI access denied without explicit approval",
        },
        severity="warning",
    )
    await recorder.log(
        "policy_violation", "agent_123", {"action": "write", "resource": "data/phi/p2"}, "error"
    )
    violations = await recorder.query(
        event_type="policy_violation",
        start_time=datetime.now() - timedelta(hours=1),
        end_time=datetime.now(),
        limit=100,
    )
    activity = await recorder.query(agent_id="agent_123", severity=["warning", "error", "critical"], limit=50)
    events = await recorder.query(filters={"data.resource": {"$regex": "data/phi/*"}, "data.action": "write"})
    print(len(violations), len(activity), len(events))

    # Time-travel debugging: an execution's records, then its state up to one of them.
    for status, step in (("running", 1), ("running", 2), ("completed", 3)):
        await recorder.log(
            "step", "agent_123", {"status": status, "state": {"step": step}}, execution_id="exec_456"
        )
    timeline = await recorder.get_timeline(agent_id="agent_123", execution_id="exec_456")
    state = await recorder.replay(agent_id="agent_123", execution_id="exec_456", to_event_id=timeline[1].id)
    print(f"Agent state at event: {state['status']} {state['state']} after {state['events']} events")

    written = await recorder.export(
        format="json",
        output_path=str(folder / "audit_report.json"),
        start_time=datetime.now() - timedelta(days=1),
        end_time=datetime.now() + timedelta(seconds=1),
        include_metadata=True,
    )
    none_before = await recorder.export(
        format="json",
        output_path=str(folder / "audit_2024.json"),
        start_time=datetime(2024, 1, 1),
        end_time=datetime(2024, 1, 31),
    )
    print("exported:", written, "in range;", none_before, "in January 2024")
    await recorder.export(
        format="csv",
        output_path=str(folder / "audit_report.csv"),
        fields=["timestamp", "agent_id", "event_type", "severity"],
    )
    print("chain ok:", (await recorder.verify()).ok)
    await recorder.close()


async def main() -> None:
    await kernel_examples()
    await signal_control_example()
    await dispatcher_examples()
    policy_examples()
    with tempfile.TemporaryDirectory() as folder:
        await action_examples(workspace(folder))
    with tempfile.TemporaryDirectory() as folder:
        await recorder_examples(Path(folder))


if __name__ == "__main__":
    asyncio.run(main())
