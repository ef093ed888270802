"""The control-plane service as a process on the shared NATS server: it forwards, records, and
stops cleanly on SIGTERM with its last records written."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from amb import AMB
from control_plane import FlightRecorder
from tests.support import Collector
from tests.unit.test_control_plane_service_process import get, start_service

pytestmark = pytest.mark.nats

NATS = "nats://127.0.0.1:4222"


async def test_the_service_process_mediates_traffic_on_nats(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    ingress, delivery, replies = f"in_{tag}", f"out_{tag}", f"re_{tag}"
    db = tmp_path / "audit.db"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: svc\ndefault_action: deny\nrules:\n"
        "  - {action: deny, operation: publish, resource: 'tasks.secret'}\n"
        "  - {action: allow, operation: publish, resource: 'tasks.*'}\n"
    )
    proc, admin = await start_service(
        "--broker",
        NATS,
        "--policy",
        str(policy),
        "--recorder",
        f"sqlite:{db}",
        "--ingress-prefix",
        ingress,
        "--delivery-prefix",
        delivery,
        "--reply-prefix",
        replies,
        "--queue",
        f"cp_{tag}",
        "--agent-id",
        f"control-plane-{tag}",
    )
    agent = AMB("nats", NATS, agent_id=f"agent-{tag}")
    receiver = AMB("nats", NATS, agent_id=f"receiver-{tag}")
    try:
        got = Collector()
        await receiver.subscribe(f"{delivery}.tasks.>", got)
        await agent.connect()
        for i in range(5):
            await agent.publish(f"{ingress}.tasks.work", i)
        await agent.publish(f"{ingress}.tasks.secret", "nope")
        await got.wait_for(5)
        assert got.messages == [0, 1, 2, 3, 4]
        for _ in range(100):
            _, metrics = await get(admin + "/metrics")
            if "agentos_service_rejected 1.0" in metrics:
                break
            await asyncio.sleep(0.05)
        assert "agentos_service_forwarded 5.0" in metrics
        assert "agentos_service_rejected 1.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(proc.wait(), 20)
        await agent.close()
        await receiver.close()
    assert returncode == 0
    rec = FlightRecorder("sqlite", str(db))
    decisions = await rec.query(event_type="policy_decision")
    assert [d.data["decision"] for d in decisions] == ["allow"] * 5 + ["deny"]  # flushed at the stop
    assert (await rec.verify()).ok
    await rec.close()
