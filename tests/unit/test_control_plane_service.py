"""The control-plane service (mediated mode) on the in-memory broker, and its admin API."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_os.amb import AMB, LifecycleState, Metadata, RequestTimeout, get_serializer
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.amb.envelope import Envelope, new_id
from agent_os.amb.middleware import Middleware
from agent_os.control_plane import DECISION_EVENTS, AgentSignal, FlightRecorder, KernelSpace, Pattern, Policy
from agent_os.control_plane.admin import AdminAPI
from agent_os.control_plane.errors import InboxBusy, PolicyLoadError
from agent_os.control_plane.mediation.replies import PendingRequests
from agent_os.control_plane.policy.loader import load_policy, load_policy_text
from agent_os.iatp import IATP, SigningRejected
from agent_os.services._identity import VerificationRequired
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    ReplyViaService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
    nats_authorization,
    nats_users,
    reply_subject,
)
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.identities import identities


def agent_client(where: str, agent: str, middleware: list[Middleware] | None = None) -> AMB:
    """An agent's client in mediated mode on the memory broker ``where``: its reply inbox is
    under the agent's own prefix (``_INBOX.<agent>.``), as mediated mode requires."""
    return AMB("memory", where, agent_id=agent, inbox_prefix=agent_inbox(agent), middleware=middleware or [])


def mediated_policy() -> Policy:
    policy = Policy("mediated", default_action="deny")
    policy.add_rule("deny", Pattern("publish", "tasks.secret"), reason="secret")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    policy.add_rule("allow", Pattern("signal", "*"))
    policy.add_rule("allow", Pattern("reply", "*"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


async def test_async_with_starts_and_stops_the_service() -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    async with (
        KernelSpace(policy=mediated_policy()) as kernel,
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True, agents=["agent-b"]
        ) as service,
        AMB("memory", where, agent_id="agent-a") as agent,
        AMB("memory", where, agent_id="agent-b") as receiver,
    ):
        got = Collector()
        await receiver.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
        await agent.publish(ingress_subject("tasks.work"), 1)
        await got.wait_for(1)
        assert service.stats.forwarded == 1
    assert service.client.state is LifecycleState.CLOSED


async def test_two_service_instances_forward_each_allowed_message_once(closing: Closing) -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    recorder = closing(FlightRecorder("memory"))
    services = []
    for i in range(2):
        kernel = closing(KernelSpace(policy=mediated_policy(), flight_recorder=recorder))
        service = closing(
            ControlPlaneService(
                AMB("memory", where, agent_id=f"control-plane-{i}"),
                kernel,
                trust_bus=True,
                agents=["agent-b"],
            )
        )
        await service.start()
        services.append(service)
    agent = closing(AMB("memory", where, agent_id="agent-a"))
    receiver = closing(AMB("memory", where, agent_id="agent-b"))
    watcher = closing(AMB("memory", where))
    got, dlq = Collector(), Collector()
    await receiver.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
    await watcher.subscribe("_DLQ.>", dlq)
    for i in range(20):
        await agent.publish(ingress_subject("tasks.work"), i)
    await agent.publish(ingress_subject("tasks.secret"), "nope")
    await got.wait_for(20)
    await dlq.wait_for(1)
    await asyncio.sleep(0.02)
    assert sorted(got.messages) == list(range(20))
    assert got.metadata[0].sender == "agent-a"  # the envelope is forwarded unchanged
    assert dlq.metadata[0].headers[DLQ_REASON] == "policy_denied"
    forwarded = [s.stats.forwarded for s in services]
    assert sum(forwarded) == 20
    assert all(f > 0 for f in forwarded)  # the queue group shares the load
    decisions = await recorder.query(event_type=DECISION_EVENTS, filters={"data.operation": "publish"})
    assert len(decisions) == 21  # exactly one per message
    assert {d.agent_id for d in decisions} == {"agent-a"}
    deliveries = await recorder.query(event_type=DECISION_EVENTS, filters={"data.operation": "deliver"})
    assert {d.agent_id for d in deliveries} == {"agent-b"}  # and one per recipient of each allowed one
    assert len(deliveries) == 20
    for client in (agent, receiver, watcher):
        await client.close()
    for service in services:
        await service.stop()


async def test_the_service_enforces_a_senders_signals(closing: Closing) -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=mediated_policy()))
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True, agents=["agent-b"]
        )
    )
    await service.start()
    agent = closing(AMB("memory", where, agent_id="agent-a"))
    receiver = closing(AMB("memory", where, agent_id="agent-b"))
    got = Collector()
    await receiver.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
    await agent.publish(ingress_subject("tasks.work"), 0)
    await got.wait_for(1)
    await kernel.send_signal("agent-a", AgentSignal.SIGSTOP)  # the service holds agent-a's messages
    for i in range(1, 4):
        await agent.publish(ingress_subject("tasks.work"), i)
    await wait_until(lambda: kernel.get_agent("agent-a").held >= 1)
    assert got.messages == [0]
    await kernel.send_signal("agent-a", AgentSignal.SIGCONT)
    await got.wait_for(4)
    assert got.messages == [0, 1, 2, 3]
    await kernel.send_signal("agent-a", AgentSignal.SIGKILL)
    await agent.publish(ingress_subject("tasks.work"), 99)
    await wait_until(lambda: service.client.stats.rejected == 1)
    assert got.messages == [0, 1, 2, 3]
    dropped = await kernel.recorder.query(event_type="message_dropped")
    assert [d.agent_id for d in dropped] == ["agent-a"]
    held = await kernel.recorder.query(event_type="message_held")
    assert len(held) >= 1
    for client in (agent, receiver):
        await client.close()
    await service.stop()
    await kernel.close()


def test_nats_authorization_confines_agents_to_ingress() -> None:
    users = nats_users(["a1"], "svc", passwords={"a1": "p1", "svc": "p2"})
    text = nats_authorization(users)
    agent, service = users
    assert agent.publish == ("ingress.>", "replies.>")  # no inbox, no dead letters: only the service
    assert "_INBOX.a1.>" in agent.subscribe  # its own inboxes only, nobody else's replies
    assert not any(s.startswith("_INBOX") and s != "_INBOX.a1.>" for s in agent.subscribe)
    assert "_INBOX.>" in service.publish
    assert "replies.>" in service.subscribe
    assert "_ctl.signal.a1" in agent.subscribe
    assert not any(p.startswith("deliver") for p in agent.publish)
    assert "deliver.>" in service.publish
    assert "_DLQ.>" in service.publish
    assert agent.subscribe[0] == "deliver.a1.>"  # its own deliveries only
    # Dead letters: its own copies only, never the operator's; it writes none.
    assert [s for s in agent.subscribe if s.startswith("_DLQ")] == ["_DLQ_AGENT.a1.>"]
    assert "_DLQ_AGENT.>" in service.publish
    assert '{user: "a1", password: "p1"' in text
    assert text.startswith("authorization {")
    for bad in ("a.b", "a*", "a>", "a b", ""):  # one agent's inboxes would cover another's
        with pytest.raises(ValueError, match="agent id"):
            nats_users([bad])


def reply_policy() -> Policy:
    policy = Policy("mediated-replies", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    policy.add_rule("allow", Pattern("request", "tasks.*"))
    policy.add_rule("deny", Pattern("reply", "tasks.secret-answer"), reason="answers stay private")
    policy.add_rule("allow", Pattern("reply", "tasks.*", conditions={"recipient": "agent-a"}))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


async def test_replies_pass_policy_at_the_instance_that_forwarded_the_request(closing: Closing) -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    recorder = closing(FlightRecorder("memory"))
    services = []
    for i in range(2):
        kernel = closing(KernelSpace(policy=reply_policy(), flight_recorder=recorder))
        service = closing(
            ControlPlaneService(
                AMB("memory", where, agent_id=f"control-plane-{i}"),
                kernel,
                trust_bus=True,
                agents=["agent-b"],
            )
        )
        await service.start()
        services.append(service)
    requester = closing(agent_client(where, "agent-a"))
    responder = closing(AMB("memory", where, agent_id="agent-b", middleware=[ReplyViaService()]))

    async def answer(message: Any, metadata: Any) -> None:
        await responder.reply(metadata, {"answer": message})

    await responder.subscribe(delivery_subject("tasks.>", agent="agent-b"), answer)
    for i in range(6):
        assert await requester.request(ingress_subject("tasks.ask"), i, timeout=2) == {"answer": i}
    assert sum(s.stats.replies_forwarded for s in services) == 6
    assert sum(s.pending.unmatched for s in services) == 6  # each reply reached both; one owned it
    replies = await recorder.query(event_type=DECISION_EVENTS, filters={"data.operation": "reply"})
    assert len(replies) == 6  # exactly one decision per reply
    assert {(r.data["resource"], r.data["decision"], r.agent_id) for r in replies} == {
        ("tasks.ask", "allow", "agent-b")
    }
    assert all(r.data["requester"] == "agent-a" for r in replies)

    with pytest.raises(RequestTimeout):  # the reply is denied by policy: it never arrives
        await requester.request(ingress_subject("tasks.secret-answer"), "x", timeout=0.3)
    denied = await recorder.query(filters={"data.operation": "reply", "data.decision": "deny"})
    assert [d.data["resource"] for d in denied] == ["tasks.secret-answer"]
    for client in (requester, responder):
        await client.close()
    for service in services:
        await service.stop()
        await service.kernel.close()


async def test_forged_late_and_duplicate_replies_are_refused(closing: Closing) -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=reply_policy()))
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True, agents=["agent-b"]
        )
    )
    await service.start()
    requester = closing(AMB("memory", where, agent_id="agent-a"))
    responder = closing(AMB("memory", where, agent_id="agent-b", middleware=[ReplyViaService()]))
    inbox = Collector()
    await requester.subscribe("_INBOX.>", inbox)  # whatever reaches any inbox
    got = Collector()
    await responder.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
    await requester.publish(ingress_subject("tasks.ask"), "q", reply_to="_INBOX.agent-a.1", ttl=5)
    await got.wait_for(1)
    request = got.metadata[0]

    # Forged: an inbox nobody asked on. Dropped, counted, never delivered.
    await responder.publish(reply_subject("_INBOX.agent-a.99"), "forged", correlation_id="x")
    await wait_until(lambda: service.pending.unmatched == 1)
    # A wrong correlation id is denied and recorded.
    await responder.publish(reply_subject("_INBOX.agent-a.1"), "wrong", correlation_id="not-the-request")
    await wait_until(lambda: service.client.stats.rejected == 1)
    # The right reply passes once; a second one is denied.
    await responder.reply(request, "first")
    await responder.reply(request, "second")
    await wait_until(lambda: service.client.stats.rejected == 2)
    await inbox.wait_for(1)
    assert service.stats.replies_forwarded == 1  # every reply is accounted for: 1 on, 3 refused
    assert inbox.messages == ["first"]
    reasons = [
        r.data["reason"]
        for r in await kernel.recorder.query(filters={"data.operation": "reply", "data.decision": "deny"})
    ]
    assert reasons == [
        "the reply's correlation id does not match the request",
        "the request was already answered",
    ]
    # A request whose reply_to is not an inbox is refused on the request leg.
    await requester.publish(ingress_subject("tasks.ask"), "q", reply_to="deliver.tasks.other")
    await wait_until(lambda: service.client.stats.rejected == 3)
    refused = await kernel.recorder.query(filters={"data.operation": "request", "data.decision": "deny"})
    assert "inbox" in refused[0].data["reason"]
    for client in (requester, responder):
        await client.close()
    await service.stop()
    await kernel.close()


async def test_an_envelope_whose_topic_is_not_its_subject_is_refused(closing: Closing) -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=mediated_policy()))
    service = closing(
        ControlPlaneService(AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True)
    )
    await service.start()
    agent = closing(AMB("memory", where, agent_id="agent-a"))
    receiver = closing(AMB("memory", where, agent_id="agent-b"))
    got = Collector()
    await receiver.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
    await agent.connect()
    # Checked as the allowed tasks.work, but sent on the subject of the denied tasks.secret.
    env = Envelope(new_id(), ingress_subject("tasks.work"), "agent-a", "smuggled", timestamp=time.time_ns())
    await agent.broker.publish(ingress_subject("tasks.secret"), get_serializer("msgpack").encode(env))
    await wait_until(lambda: service.client.stats.rejected == 1)
    assert got.messages == []
    record = (await kernel.recorder.query(event_type=DECISION_EVENTS))[0]
    assert record.data["decision"] == "deny"
    assert "is not its subject" in record.data["reason"]
    for client in (agent, receiver):
        await client.close()
    await service.stop()
    await kernel.close()


TOKEN = "admin-token-0123456789"


async def test_admin_api(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy=mediated_policy()))
    where = f"memory://cp-admin-{uuid.uuid4().hex}"
    bus = closing(AMB("memory", where, agent_id="worker"))
    kernel.attach(bus)
    await bus.connect()
    await bus.publish("tasks.x", 1)
    api = closing(AdminAPI(kernel, TOKEN))
    port = await api.start()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(method, base + path, **kw) as resp:
            body = await resp.text()
            return resp.status, body

    try:
        assert (await call("GET", "/healthz"))[0] == 200
        assert (await call("GET", "/agents"))[0] == 401
        assert (await call("GET", "/agents", headers={"Authorization": "Bearer wrong"}))[0] == 401
        assert api.unauthorized == 2
        status, body = await call("GET", "/agents", headers=auth)
        assert status == 200
        assert '"id": "worker"' in body
        assert (await call("GET", "/agents/nobody", headers=auth))[0] == 404
        status, body = await call("POST", "/agents/worker/signal", headers=auth, json={"signal": "SIGSTOP"})
        assert (status, body) == (200, '{"ok": true}')
        assert kernel.get_agent_status("worker").state == "stopped"
        assert (await call("POST", "/agents/worker/signal", headers=auth, json={"signal": "SIGNOPE"}))[
            0
        ] == 400
        status, body = await call(
            "POST", "/policy/reload", headers=auth, data="name: p\nrules:\n  - action: x\n"
        )
        assert status == 400
        assert '"line": 3' in body
        status, body = await call("POST", "/policy/reload", headers=auth, data="name: p\nversion: '7'\n")
        assert (status, body) == (200, '{"ok": true, "version": "7", "require_verified_sender": false}')
        status, body = await call("GET", "/records?event_type=signal", headers=auth)
        assert status == 200
        assert "SIGSTOP" in body
        status, body = await call("GET", "/verify", headers=auth)
        assert '"ok": true' in body
        status, body = await call("GET", "/metrics", headers=auth)
        assert status == 200
        assert 'agentos_agents{state="stopped"} 1.0' in body
        assert "agentos_recorder_records_appended_total" in body
    finally:
        await api.stop()
        await kernel.send_signal("worker", AgentSignal.SIGKILL)
        await bus.close()
        await kernel.close()


def test_admin_token_must_be_long() -> None:
    with pytest.raises(ValueError, match="16 characters"):
        AdminAPI(KernelSpace(), "short")


# -- verified senders (IATP on the service) ------------------------------------------------------


def admin_only_policy() -> Policy:
    policy = Policy("admin-only", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*", conditions={"sender": "admin"}))
    policy.add_rule("allow", Pattern("publish", "tasks.a", conditions={"sender": "agent-a"}))
    policy.add_rule("allow", Pattern("request", "tasks.*"))
    policy.add_rule("allow", Pattern("reply", "tasks.*"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


async def test_a_killed_agent_cannot_pass_as_another_sender_when_the_service_verifies(
    closing: Closing,
) -> None:
    """The reproduced finding: after SIGKILL of agent-a, the same client published with
    sender_id="admin" and the service forwarded it. With IATP on the service, a message whose
    sender is not proven never reaches policy: unsigned and re-labelled messages are
    dead-lettered with IATP's reason, counted, and recorded nowhere as an allow."""
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    keys = await identities("control-plane", "agent-a", "agent-b", "admin")
    kernel = closing(KernelSpace(policy=admin_only_policy()))
    service_client = closing(AMB("memory", where, agent_id="control-plane"))
    service = closing(ControlPlaneService(service_client, kernel, iatp=keys["control-plane"]))
    assert isinstance(kernel.policy, Policy)
    assert kernel.policy.require_verified_sender is True  # forced on with IATP
    await service.start()
    receiver = closing(AMB("memory", where, agent_id="agent-b", middleware=[keys["agent-b"].middleware()]))
    got, dead = Collector(), Collector()
    await receiver.subscribe(delivery_subject("tasks.>", agent="agent-b"), got)
    watcher = closing(AMB("memory", where))
    await watcher.subscribe("_DLQ.>", dead)
    agent = closing(AMB("memory", where, agent_id="agent-a", middleware=[keys["agent-a"].middleware()]))
    admin = closing(AMB("memory", where, agent_id="admin", middleware=[keys["admin"].middleware()]))

    await admin.publish(ingress_subject("tasks.work"), "from admin")
    await got.wait_for(1)  # forwarded unchanged: agent-b's own IATP verified admin's signature
    assert got.metadata[0].context["iatp"].sender == "admin"
    await agent.publish(ingress_subject("tasks.a"), "agent-a's own")
    await got.wait_for(2)

    await kernel.send_signal("agent-a", AgentSignal.SIGKILL)
    with pytest.raises(SigningRejected):  # agent-a's client holds no key of admin's
        await agent.publish(ingress_subject("tasks.work"), "as admin", sender_id="admin")
    raw = closing(AMB("memory", where, agent_id="agent-a"))
    await raw.publish(ingress_subject("tasks.work"), "unsigned as admin", sender_id="admin")
    relabelled = await keys["agent-a"].sign("agent-a", "relabelled", topic=ingress_subject("tasks.work"))
    relabelled = dataclasses.replace(relabelled, sender="admin")
    await raw.broker.publish(ingress_subject("tasks.work"), get_serializer("msgpack").encode(relabelled))
    await agent.publish(ingress_subject("tasks.work"), "agent-a, killed")
    await dead.wait_for(3)
    reasons = sorted(m.headers[DLQ_REASON] for m in dead.metadata)
    assert reasons == ["agent_killed", "unknown_key", "unsigned"]
    assert service.unverified == 2
    assert service.client.stats.rejected == 3  # every message is accounted for: 2 on, 3 refused
    assert service.stats.forwarded == 2
    assert got.messages == ["from admin", "agent-a's own"]
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS, filters={"data.operation": "publish"})
    assert [(d.agent_id, d.data["decision"]) for d in decisions] == [("admin", "allow"), ("agent-a", "allow")]
    # Without --agents the roster is the agents of the service's identities.
    deliveries = await kernel.recorder.query(
        event_type=DECISION_EVENTS, filters={"data.operation": "deliver"}
    )
    assert sorted(d.agent_id for d in deliveries) == sorted(["admin", "agent-a", "agent-b"] * 2)
    dropped = await kernel.recorder.query(event_type="message_dropped")
    assert [d.agent_id for d in dropped] == ["agent-a"]
    for client in (receiver, watcher, agent, admin, raw):
        await client.close()
    await service.stop()
    await kernel.close()


async def test_replies_pass_a_verifying_service_signed_end_to_end(closing: Closing) -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    keys = await identities("control-plane", "agent-a", "agent-b")
    kernel = closing(KernelSpace(policy=admin_only_policy()))
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, iatp=keys["control-plane"]
        )
    )
    await service.start()
    responder = closing(
        AMB("memory", where, agent_id="agent-b", middleware=[keys["agent-b"].middleware(), ReplyViaService()])
    )

    async def answer(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, {"answer": message, "asked_by": metadata.context["iatp"].sender})

    await responder.subscribe(delivery_subject("tasks.>", agent="agent-b"), answer)
    requester = closing(agent_client(where, "agent-a", [keys["agent-a"].middleware()]))
    reply = await requester.request(ingress_subject("tasks.ask"), 7, timeout=3)
    assert reply == {"answer": 7, "asked_by": "agent-a"}
    assert service.stats.replies_forwarded == 1
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS)
    assert {
        (d.data["operation"], d.data["verified"]) for d in decisions if d.data["operation"] != "deliver"
    } == {
        ("request", True),
        ("reply", True),
    }
    for client in (requester, responder):
        await client.close()
    await service.stop()
    await kernel.close()


async def test_the_service_refuses_to_run_without_verification_unless_told_to_trust_the_bus() -> None:
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    with pytest.raises(VerificationRequired, match="without sender verification"):
        ControlPlaneService(AMB("memory", where, agent_id="control-plane"), KernelSpace())
    with pytest.raises(VerificationRequired, match="contradicts"):
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), KernelSpace(), iatp=IATP(), trust_bus=True
        )


async def reload_policy(port: int, body: str | bytes) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/policy/reload", headers={"Authorization": f"Bearer {TOKEN}"}, data=body
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_reload_body_is_yaml_text_never_a_file(tmp_path: Path) -> None:
    """The admin's reload body is parsed as YAML text: a body naming a local .yaml file is a
    YAML scalar (refused with the line), and the file is never read."""
    local = tmp_path / "some.yaml"
    local.write_text("name: from-a-local-file\nversion: '99'\ndefault_action: allow\n")
    kernel = KernelSpace(policy=Policy("before", version="1"))
    api = AdminAPI(kernel, TOKEN)
    port = await api.start()
    try:
        for body in (str(local), "/etc/some.yaml", "relative/policy.yml"):
            status, answer = await reload_policy(port, body)
            assert status == 400, answer
            assert (answer["error"], answer["line"]) == ("line 1: a policy must be a mapping", 1)
            assert isinstance(kernel.policy, Policy)
            assert kernel.policy.version == "1"  # unchanged: the file was not loaded
        status, answer = await reload_policy(port, b"name: \xff\xfe")
        assert (status, answer["error"]) == (400, "the policy must be UTF-8 text")
        assert isinstance(kernel.policy, Policy)
        assert kernel.policy.version == "1"
    finally:
        await api.stop()
        await kernel.close()
    with pytest.raises(PolicyLoadError, match="must be a mapping"):
        load_policy_text(str(local))
    assert load_policy(local).version == "99"  # the file loader still reads a file it is given


async def test_a_reload_keeps_verified_senders_required_when_the_service_verifies() -> None:
    kernel = KernelSpace(policy=Policy("before", version="1", require_verified_sender=True))
    api = AdminAPI(kernel, TOKEN, require_verified_sender=True)
    port = await api.start()
    try:
        status, answer = await reload_policy(port, "name: p\nversion: '2'\nrequire_verified_sender: false\n")
        assert (status, answer["require_verified_sender"]) == (200, True)
        assert isinstance(kernel.policy, Policy)
        assert kernel.policy.version == "2"
        assert kernel.policy.require_verified_sender is True
    finally:
        await api.stop()
        await kernel.close()


# -- reply inboxes belong to their requester -----------------------------------------------------


def test_pending_requests_refuse_an_inbox_that_still_waits_for_a_reply() -> None:
    pending = PendingRequests()
    first = pending.add("_INBOX.a.1", "req-1", "a", "tasks.ask", "b")
    with pytest.raises(InboxBusy, match="still waiting"):
        pending.add("_INBOX.a.1", "req-2", "mallory", "tasks.other")
    assert pending.get("_INBOX.a.1") is first  # the live entry is not overwritten
    assert (first.requester, first.request_id) == ("a", "req-1")
    first.answered = True  # answered: the inbox may be used again
    again = pending.add("_INBOX.a.1", "req-3", "a", "tasks.ask")
    assert pending.get("_INBOX.a.1") is again
    expired = pending.add("_INBOX.a.2", "req-4", "a", "tasks.ask", expires_at=time.time_ns() - 1)
    assert not pending.waiting("_INBOX.a.2")  # expired (still matched within the grace)
    assert pending.get("_INBOX.a.2") is expired
    assert pending.add("_INBOX.a.2", "req-5", "a", "tasks.ask").request_id == "req-5"


async def test_a_request_must_reply_to_an_inbox_of_its_own_sender(closing: Closing) -> None:
    """agent-b cannot have replies routed to agent-a's inbox (nor take over agent-a's pending
    entry), and agent-a cannot reuse an inbox that still waits for a reply."""
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=reply_policy()))
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True, agents=["agent-c"]
        )
    )
    await service.start()
    a = closing(AMB("memory", where, agent_id="agent-a"))
    b = closing(AMB("memory", where, agent_id="agent-b"))
    got = Collector()
    await closing(AMB("memory", where, agent_id="agent-c")).subscribe(
        delivery_subject("tasks.>", agent="agent-c"), got
    )
    await a.publish(ingress_subject("tasks.ask"), "a's", reply_to="_INBOX.agent-a.1", ttl=5)
    await got.wait_for(1)
    entry = service.pending.get("_INBOX.agent-a.1")
    assert entry is not None
    assert entry.requester == "agent-a"
    # agent-b names agent-a's inbox: denied, and agent-a's entry is untouched.
    await b.publish(ingress_subject("tasks.ask"), "b's", reply_to="_INBOX.agent-a.1", ttl=5)
    await b.publish(ingress_subject("tasks.ask"), "b's", reply_to="_INBOX.agent-a.2", ttl=5)
    await b.publish(ingress_subject("tasks.ask"), "b's", reply_to="_INBOX.agent-ab.1", ttl=5)
    # agent-a asks again on the inbox that still waits: denied.
    await a.publish(ingress_subject("tasks.ask"), "again", reply_to="_INBOX.agent-a.1", ttl=5)
    await wait_until(lambda: service.client.stats.rejected == 4)
    assert service.pending.get("_INBOX.agent-a.1") is entry
    assert entry.requester == "agent-a"
    assert service.pending.get("_INBOX.agent-a.2") is None
    # agent-b on its own inbox passes.
    await b.publish(ingress_subject("tasks.ask"), "b's own", reply_to="_INBOX.agent-b.1", ttl=5)
    await got.wait_for(2)
    assert got.messages == ["a's", "b's own"]
    denied = await kernel.recorder.query(filters={"data.operation": "request", "data.decision": "deny"})
    assert [d.data["reason"] for d in denied] == [
        "reply_to must be an inbox of the sender (_INBOX.agent-b....)",
        "reply_to must be an inbox of the sender (_INBOX.agent-b....)",
        "reply_to must be an inbox of the sender (_INBOX.agent-b....)",
        "reply_to is already waiting for the reply to another request",
    ]
    requests = await kernel.recorder.query(event_type=DECISION_EVENTS, filters={"data.operation": "request"})
    assert len(requests) == 6  # one per message
    for client in (a, b):
        await client.close()
    await service.stop()
    await kernel.close()


# -- signals ahead of time -----------------------------------------------------------------------


async def test_the_service_signals_an_agent_it_has_not_heard_from_yet(closing: Closing) -> None:
    """The service's kernel is authoritative: SIGSTOP / SIGKILL to an agent that has sent
    nothing yet apply to its first messages (no request on the bus to a kernel nobody runs)."""
    where = f"memory://cp-svc-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=mediated_policy(), signal_timeout=5.0))
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True, agents=["agent-r"]
        )
    )
    await service.start()
    receiver = closing(AMB("memory", where, agent_id="agent-r"))
    got = Collector()
    await receiver.subscribe(delivery_subject("tasks.>", agent="agent-r"), got)
    assert await kernel.send_signal("late-a", AgentSignal.SIGSTOP)  # at once: not a remote request
    assert await kernel.send_signal("late-b", AgentSignal.SIGKILL)
    assert kernel.get_agent_status("late-a").state == "stopped"
    assert kernel.get_agent_status("late-b").state == "terminated"
    a = closing(AMB("memory", where, agent_id="late-a"))
    b = closing(AMB("memory", where, agent_id="late-b"))
    await b.publish(ingress_subject("tasks.work"), "b1")
    await wait_until(lambda: service.client.stats.rejected == 1)  # late-b's first message: dropped
    await a.publish(ingress_subject("tasks.work"), "a1")
    await wait_until(lambda: kernel.get_agent("late-a").held == 1)  # late-a's first message: held
    assert got.messages == []
    assert await kernel.send_signal("late-a", AgentSignal.SIGCONT)
    await got.wait_for(1)
    assert got.messages == ["a1"]
    signals = await kernel.recorder.query(event_type="signal")
    assert [(s.agent_id, s.data["signal"], s.data["outcome"]) for s in signals] == [
        ("late-a", "SIGSTOP", "delivered"),
        ("late-b", "SIGKILL", "delivered"),
        ("late-a", "SIGCONT", "delivered"),
    ]
    for client in (a, b, receiver):
        await client.close()
    await service.stop()
    await kernel.close()


async def test_the_admin_reload_of_several_policies_names_which() -> None:
    base, extra = Policy("base", version="1"), Policy("extra", version="1")
    kernel = KernelSpace(policy=base, policies=[extra])
    api = AdminAPI(kernel, TOKEN)
    port = await api.start()
    try:
        status, answer = await reload_policy(port, "name: x\nversion: '2'\n")
        assert status == 400
        assert "say which one" in answer["error"]
        assert (base.version, extra.version) == ("1", "1")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/policy/reload?policy=extra",
                headers={"Authorization": f"Bearer {TOKEN}"},
                data="name: x\nversion: '2'\n",
            ) as resp,
        ):
            assert (resp.status, (await resp.json())["version"]) == (200, "2")
        assert (base.version, extra.version) == ("1", "2")
    finally:
        await api.stop()
        await kernel.close()
