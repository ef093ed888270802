"""Mediated mode on a NATS server with generated permissions: bypassing the mediator is refused.

Starts a private nats-server (its own port and config, never the shared one) whose
authorization block comes from :func:`services.control_plane_service.nats_authorization`.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from amb import AMB, Metadata, RequestTimeout
from control_plane import KernelSpace, Pattern, Policy
from services.control_plane_service import (
    ControlPlaneService,
    ReplyViaService,
    delivery_subject,
    ingress_subject,
    nats_authorization,
    nats_users,
)
from tests.support import Collector

pytestmark = pytest.mark.nats

PASSWORDS = {"agent-a": "pa-secret", "agent-b": "pb-secret", "control-plane": "svc-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def nats_port(tmp_path: Path) -> AsyncIterator[int]:
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed")
    port = free_port()
    users = nats_users(["agent-a", "agent-b"], "control-plane", passwords=PASSWORDS)
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\n" + nats_authorization(users))
    proc = await asyncio.create_subprocess_exec(
        binary, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                await asyncio.sleep(0.025)
        yield port
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def url(user: str, port: int) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{port}"


async def test_a_message_that_bypasses_the_mediator_is_refused_by_the_server(nats_port: int) -> None:
    import nats

    policy = Policy("mediated", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    kernel = KernelSpace(policy=policy)
    service = ControlPlaneService(
        AMB("nats", url("control-plane", nats_port), agent_id="control-plane"), kernel, trust_bus=True
    )
    await service.start()
    receiver = AMB("nats", url("agent-b", nats_port), agent_id="agent-b")
    got = Collector()
    await receiver.subscribe(delivery_subject("tasks.>"), got)
    agent = AMB("nats", url("agent-a", nats_port), agent_id="agent-a")
    await agent.connect()

    await agent.publish(ingress_subject("tasks.work"), "mediated")
    await got.wait_for(1)

    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    raw = await nats.connect(url("agent-a", nats_port), error_cb=on_error)
    await raw.publish(delivery_subject("tasks.work"), b"bypass")  # straight to the delivery subject
    await raw.flush()
    await agent.publish(delivery_subject("tasks.work"), "bypass via the bus client")
    await asyncio.sleep(0.3)
    assert got.messages == ["mediated"]  # nothing arrived around the mediator
    assert any("permissions violation" in str(e).lower() for e in errors)  # the server said no
    decisions = await kernel.recorder.query(event_type="policy_decision")
    assert [d.data["resource"] for d in decisions] == ["tasks.work"]
    await raw.close()
    await agent.close()
    await receiver.close()
    await service.stop()
    await kernel.close()


async def test_replies_are_mediated_and_a_reply_around_the_service_is_refused(nats_port: int) -> None:
    import nats

    policy = Policy("mediated", default_action="deny")
    policy.add_rule("allow", Pattern("request", "tasks.*"))
    policy.add_rule("deny", Pattern("reply", "tasks.private"), reason="private answers")
    policy.add_rule("allow", Pattern("reply", "tasks.*"))
    kernel = KernelSpace(policy=policy)
    service = ControlPlaneService(
        AMB("nats", url("control-plane", nats_port), agent_id="control-plane"), kernel, trust_bus=True
    )
    await service.start()
    responder = AMB("nats", url("agent-b", nats_port), agent_id="agent-b", middleware=[ReplyViaService()])

    async def answer(message: object, metadata: Metadata) -> None:
        await responder.reply(metadata, f"re: {message}")

    await responder.subscribe(delivery_subject("tasks.>"), answer)
    requester = AMB("nats", url("agent-a", nats_port), agent_id="agent-a")
    assert await requester.request(ingress_subject("tasks.ask"), "hello", timeout=3) == "re: hello"
    with pytest.raises(RequestTimeout):
        await requester.request(ingress_subject("tasks.private"), "secret", timeout=0.5)
    decisions = await kernel.recorder.query(filters={"data.operation": "reply"})
    assert [(d.data["resource"], d.data["decision"]) for d in decisions] == [
        ("tasks.ask", "allow"),
        ("tasks.private", "deny"),
    ]

    # agent-b answers straight into agent-a's inbox: the server refuses it.
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    inbox = Collector()
    await requester.subscribe("_INBOX.>", inbox)
    raw = await nats.connect(url("agent-b", nats_port), error_cb=on_error)
    await raw.publish("_INBOX.anything.1", b"around the service")
    await raw.flush()
    await asyncio.sleep(0.3)
    assert inbox.messages == []
    assert any("permissions violation" in str(e).lower() for e in errors)
    await raw.close()
    for client in (requester, responder):
        await client.close()
    await service.stop()
    await kernel.close()
