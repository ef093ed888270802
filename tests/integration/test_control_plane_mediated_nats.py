"""Mediated mode on a NATS server with generated permissions: bypassing the mediator is refused,
and an agent's requests get their replies when its client's inbox is under its own prefix.

Starts a private nats-server (its own port and config, never the shared one) whose
authorization block comes from :func:`agent_os.services.control_plane_service.nats_authorization`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_os.amb import AMB, Metadata, RequestTimeout
from agent_os.control_plane import DECISION_EVENTS, KernelSpace, Pattern, Policy
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    ReplyViaService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
    nats_authorization,
    nats_users,
)
from tests.support import Collector, wait_until

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


def agent_client(user: str, port: int) -> AMB:
    """An agent's client whose reply inbox is under ``_INBOX.<agent>.``, the only inboxes the
    generated permissions let the agent read."""
    return AMB("nats", url(user, port), agent_id=user, inbox_prefix=agent_inbox(user))


async def service_and_responder(
    nats_port: int, denied_reply: Pattern | None = None, *, answer: str
) -> tuple[KernelSpace, ControlPlaneService, AMB]:
    """The control-plane service on the permissioned server (requests and replies on ``tasks.*``
    allowed, except replies matching ``denied_reply``), and agent-b answering every request on
    ``tasks.>`` with ``answer`` + the message, its replies going through the service."""
    policy = Policy("mediated", default_action="deny")
    policy.add_rule("allow", Pattern("request", "tasks.*"))
    if denied_reply is not None:
        policy.add_rule("deny", denied_reply, reason="private answers")
    policy.add_rule("allow", Pattern("reply", "tasks.*"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    kernel = KernelSpace(policy=policy)
    service = ControlPlaneService(
        AMB("nats", url("control-plane", nats_port), agent_id="control-plane"),
        kernel,
        trust_bus=True,
        agents=["agent-b"],
    )
    await service.start()
    responder = AMB("nats", url("agent-b", nats_port), agent_id="agent-b", middleware=[ReplyViaService()])

    async def reply(message: object, metadata: Metadata) -> None:
        await responder.reply(metadata, f"{answer}{message}")

    try:
        await responder.subscribe(delivery_subject("tasks.>", agent="agent-b"), reply)
    except BaseException:
        await responder.close()
        await service.stop()
        await kernel.close()
        raise
    return kernel, service, responder


async def test_a_message_that_bypasses_the_mediator_is_refused_by_the_server(nats_port: int) -> None:
    import nats

    policy = Policy("mediated", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    kernel = KernelSpace(policy=policy)
    service = ControlPlaneService(
        AMB("nats", url("control-plane", nats_port), agent_id="control-plane"),
        kernel,
        trust_bus=True,
        agents=["agent-b"],
    )
    receiver = AMB("nats", url("agent-b", nats_port), agent_id="agent-b")
    agent = AMB("nats", url("agent-a", nats_port), agent_id="agent-a")
    try:
        await service.start()
        got = Collector()
        await receiver.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
        await agent.connect()

        await agent.publish(ingress_subject("tasks.work"), "mediated")
        await got.wait_for(1)

        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        raw = await nats.connect(url("agent-a", nats_port), error_cb=on_error)
        try:
            await raw.publish(
                delivery_subject("tasks.work", agent="agent-b"), b"bypass"
            )  # straight to the delivery subject
            await raw.flush()
            await agent.publish(delivery_subject("tasks.work", agent="agent-b"), "bypass via the bus client")
            # refused:
            await wait_until(lambda: any("permissions violation" in str(e).lower() for e in errors))
            # A later mediated message takes the longer way; had a bypass been let through, it would be
            # there before it.
            await agent.publish(ingress_subject("tasks.work"), "mediated again")
            await got.wait_for(2)
            assert got.messages == ["mediated", "mediated again"]  # nothing arrived around the mediator
            decisions = await kernel.recorder.query(
                event_type=DECISION_EVENTS, filters={"data.operation": "publish"}
            )
            assert [d.data["resource"] for d in decisions] == ["tasks.work", "tasks.work"]
        finally:
            await raw.close()
    finally:
        await agent.close()
        await receiver.close()
        await service.stop()
        await kernel.close()


async def test_replies_are_mediated_and_a_reply_around_the_service_is_refused(nats_port: int) -> None:
    import nats

    kernel, service, responder = await service_and_responder(
        nats_port, Pattern("reply", "tasks.private"), answer="re: "
    )
    requester = agent_client("agent-a", nats_port)
    try:
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
        await requester.subscribe("_INBOX.agent-a.>", inbox)
        raw = await nats.connect(url("agent-b", nats_port), error_cb=on_error)
        try:
            await raw.publish("_INBOX.agent-a.1", b"around the service")
            await raw.flush()
            await wait_until(lambda: any("permissions violation" in str(e).lower() for e in errors))
            # The server handled the forged reply before this request: only the real reply arrives.
            assert await requester.request(ingress_subject("tasks.ask"), "again", timeout=3) == "re: again"
            await inbox.wait_for(1)
            assert inbox.messages == ["re: again"]
        finally:
            await raw.close()
    finally:
        for client in (requester, responder):
            await client.close()
        await service.stop()
        await kernel.close()


async def test_an_agent_cannot_read_another_agents_reply_inbox(nats_port: int) -> None:
    """Under the generated permissions agent-b may subscribe only to ``_INBOX.agent-b.>``: its
    subscription to agent-a's inboxes (or all inboxes) is refused by the server, and the reply
    the service forwards to agent-a reaches agent-a alone."""
    import nats

    kernel, service, responder = await service_and_responder(nats_port, answer="secret answer to ")
    requester = agent_client("agent-a", nats_port)
    try:
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        spy = await nats.connect(url("agent-b", nats_port), error_cb=on_error)
        try:
            stolen: list[bytes] = []

            async def steal(msg: object) -> None:
                stolen.append(msg.data)  # type: ignore[attr-defined]

            await spy.subscribe("_INBOX.agent-a.>", cb=steal)
            await spy.subscribe("_INBOX.>", cb=steal)
            await spy.flush()
            own: list[bytes] = []

            async def mine(msg: object) -> None:
                own.append(msg.data)  # type: ignore[attr-defined]

            await spy.subscribe("_INBOX.agent-b.x", cb=mine)  # its own inboxes are allowed
            await spy.flush()

            answer = await requester.request(ingress_subject("tasks.ask"), "q1", timeout=3)
            assert answer == "secret answer to q1"
            await wait_until(lambda: len(errors) >= 2)
            refused = [str(e).lower() for e in errors]
            assert sum("permissions violation for subscription" in e for e in refused) == 2, refused
            assert all("_inbox.agent-b" not in e for e in refused)  # its own inbox was not refused
            # The forwarded reply went to agent-a's inbox only; the spy's subscriptions got nothing.
            await spy.flush()
            assert stolen == []
            assert service.stats.replies_forwarded == 1
        finally:
            await spy.close()
    finally:
        for client in (requester, responder):
            await client.close()
        await service.stop()
        await kernel.close()


async def test_an_agents_requests_need_its_inbox_under_its_own_prefix(
    nats_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``inbox_prefix`` the client's inbox is the adapter's ``_INBOX.<random>``: the
    server refuses the agent's subscription to it and the service denies the request (its
    ``reply_to`` is not the agent's inbox). With ``inbox_prefix=agent_inbox(agent)`` the same
    agent's request is forwarded and its reply arrives."""
    kernel, service, responder = await service_and_responder(nats_port, answer="re: ")
    plain = AMB("nats", url("agent-a", nats_port), agent_id="agent-a")
    mediated = agent_client("agent-a", nats_port)
    try:
        adapter_inbox = plain.broker.inbox_prefix()
        assert not adapter_inbox.startswith(agent_inbox("agent-a") + ".")
        with caplog.at_level(logging.WARNING, logger="agent_os.bus_adapters.nats"):
            with pytest.raises(RequestTimeout):
                await plain.request(ingress_subject("tasks.ask"), "plain", timeout=0.5)
            await wait_until(
                lambda: any(
                    "permissions violation for subscription" in r.getMessage().lower()
                    and adapter_inbox.lower() in r.getMessage().lower()
                    for r in caplog.records
                ),
                what="the server's refusal of the adapter's inbox",
            )
        refused = await kernel.recorder.query(filters={"data.operation": "request", "data.decision": "deny"})
        assert len(refused) == 1
        assert "inbox" in refused[0].data["reason"]

        payload, meta = await mediated.request(
            ingress_subject("tasks.ask"), "prefixed", timeout=3, with_metadata=True
        )
        assert payload == "re: prefixed"
        assert meta.subject.startswith(agent_inbox("agent-a") + ".")
        allowed = await kernel.recorder.query(filters={"data.operation": "request", "data.decision": "allow"})
        assert len(allowed) == 1
        assert service.stats.replies_forwarded == 1
    finally:
        for client in (plain, mediated, responder):
            await client.close()
        await service.stop()
        await kernel.close()
