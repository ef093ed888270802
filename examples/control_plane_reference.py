"""The API reference's control-plane examples, run as written (imports adjusted, sleeps shortened).

.venv/bin/python examples/control_plane_reference.py
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent_os import AgentSignal, FlightRecorder, KernelSpace, Pattern, Policy, SignalDispatcher


async def transform(data: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v).upper() for k, v in data.items()}


async def process_iteration(i: int) -> None:
    await asyncio.sleep(0)


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


async def signal_examples() -> None:
    kernel = KernelSpace(policy="strict")
    dispatcher = kernel.signals

    @kernel.register
    async def long_running_agent(iterations: int) -> dict[str, int]:
        for i in range(iterations):
            if kernel.is_stopped():
                await kernel.wait_for_continue()
            await process_iteration(i)
            await asyncio.sleep(0.01)
        return {"completed": iterations}

    @dispatcher.register_handler(AgentSignal.SIGUSR1)
    async def dump_state(agent_id: str, signal: AgentSignal) -> None:
        await kernel.recorder.log_state_dump(agent_id, {"signal": signal.name})

    task = asyncio.create_task(kernel.execute(long_running_agent, 30))
    await asyncio.sleep(0.05)
    await kernel.send_signal(kernel.current_agent_id or "", AgentSignal.SIGSTOP)
    print("Agent paused:", kernel.get_agent_status(kernel.current_agent_id or "").state)
    await asyncio.sleep(0.03)
    await dispatcher.send(agent_id=kernel.current_agent_id or "", signal=AgentSignal.SIGUSR1)
    await kernel.send_signal(kernel.current_agent_id or "", AgentSignal.SIGCONT)
    print("Agent resumed")
    print(await task)
    assert isinstance(dispatcher, SignalDispatcher)
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
    await recorder.export(format="json", output_path=str(folder / "audit_report.json"), include_metadata=True)
    await recorder.export(
        format="csv",
        output_path=str(folder / "audit_report.csv"),
        fields=["timestamp", "agent_id", "event_type", "severity"],
    )
    print("chain ok:", (await recorder.verify()).ok)
    await recorder.close()


async def main() -> None:
    await kernel_examples()
    await signal_examples()
    policy_examples()
    with tempfile.TemporaryDirectory() as folder:
        await recorder_examples(Path(folder))


if __name__ == "__main__":
    asyncio.run(main())
