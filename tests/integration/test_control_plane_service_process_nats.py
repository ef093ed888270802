"""The control-plane service as a process on the shared NATS server: it forwards, records, and
stops cleanly on SIGTERM with its last records written."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest

from agent_os.amb import AMB
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.control_plane import DECISION_EVENTS, FlightRecorder
from agent_os.services._identity import PASSPHRASE_ENV
from tests.support import Collector
from tests.support.closing import Closing
from tests.support.identities import PASSPHRASE, service_identities
from tests.support.processes import TOKEN, get, start_service
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


async def test_the_service_process_mediates_traffic_on_nats(tmp_path: Path, closing: Closing) -> None:
    tag = uuid.uuid4().hex[:10]
    ingress, delivery, replies = f"in_{tag}", f"out_{tag}", f"re_{tag}"
    db = tmp_path / "audit.db"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: svc\ndefault_action: deny\nrules:\n"
        "  - {action: deny, operation: publish, resource: 'tasks.secret'}\n"
        "  - {action: allow, operation: publish, resource: 'tasks.*'}\n"
        "  - {action: allow, operation: deliver, resource: 'tasks.*'}\n"
    )
    proc, admin = await start_service(
        "--broker",
        NATS_URL,
        "--trust-bus",
        "--agents",
        f"receiver-{tag}",
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
    agent = AMB("nats", NATS_URL, agent_id=f"agent-{tag}")
    receiver = AMB("nats", NATS_URL, agent_id=f"receiver-{tag}")
    try:
        got = Collector()
        await receiver.subscribe(f"{delivery}.receiver-{tag}.tasks.>", got)
        await agent.connect()
        for i in range(5):
            await agent.publish(f"{ingress}.tasks.work", i)
        await agent.publish(f"{ingress}.tasks.secret", "nope")
        await got.wait_for(5)
        assert got.messages == [0, 1, 2, 3, 4]
        for _ in range(100):
            _, metrics = await get(admin + "/metrics")
            if f'agentos_bus_messages_rejected_total{{agent="control-plane-{tag}"}} 1.0' in metrics:
                break
            await asyncio.sleep(0.05)
        assert "agentos_control_plane_forwarded_total 5.0" in metrics
        assert f'agentos_bus_messages_rejected_total{{agent="control-plane-{tag}"}} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(proc.wait(), 20)
        await agent.close()
        await receiver.close()
    assert returncode == 0
    rec = closing(FlightRecorder("sqlite", str(db)))
    decisions = await rec.query(event_type=DECISION_EVENTS, filters={"data.operation": "publish"})
    assert [d.data["decision"] for d in decisions] == ["allow"] * 5 + ["deny"]  # flushed at the stop
    deliveries = await rec.query(event_type=DECISION_EVENTS, filters={"data.operation": "deliver"})
    assert [(d.agent_id, d.data["decision"]) for d in deliveries] == [(f"receiver-{tag}", "allow")] * 5
    assert (await rec.verify()).ok
    await rec.close()


async def test_the_service_process_with_identities_forwards_only_verified_senders(tmp_path: Path) -> None:
    """``--identities``: a signed message is forwarded (and still verifies at the receiver); an
    unsigned one claiming another sender is dead-lettered (``unsigned``) and counted; a policy
    reload cannot turn ``require_verified_sender`` off."""
    tag = uuid.uuid4().hex[:10]
    ingress, delivery, service_id = f"in_{tag}", f"out_{tag}", f"control-plane-{tag}"
    agent_id, admin_id, receiver_id = f"agent-{tag}", f"admin-{tag}", f"receiver-{tag}"
    keys = await service_identities(tmp_path / "keys", service_id, agent_id, admin_id, receiver_id)
    for mine in keys.values():  # the receiver verifies the senders too
        for other in (agent_id, admin_id):
            if not mine.registry.is_local(other):
                await mine.add_identity(keys[other].identity(other))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: svc\ndefault_action: deny\nrules:\n"
        "  - {action: allow, operation: publish, resource: 'tasks.*', "
        f"conditions: {{sender: {admin_id}}}}}\n"
        "  - {action: allow, operation: deliver, resource: 'tasks.*'}\n"
    )
    proc, admin = await start_service(
        "--broker",
        NATS_URL,
        "--identities",
        str(tmp_path / "keys"),
        "--policy",
        str(policy),
        "--recorder",
        "memory",
        "--ingress-prefix",
        ingress,
        "--delivery-prefix",
        delivery,
        "--reply-prefix",
        f"re_{tag}",
        "--queue",
        f"cp_{tag}",
        "--agent-id",
        service_id,
        env={PASSPHRASE_ENV: PASSPHRASE},
    )
    sender = AMB("nats", NATS_URL, agent_id=admin_id, middleware=[keys[admin_id].middleware()])
    forger = AMB("nats", NATS_URL, agent_id=agent_id)  # no IATP: claims whatever it likes
    receiver = AMB("nats", NATS_URL, agent_id=receiver_id, middleware=[keys[receiver_id].middleware()])
    try:
        got, dead = Collector(), Collector()
        # No --agents: the roster is the agents of the service's identities, the receiver too.
        await receiver.subscribe(f"{delivery}.{receiver_id}.tasks.>", got)
        await forger.subscribe(f"_DLQ.{ingress}.>", dead)
        await sender.publish(f"{ingress}.tasks.work", "signed by admin")
        await forger.publish(f"{ingress}.tasks.work", "claims admin", sender_id=admin_id)
        await got.wait_for(1)
        await dead.wait_for(1)
        assert dead.metadata[0].headers[DLQ_REASON] == "unsigned"  # both messages accounted for
        assert got.messages == ["signed by admin"]
        assert got.metadata[0].context["iatp"].sender == admin_id
        _, metrics = await get(admin + "/metrics")
        assert "agentos_control_plane_forwarded_total 1.0" in metrics
        assert "agentos_control_plane_unverified_total 1.0" in metrics
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                admin + "/policy/reload",
                headers={"Authorization": f"Bearer {TOKEN}"},
                data="name: svc2\nrequire_verified_sender: false\n",
            ) as resp,
        ):
            assert (resp.status, (await resp.json())["require_verified_sender"]) == (200, True)
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(proc.wait(), 20)
        for client in (sender, forger, receiver):
            await client.close()
    assert returncode == 0
