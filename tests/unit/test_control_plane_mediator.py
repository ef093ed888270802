"""The mediator on the in-memory broker: policy, signals and recording on every message."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent_os.amb import AMB, Envelope, LifecycleState, Metadata, Middleware, RequestTimeout, StateError
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.amb.middleware import ConsumeNext
from agent_os.control_plane import (
    DECISION_EVENTS,
    AgentSignal,
    AgentStoppedError,
    FlightRecorder,
    HoldQueueFull,
    KernelSpace,
    Pattern,
    Policy,
    PolicyViolationError,
    SignalDispatcher,
)
from tests.support import Collector, memory_url, wait_until
from tests.support.closing import Closing


def open_policy(*extra: tuple[str, Pattern]) -> Policy:
    policy = Policy("test", default_action="deny")
    for action, pattern in extra:
        policy.add_rule(action, pattern)  # type: ignore[arg-type]
    policy.add_rule("allow", Pattern("*", "tasks.*"))
    policy.add_rule("allow", Pattern("signal", "*"))
    policy.add_rule("allow", Pattern("reply", "*"))
    return policy


@pytest.fixture
async def pair() -> AsyncIterator[tuple[KernelSpace, AMB, AMB, str]]:
    kernel = KernelSpace(
        policy=open_policy(
            ("deny", Pattern("publish", "tasks.forbidden")), ("deny", Pattern("deliver", "tasks.secret"))
        )
    )
    where = memory_url("cp")
    sender = AMB("memory", where, agent_id="sender")
    receiver = AMB("memory", where, agent_id="receiver")
    kernel.attach(sender)
    kernel.attach(receiver)
    await sender.connect()
    await receiver.connect()
    yield kernel, sender, receiver, where
    await sender.close()
    await receiver.close()
    await kernel.close()


async def test_exactly_one_record_per_decision(
    pair: tuple[KernelSpace, AMB, AMB, str], closing: Closing
) -> None:
    kernel, sender, receiver, where = pair
    got = Collector()
    dlq = Collector()
    await receiver.subscribe("tasks.>", got)
    watcher = closing(AMB("memory", where))
    await watcher.subscribe("_DLQ.>", dlq)
    for i in range(5):
        await sender.publish("tasks.work", {"i": i})
    with pytest.raises(PolicyViolationError) as info:
        await sender.publish("tasks.forbidden", {"i": "x"})
    assert info.value.reason == "policy_denied"
    await sender.publish("tasks.secret", {"i": "s"})  # allowed out, denied on delivery
    await got.wait_for(5)
    await dlq.wait_for(1)
    records = await kernel.recorder.query(event_type=DECISION_EVENTS)
    out = [r for r in records if r.data["direction"] == "out"]
    inbound = [r for r in records if r.data["direction"] == "in"]
    assert len(out) == 7  # 5 + forbidden + secret
    assert len(inbound) == 6  # 5 + secret
    assert len({r.data["message_id"] for r in out}) == 7
    assert [r.data["decision"] for r in out].count("deny") == 1
    assert [r.data["decision"] for r in inbound].count("deny") == 1
    assert dlq.metadata[0].headers[DLQ_REASON] == "policy_denied"
    assert receiver.stats.rejected == 1
    assert got.messages == [{"i": i} for i in range(5)]
    assert (await kernel.recorder.verify()).ok
    status = kernel.get_agent_status("receiver")
    assert (status.actions_count, status.violations_count) == (5, 1)
    await watcher.close()


async def test_sigkill_cancels_the_handler_and_nothing_of_the_agent_is_delivered_after(
    closing: Closing,
) -> None:
    kernel = closing(KernelSpace(policy=open_policy()))
    where = memory_url("cp")
    worker = closing(AMB("memory", where, agent_id="worker"))
    observer = closing(AMB("memory", where, agent_id="observer"))
    kernel.attach(worker)
    progress = Collector()
    await observer.subscribe("tasks.progress", progress)
    jobs = Collector()
    await observer.subscribe("tasks.job", jobs)
    started: list[int] = []
    finished: list[int] = []

    async def work(message: Any, metadata: Metadata) -> None:
        started.append(message)
        for step in range(100):
            await worker.publish("tasks.progress", {"job": message, "step": step})
            await asyncio.sleep(0.01)
        finished.append(message)

    await worker.subscribe("tasks.job", work)
    await observer.connect()
    for job in range(3):
        await observer.publish("tasks.job", job)
    await progress.wait_for(3)
    assert await kernel.send_signal("worker", AgentSignal.SIGKILL)
    seen = len(progress.messages)
    process = kernel.get_agent("worker")
    # The handler is cancelled at once: had it gone on, it would finish its job (1 s) first.
    await wait_until(lambda: not process.tasks, what="the worker's handler to end")
    assert finished == []
    # Sentinel: the observer (alive) publishes after the worker's last possible message, so
    # whatever the worker published has arrived once the sentinel has.
    await observer.publish("tasks.progress", "sentinel")
    await wait_until(lambda: "sentinel" in progress.messages, what="the sentinel")
    from_worker = progress.messages[: progress.messages.index("sentinel")]
    assert progress.messages[-1] == "sentinel"
    assert len(from_worker) <= seen + 1  # at most a publish already on the wire at the kill
    assert from_worker == [{"job": 0, "step": step} for step in range(len(from_worker))]
    assert started == [0]  # the queued jobs never started
    # Nothing is delivered to it afterwards: its client is closed (no subscription is left),
    # and a job published now reaches the live subscriber, ahead of a second sentinel.
    await wait_until(lambda: worker.state is LifecycleState.CLOSED, what="the worker's client closed")
    await observer.publish("tasks.job", 99)
    await observer.publish("tasks.job", "sentinel")
    await jobs.wait_for(5)
    assert jobs.messages == [0, 1, 2, 99, "sentinel"]
    assert started == [0]
    assert finished == []
    assert kernel.get_agent_status("worker").state == "terminated"
    with pytest.raises(AgentStoppedError):
        await kernel.get_agent("worker").wait_for_continue()
    await observer.close()
    await worker.close()
    await kernel.close()


async def test_sigstop_holds_deliveries_and_publishes_until_sigcont_in_order(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy=open_policy()))
    where = memory_url("cp")
    agent = closing(AMB("memory", where, agent_id="agent"))
    peer = closing(AMB("memory", where, agent_id="peer"))
    kernel.attach(agent)
    inbox = Collector()
    outbox = Collector()
    await agent.subscribe("tasks.in", inbox)
    await peer.subscribe("tasks.out", outbox)
    await kernel.send_signal("agent", AgentSignal.SIGSTOP)
    for i in range(10):
        await peer.publish("tasks.in", i)
    published = [asyncio.create_task(agent.publish("tasks.out", i)) for i in range(5)]
    # Every publish, and the delivery at the head of the subscription (one handler at a time).
    await wait_until(lambda: kernel.get_agent("agent").held == 6, what="6 held messages")
    assert inbox.messages == []
    assert outbox.messages == []
    held = await kernel.recorder.query(event_type="message_held")
    assert len(held) == 6  # one record per held message
    await kernel.send_signal("agent", AgentSignal.SIGCONT)
    await asyncio.gather(*published)
    await inbox.wait_for(10)
    await outbox.wait_for(5)
    assert inbox.messages == list(range(10))
    assert outbox.messages == list(range(5))
    await peer.close()
    await agent.close()
    await kernel.close()


async def test_the_hold_queue_is_bounded_and_sigkill_drops_what_it_holds(closing: Closing) -> None:
    kernel = closing(
        KernelSpace(policy=open_policy(), signal_dispatcher=SignalDispatcher(None, queue_size=3))
    )
    agent = closing(AMB("memory", memory_url("cp"), agent_id="agent"))
    kernel.attach(agent)
    await agent.connect()
    await kernel.send_signal("agent", AgentSignal.SIGSTOP)
    held = [asyncio.create_task(agent.publish("tasks.out", i)) for i in range(3)]
    await wait_until(lambda: kernel.get_agent("agent").held == 3)
    with pytest.raises(HoldQueueFull):
        await agent.publish("tasks.out", 3)
    await kernel.send_signal("agent", AgentSignal.SIGKILL)
    results = await asyncio.gather(*held, return_exceptions=True)
    assert all(isinstance(r, AgentStoppedError) for r in results)
    with pytest.raises((AgentStoppedError, StateError)):  # refused, or the client is already closed
        await agent.publish("tasks.out", 4)
    await agent.close()
    await kernel.close()


async def test_on_violation_signal_kills_the_offending_agent(closing: Closing) -> None:
    policy = open_policy(("deny", Pattern("publish", "tasks.phi.*")))
    policy.rules[0].on_violation = AgentSignal.SIGKILL
    policy.reload(Policy("test", rules=policy.rules))
    kernel = closing(KernelSpace(policy=policy))
    agent = closing(AMB("memory", memory_url("cp"), agent_id="rogue"))
    kernel.attach(agent)
    await agent.connect()
    await agent.publish("tasks.ok", 1)
    with pytest.raises(PolicyViolationError):
        await agent.publish("tasks.phi.record", 2)
    assert kernel.get_agent_status("rogue").state == "terminated"
    with pytest.raises(AgentStoppedError):
        await agent.publish("tasks.ok", 3)
    await agent.close()
    await kernel.close()


class FakeIatp(Middleware):
    """Stands in for IATP's verifying middleware: it fills metadata.context["iatp"] (valid for
    a known ``key`` header, invalid otherwise; no result at all for ``key: "-"``, as for a
    client without IATP)."""

    def __init__(self, verified: dict[str, tuple[str, float]]) -> None:
        self.verified = verified

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        if envelope.headers.get("key") == "-":
            await call_next(envelope, metadata)
            return
        known = self.verified.get(envelope.headers.get("key", ""))
        if known is None:
            metadata.context["iatp"] = {
                "valid": False,
                "sender": None,
                "trust_level": 0.0,
                "reason": "unknown",
            }
        else:
            metadata.context["iatp"] = {
                "valid": True,
                "sender": known[0],
                "trust_level": known[1],
                "reason": "",
            }
        await call_next(envelope, metadata)


async def test_conditions_use_the_verified_sender_not_the_claimed_one(closing: Closing) -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule(
        "allow", Pattern("deliver", "pay.*", conditions={"sender": "billing", "min_trust_level": 0.8})
    )
    kernel = closing(KernelSpace(policy=policy))
    where = memory_url("cp")
    bank = closing(
        AMB(
            "memory",
            where,
            agent_id="bank",
            middleware=[FakeIatp({"k-billing": ("billing", 0.9), "k-low": ("billing", 0.3)})],
        )
    )
    kernel.attach(bank)
    other = closing(AMB("memory", where, agent_id="billing"))
    got = Collector()
    await bank.subscribe("pay.out", got)
    await other.publish("pay.out", "signed", headers={"key": "k-billing"})
    await other.publish("pay.out", "spoofed", sender_id="billing")  # claims billing, not verified
    await other.publish("pay.out", "low-trust", headers={"key": "k-low"})
    await wait_until(lambda: bank.stats.handled + bank.stats.rejected == 3)
    assert bank.stats.rejected == 2
    assert got.messages == ["signed"]
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS)
    assert [(d.data["verified"], d.data["decision"]) for d in decisions] == [
        (True, "allow"),
        (False, "deny"),
        (True, "deny"),
    ]
    await other.close()
    await bank.close()
    await kernel.close()


async def test_permission_hook_from_trust_edges(closing: Closing) -> None:
    edges = {("bob", "alice"): ["send_data"]}  # bob grants alice send_data
    kernel = closing(
        KernelSpace(policy=Policy("p", default_action="deny"), permissions=lambda a, b: edges.get((a, b), []))
    )
    kernel.policy.add_rule("allow", Pattern("deliver", "*", conditions={"permission": "send_data"}))  # type: ignore[union-attr]
    where = memory_url("cp")
    bob = closing(
        AMB(
            "memory",
            where,
            agent_id="bob",
            middleware=[FakeIatp({"ka": ("alice", 1.0), "km": ("mallory", 1.0)})],
        )
    )
    kernel.attach(bob)
    got = Collector()
    await bob.subscribe("data.in", got)
    peer = closing(AMB("memory", where, agent_id="peer"))
    await peer.publish("data.in", "from alice", headers={"key": "ka"})
    await peer.publish("data.in", "from mallory", headers={"key": "km"})
    await wait_until(lambda: bob.stats.handled + bob.stats.rejected == 2)
    assert got.messages == ["from alice"]
    assert bob.stats.rejected == 1
    await peer.close()
    await bob.close()
    await kernel.close()


async def test_a_registered_agents_bus_traffic_passes_its_permissions(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy=open_policy()))
    bus = closing(AMB("memory", memory_url("cp"), agent_id="shared"))
    kernel.attach(bus)
    await bus.connect()

    @kernel.register(permissions=["read"])
    async def reader() -> str:
        await bus.publish("tasks.x", 1)
        return "published"

    @kernel.register(permissions=["write"])
    async def writer() -> str:
        await bus.publish("tasks.x", 1)
        return "published"

    with pytest.raises(PolicyViolationError):
        await kernel.execute(reader)
    assert await kernel.execute(writer) == "published"
    await bus.close()
    await kernel.close()


async def test_signals_reach_an_agent_in_another_process_over_the_bus(closing: Closing) -> None:
    where = memory_url("cp")
    remote_kernel = closing(KernelSpace(policy=open_policy()))
    local_kernel = closing(KernelSpace(policy=open_policy()))
    remote = closing(AMB("memory", where, agent_id="remote-agent"))
    local = closing(AMB("memory", where, agent_id="supervisor"))
    remote_kernel.attach(remote)
    local_kernel.attach(local)
    got = Collector()
    await remote.subscribe("tasks.in", got)
    await local.connect()
    assert await local_kernel.send_signal("remote-agent", AgentSignal.SIGSTOP)
    assert remote_kernel.get_agent_status("remote-agent").state == "stopped"
    await local.publish("tasks.in", 1)
    await wait_until(lambda: remote_kernel.get_agent("remote-agent").held == 1)
    assert got.messages == []
    assert await local_kernel.send_signal("remote-agent", AgentSignal.SIGCONT)
    await got.wait_for(1)
    assert await local_kernel.send_signal("remote-agent", AgentSignal.SIGKILL)
    await wait_until(lambda: remote_kernel.get_agent_status("remote-agent").state == "terminated")
    local_kernel.signal_timeout = 0.2
    assert not await local_kernel.send_signal("nobody-here", AgentSignal.SIGKILL)
    signals = await remote_kernel.recorder.query(event_type="signal")
    assert [s.data["signal"] for s in signals] == ["SIGSTOP", "SIGCONT", "SIGKILL"]
    await local.close()
    await remote.close()
    await local_kernel.close()
    await remote_kernel.close()


async def test_remote_signals_need_policy_permission(closing: Closing) -> None:
    where = memory_url("cp")
    guarded = Policy("g", default_action="deny")
    guarded.add_rule("allow", Pattern("signal", "*", conditions={"sender": "root"}))
    remote_kernel = closing(KernelSpace(policy=guarded))
    remote = closing(AMB("memory", where, agent_id="victim"))
    remote_kernel.attach(remote)
    await remote.connect()
    attacker_kernel = closing(KernelSpace(policy="permissive", signal_timeout=0.2))
    attacker = closing(AMB("memory", where, agent_id="attacker"))
    attacker_kernel.attach(attacker)
    await attacker.connect()
    assert not await attacker_kernel.send_signal("victim", AgentSignal.SIGKILL)
    assert remote_kernel.get_agent_status("victim").state == "running"
    await attacker.close()
    await remote.close()
    await attacker_kernel.close()
    await remote_kernel.close()


async def test_policy_reload_under_traffic_drops_nothing(closing: Closing) -> None:
    policy = open_policy()
    kernel = closing(KernelSpace(policy=policy))
    where = memory_url("cp")
    pub = closing(AMB("memory", where, agent_id="pub"))
    sub = closing(AMB("memory", where, agent_id="sub"))
    kernel.attach(pub)
    kernel.attach(sub)
    got = Collector()
    await sub.subscribe("tasks.>", got)
    await pub.connect()

    async def publish_all() -> None:
        for i in range(300):
            await pub.publish("tasks.t", i)
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def reload_often() -> None:
        for v in range(30):
            kernel.reload_policy(Policy("test", version=str(v), rules=open_policy().rules))
            await asyncio.sleep(0)

    await asyncio.gather(publish_all(), reload_often())
    await got.wait_for(300)
    assert got.messages == list(range(300))
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS)
    assert len(decisions) == 600
    await pub.close()
    await sub.close()
    await kernel.close()


async def test_repeated_messages_are_decided_from_their_own_sender_payload_and_permissions(
    closing: Closing,
) -> None:
    """The mediator takes repeated decisions from the policy's cache: it must still tell
    senders, payloads, trust and an agent's changed permissions apart."""
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("deliver", "pay.big", conditions={"max_payload.amount": 100}))
    policy.add_rule("allow", Pattern("deliver", "pay.*", conditions={"sender": "billing"}))
    policy.add_rule("allow", Pattern("publish", "pay.*"))
    kernel = closing(KernelSpace(policy=policy))
    where = memory_url("cp")
    bank = closing(
        AMB(
            "memory",
            where,
            agent_id="bank",
            middleware=[FakeIatp({"k-billing": ("billing", 0.9), "k-eve": ("eve", 0.9)})],
        )
    )
    kernel.attach(bank)
    peer = closing(AMB("memory", where, agent_id="peer"))
    kernel.attach(peer)
    got = Collector()
    await bank.subscribe("pay.>", got)
    sent = [
        ("pay.out", "b1", "k-billing"),
        ("pay.out", "e1", "k-eve"),
        ("pay.out", "b2", "k-billing"),
        ("pay.out", "e2", "k-eve"),
        ("pay.big", {"amount": 5}, "k-eve"),
        ("pay.big", {"amount": 500}, "k-eve"),
        ("pay.big", {"amount": 7}, "k-eve"),
    ]
    for topic, payload, key in sent:
        await peer.publish(topic, payload, headers={"key": key})
    await wait_until(lambda: bank.stats.handled + bank.stats.rejected == len(sent))
    assert got.messages == ["b1", "b2", {"amount": 5}, {"amount": 7}]
    assert bank.stats.rejected == 3
    kernel.get_agent("peer").restrictions = frozenset({"publish"})  # as a spawn restriction would
    with pytest.raises(PolicyViolationError):
        await peer.publish("pay.out", "b3", headers={"key": "k-billing"})
    await peer.close()
    await bank.close()
    await kernel.close()


# -- who the sender is ---------------------------------------------------------------------------


def guarded_policy(victim: str) -> Policy:
    policy = Policy("victim", default_action="deny")
    policy.add_rule("allow", Pattern("signal", victim, conditions={"sender": "supervisor"}))
    policy.add_rule("allow", Pattern("reply", "*"))
    return policy


@pytest.mark.parametrize("how", ["no result, untrusted bus", "invalid result"])
async def test_a_claimed_sender_cannot_signal_an_agent(how: str, closing: Closing) -> None:
    """The reproduced finding: the victim's policy allows ``signal`` only from "supervisor";
    a third client's request("_ctl.signal.victim", SIGKILL, sender_id="supervisor") killed
    it. A claim is a sender only with a valid IATP result (or on a trusted bus)."""
    kernel = closing(KernelSpace(policy=guarded_policy("victim")))
    where = memory_url("cp")
    victim = closing(
        AMB("memory", where, agent_id="victim", middleware=[FakeIatp({"k-sup": ("supervisor", 1.0)})])
    )
    kernel.attach(victim, trust_bus=False)  # as over a network broker without IATP
    await victim.connect()
    forger = closing(AMB("memory", where, agent_id="forger"))
    key = "-" if how.startswith("no result") else "k-forged"
    with pytest.raises(RequestTimeout):  # denied: dead-lettered, never answered
        await forger.request(
            "_ctl.signal.victim",
            {"signal": "SIGKILL"},
            sender_id="supervisor",
            headers={"key": key},
            timeout=0.3,
        )
    assert kernel.get_agent_status("victim").state == "running"
    assert await kernel.recorder.query(event_type="signal") == []
    # The real supervisor (verified) can.
    assert await forger.request("_ctl.signal.victim", {"signal": "SIGSTOP"}, headers={"key": "k-sup"}) == {
        "ok": True
    }
    assert kernel.get_agent_status("victim").state == "stopped"
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS, filters={"data.operation": "signal"})
    assert [(d.data["sender"], d.data["claimed_sender"], d.data["decision"]) for d in decisions] == [
        (None, "supervisor", "deny"),
        ("supervisor", "forger", "allow"),
    ]
    if how == "invalid result":
        assert "IATP verification is not valid" in decisions[0].data["reason"]
    await forger.close()
    await victim.close()
    await kernel.close()


async def test_on_a_trusted_bus_the_claim_is_the_sender_but_not_verified(closing: Closing) -> None:
    """The in-process memory broker is trusted by default: every client lives in this process."""
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("deliver", "tasks.*", conditions={"sender": "billing"}))
    policy.add_rule("allow", Pattern("deliver", "strict.*", conditions={"verified": True}))
    kernel = closing(KernelSpace(policy=policy))
    where = memory_url("cp")
    bank = closing(AMB("memory", where, agent_id="bank"))
    assert kernel.attach(bank).trust_bus is True
    got = Collector()
    await bank.subscribe("tasks.>", got)
    await bank.subscribe("strict.>", got)
    other = closing(AMB("memory", where, agent_id="billing"))
    await other.publish("strict.x", "unverified")  # denied: not verified
    await other.publish("tasks.x", "claimed billing")
    await got.wait_for(1)
    assert got.messages == ["claimed billing"]
    assert bank.stats.rejected == 1
    await other.close()
    await bank.close()
    await kernel.close()


async def test_mediated_mode_keys_no_sender_state_by_an_unverified_name(closing: Closing) -> None:
    """In mediated mode the sender's signals, hold queue and rate limits apply. A forger
    claiming agent-a (invalid IATP result, or none on an untrusted bus) is denied before any of
    them is touched: it cannot fill stopped agent-a's hold queue, drain its rate limit, or
    create a process for a name it made up."""
    policy = Policy("m", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"), rate_limit=3)
    kernel = closing(KernelSpace(policy=policy, signal_dispatcher=SignalDispatcher(None, queue_size=2)))
    where = memory_url("cp")
    service = closing(AMB("memory", where, agent_id="svc", middleware=[FakeIatp({"k-a": ("agent-a", 1.0)})]))
    kernel.attach(service, trust_bus=False, inbound_prefix="ingress")
    got = Collector()
    await service.subscribe("ingress.>", got)
    agent = closing(AMB("memory", where, agent_id="agent-a"))
    forger = closing(AMB("memory", where, agent_id="forger"))
    await agent.publish("ingress.tasks.x", "a1", headers={"key": "k-a"})
    await got.wait_for(1)
    for key in ("bad", "-", "bad", "-", "bad", "-"):  # 6 > agent-a's 2 remaining tokens
        await forger.publish("ingress.tasks.x", "forged", sender_id="agent-a", headers={"key": key})
    await forger.publish("ingress.tasks.x", "made up", sender_id="agent-z", headers={"key": "bad"})
    await wait_until(lambda: service.stats.rejected == 7)
    assert "agent-z" not in {s.id for s in kernel.agents()}  # no process for a made-up name
    await agent.publish("ingress.tasks.x", "a2", headers={"key": "k-a"})
    await agent.publish("ingress.tasks.x", "a3", headers={"key": "k-a"})
    await got.wait_for(3)  # agent-a's bucket is untouched by the forgeries
    await agent.publish("ingress.tasks.x", "a4", headers={"key": "k-a"})
    await wait_until(lambda: service.stats.rejected == 8)  # its 4th: rate limited
    # Stopped agent-a: forged messages are denied at once, nothing is held for them.
    await kernel.send_signal("agent-a", AgentSignal.SIGSTOP)
    for key in ("bad", "-", "bad"):  # 3 > queue_size 2
        await forger.publish("ingress.tasks.y", "forged", sender_id="agent-a", headers={"key": key})
    await wait_until(lambda: service.stats.rejected == 11)
    assert kernel.get_agent("agent-a").held == 0
    assert await kernel.recorder.query(event_type="message_held") == []
    assert got.messages == ["a1", "a2", "a3"]
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS)
    assert len(decisions) == 14  # exactly one per message
    forged = [d for d in decisions if d.data["claimed_sender"] != d.data["sender"]]
    assert len(forged) == 10
    assert all(d.data["sender"] is None and d.data["decision"] == "deny" for d in forged)
    assert {d.agent_id for d in forged} == {"svc"}  # recorded for the service, not for agent-a
    for client in (agent, forger, service):
        await client.close()
    await kernel.close()


async def test_require_verified_sender_denies_before_the_sender_is_looked_up(closing: Closing) -> None:
    policy = Policy("m", default_action="allow", require_verified_sender=True)
    kernel = closing(KernelSpace(policy=policy))
    where = memory_url("cp")
    service = closing(AMB("memory", where, agent_id="svc", middleware=[FakeIatp({"k-a": ("agent-a", 1.0)})]))
    kernel.attach(service, trust_bus=True, inbound_prefix="ingress")  # claims trusted, not verified
    got = Collector()
    await service.subscribe("ingress.>", got)
    sender = closing(AMB("memory", where, agent_id="agent-c"))
    await sender.publish("ingress.tasks.x", "claimed", headers={"key": "-"})
    await sender.publish("ingress.tasks.x", "verified", headers={"key": "k-a"})
    await got.wait_for(1)
    await wait_until(lambda: service.stats.rejected == 1)
    assert got.messages == ["verified"]
    assert "agent-c" not in {s.id for s in kernel.agents()}
    decisions = await kernel.recorder.query(event_type=DECISION_EVENTS)
    assert [(d.agent_id, d.data["decision"]) for d in decisions] == [("svc", "deny"), ("agent-a", "allow")]
    assert decisions[0].data["reason"] == "sender not verified (require_verified_sender)"
    await sender.close()
    await service.close()
    await kernel.close()


# -- the hold queue ------------------------------------------------------------------------------


async def test_a_full_hold_queue_records_one_drop_and_no_hold(closing: Closing) -> None:
    kernel = closing(
        KernelSpace(policy=open_policy(), signal_dispatcher=SignalDispatcher(None, queue_size=2))
    )
    agent = closing(AMB("memory", memory_url("cp"), agent_id="agent"))
    kernel.attach(agent)
    await agent.connect()
    await kernel.send_signal("agent", AgentSignal.SIGSTOP)
    held = [asyncio.create_task(agent.publish("tasks.out", i)) for i in range(2)]
    await wait_until(lambda: kernel.get_agent("agent").held == 2)
    with pytest.raises(HoldQueueFull):
        await agent.publish("tasks.out", 2)
    records = await kernel.recorder.query()
    kinds = [(r.event_type, r.data.get("reason")) for r in records if r.event_type != "signal"]
    assert kinds == [
        ("message_held", "agent stopped (SIGSTOP)"),
        ("message_held", "agent stopped (SIGSTOP)"),
        ("message_dropped", "hold_queue_full"),
    ]
    assert [r.data["queued"] for r in records if r.event_type == "message_held"] == [1, 2]
    await kernel.send_signal("agent", AgentSignal.SIGCONT)
    await asyncio.gather(*held)
    assert len(await kernel.recorder.query(event_type=DECISION_EVENTS)) == 2  # the two released
    await agent.close()
    await kernel.close()


async def test_the_mediators_sender_is_iatps_sender_identity() -> None:
    """control_plane.mediation.identity.message_sender (the mediator's hot path) decides exactly as
    iatp.sender_identity does, for IATP's own results and for any other result object."""
    from types import SimpleNamespace

    from agent_os.control_plane.mediation.identity import message_sender
    from agent_os.iatp import IATP, Unauthenticated, sender_identity

    iatp = IATP()
    await iatp.register_agent("alice")
    valid = await iatp.verify(await iatp.sign("alice", {"q": 1}, topic="t"))
    invalid = await iatp.verify(Envelope("x", "t", "alice", {"q": 1}, timestamp=1))
    results: list[Any] = [
        None,
        valid,
        invalid,
        {"valid": True, "sender": "bob", "trust_level": 0.5},
        {"valid": False, "sender": "alice"},
        {"valid": True, "sender": ""},
        {"valid": "yes", "sender": "alice"},
        SimpleNamespace(valid=True, sender="carol", trust_level=0.7),
        SimpleNamespace(sender="alice"),
    ]
    for claimed in ("mallory", ""):
        for result in results:
            meta = Metadata(Envelope("id1", "t", claimed, None, timestamp=1), "t", 1, {})
            if result is not None:
                meta.context["iatp"] = result
            for trust_bus in (False, True):
                try:
                    expected: str | None = sender_identity(meta, trust_bus=trust_bus)
                except Unauthenticated:
                    expected = None
                sender, verified, _, refusal = message_sender(meta, trust_bus)
                assert sender == expected, (result, trust_bus)
                assert verified is (expected is not None and result is not None)
                assert (refusal is not None) is (result is not None and expected is None)


def test_the_handlers_task_is_the_running_task_on_every_loop_and_thread() -> None:
    """The mediator finds the running task without asyncio.current_task() on the loop it last
    ran on; on another loop (in turn, or alive in another thread) it is that loop's task."""
    kernel = KernelSpace(policy=open_policy())
    mediator = kernel.attach(AMB("memory", memory_url("cp"), agent_id="worker"))
    seen: list[bool] = []

    async def check() -> None:
        seen.extend(mediator._task() is asyncio.current_task() for _ in range(3))

        async def child() -> bool:
            return mediator._task() is asyncio.current_task()

        seen.append(await asyncio.create_task(child()))

    asyncio.run(check())
    asyncio.run(check())  # a new loop: the one it remembered is closed
    parked = threading.Event()
    release = threading.Event()

    async def park() -> None:
        await check()
        parked.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        await check()  # back on the first loop after the other one ran

    other = threading.Thread(target=asyncio.run, args=(park(),))
    other.start()
    assert parked.wait(10)
    asyncio.run(check())  # while the other thread's loop is alive and remembered
    release.set()
    other.join(10)
    assert not other.is_alive()
    assert seen == [True] * 20


# -- SIGKILL while a decision's record is being written ------------------------------------------


async def gated_recorder(kernel: KernelSpace) -> asyncio.Event:
    """Make ``kernel``'s recorder (``batch_size=1``) apply backpressure: one write starts and
    waits for the returned gate, and the pending records fill up (``max_pending``), so every
    further record waits for that write."""
    recorder = kernel.recorder
    original = recorder.storage.append
    gate = asyncio.Event()

    async def gated(rows: Any) -> None:
        await gate.wait()
        await original(rows)

    recorder.storage.append = gated  # type: ignore[method-assign]
    await recorder.log("e", "test")  # fills the batch: its write starts and waits at the gate
    for _ in range(recorder.max_pending - 1):  # then the records that may wait beside it
        await recorder.log("e", "test")
    return gate


async def test_a_publish_allowed_while_its_agent_is_killed_is_not_published(closing: Closing) -> None:
    kernel = closing(
        KernelSpace(policy=open_policy(), flight_recorder=FlightRecorder("memory", batch_size=1))
    )
    where = memory_url("cp")
    agent = closing(AMB("memory", where, agent_id="agent"))
    kernel.attach(agent)
    peer = closing(AMB("memory", where, agent_id="peer"))
    got = Collector()
    await peer.subscribe("tasks.out", got)
    await agent.connect()
    gate = await gated_recorder(kernel)
    publish = asyncio.create_task(agent.publish("tasks.out", "after the kill"))
    await wait_until(lambda: kernel.recorder.appended == kernel.recorder.max_pending + 1, what="the decision")
    kernel.get_agent("agent").kill()  # while the publish waits for its record's batch
    gate.set()
    with pytest.raises(AgentStoppedError):
        await publish
    await peer.publish("tasks.out", "sentinel")
    await got.wait_for(1)
    assert got.messages == ["sentinel"]  # nothing of the agent arrived before it
    records = await kernel.recorder.query(agent_id="agent")
    assert [(r.event_type, r.data["decision"]) for r in records] == [
        ("policy_decision", "allow"),
        ("message_dropped", "drop"),
    ]
    assert records[0].data["message_id"] == records[1].data["message_id"]
    await peer.close()
    await agent.close()
    await kernel.close()


async def test_a_message_allowed_while_its_sender_is_killed_is_not_forwarded(closing: Closing) -> None:
    """Mediated mode: the service's client stays open when a sender is killed, so without a
    check after the record the message would be forwarded after the kill."""
    policy = Policy("m", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    kernel = closing(KernelSpace(policy=policy, flight_recorder=FlightRecorder("memory", batch_size=1)))
    where = memory_url("cp")
    service = closing(AMB("memory", where, agent_id="svc"))
    kernel.attach(service, trust_bus=True, inbound_prefix="ingress")
    forwarded, dead = Collector(), Collector()
    await service.subscribe("ingress.>", forwarded)
    watcher = closing(AMB("memory", where, agent_id="watcher"))
    await watcher.subscribe("_DLQ.>", dead)
    agent = closing(AMB("memory", where, agent_id="agent-a"))
    await service.connect()
    gate = await gated_recorder(kernel)
    message_id = await agent.publish("ingress.tasks.x", "after the kill")
    await wait_until(lambda: kernel.recorder.appended == kernel.recorder.max_pending + 1, what="the decision")
    kernel.get_agent("agent-a").kill()
    gate.set()
    await dead.wait_for(1)
    assert dead.metadata[0].headers[DLQ_REASON] == "agent_killed"
    assert forwarded.messages == []
    records = await kernel.recorder.query(agent_id="agent-a")
    assert [(r.event_type, r.data["message_id"]) for r in records] == [
        ("policy_decision", message_id),
        ("message_dropped", message_id),
    ]
    for client in (agent, watcher, service):
        await client.close()
    await kernel.close()
