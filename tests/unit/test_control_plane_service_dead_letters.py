"""The agents' own copies of the control-plane service's dead letters, on the in-memory broker:
the sender of a refused message gets a copy of its own message with the reason, on its own
bounded subject; a message with no established sender stays with the operator; recipients
get nothing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata, get_serializer
from agent_os.amb.deadletter import (
    DLQ_ORIGINAL_ID,
    DLQ_REASON,
    DLQ_SUBJECT,
    subject_digest,
)
from agent_os.amb.envelope import Envelope
from agent_os.amb.subjects import MAX_SUBJECT_BYTES, subject_ok
from agent_os.control_plane import AgentSignal, KernelSpace, Pattern, Policy
from agent_os.services.control_plane_service import (
    AGENT_DEAD_LETTERS,
    ControlPlaneService,
    dead_letter_subject,
    ingress_subject,
    nats_users,
)
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.identities import identities

decode = get_serializer("msgpack").decode


def policy() -> Policy:
    p = Policy("mediated", default_action="deny")
    p.add_rule("deny", Pattern("publish", "tasks.secret"), reason="secret")
    p.add_rule("allow", Pattern("publish", "tasks.*"))
    p.add_rule("allow", Pattern("signal", "*"))
    p.add_rule("allow", Pattern("deliver", "tasks.*"))
    return p


def trusting(where: str, kernel: KernelSpace) -> ControlPlaneService:
    client = AMB("memory", where, agent_id="control-plane")
    return ControlPlaneService(client, kernel, trust_bus=True, agents=["agent-a", "agent-b"])


async def watchers(closing: Closing, where: str) -> tuple[Collector, Collector]:
    """Collectors of every operator dead letter (``_DLQ.>``) and every agent copy."""
    watcher = closing(AMB("memory", where, agent_id="operator"))
    operator, copies = Collector(), Collector()
    await watcher.subscribe("_DLQ.>", operator)
    await watcher.subscribe(f"{AGENT_DEAD_LETTERS}.>", copies)
    return operator, copies


def subjects(got: Collector) -> list[str]:
    return [m.subject for m in got.metadata]


async def test_a_denied_message_reaches_its_sender_with_the_reason(closing: Closing) -> None:
    where = f"memory://cp-dlq-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=policy()))
    service = closing(trusting(where, kernel))
    await service.start()
    operator, copies = await watchers(closing, where)
    sender = closing(AMB("memory", where, agent_id="agent-a"))
    await sender.publish(ingress_subject("tasks.secret"), "mine", recipient="agent-b")
    await copies.wait_for(1)
    await operator.wait_for(1)
    assert subjects(operator) == ["_DLQ.ingress.tasks.secret"]  # the operator's stays where it was
    assert subjects(copies) == ["_DLQ_AGENT.agent-a.ingress.tasks.secret"]  # not agent-b's
    copy, original = copies.metadata[0], operator.metadata[0]
    assert copy.sender == "control-plane"
    assert copy.headers == original.headers  # the same dlq-* headers
    assert copy.headers[DLQ_REASON] == "policy_denied"
    assert copy.headers[DLQ_SUBJECT] == "ingress.tasks.secret"
    assert copies.messages[0] == operator.messages[0]  # the same raw bytes: its own message
    mine = decode(copies.messages[0])
    assert (mine.sender, mine.payload, mine.recipient) == ("agent-a", "mine", "agent-b")
    assert copy.headers[DLQ_ORIGINAL_ID] == mine.id
    assert service.stats.agent_dead_letters == 1


async def test_a_message_refused_for_its_recipient_goes_back_to_its_sender_only(closing: Closing) -> None:
    where = f"memory://cp-dlq-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=policy()))
    service = closing(trusting(where, kernel))
    await service.start()
    operator, copies = await watchers(closing, where)
    sender = closing(AMB("memory", where, agent_id="agent-b"))
    await sender.publish(ingress_subject("tasks.work"), "to eve", recipient="eve")
    await sender.publish(ingress_subject("tasks.work"), "to a bad id", recipient="agent-a.x")
    await copies.wait_for(2)
    await operator.wait_for(2)
    assert subjects(copies) == ["_DLQ_AGENT.agent-b.ingress.tasks.work"] * 2
    assert [m.headers[DLQ_REASON] for m in copies.metadata] == ["unknown_recipient", "bad_recipient"]
    assert [decode(m).payload for m in copies.messages] == ["to eve", "to a bad id"]


async def test_without_an_established_sender_the_dead_letter_stays_with_the_operator(
    closing: Closing,
) -> None:
    where = f"memory://cp-dlq-{uuid.uuid4().hex}"
    keys = await identities("control-plane", "agent-a", "agent-b")
    kernel = closing(KernelSpace(policy=policy()))
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, iatp=keys["control-plane"]
        )
    )
    await service.start()
    operator, copies = await watchers(closing, where)
    unsigned = closing(AMB("memory", where, agent_id="agent-a"))  # claims agent-a, signs nothing
    await unsigned.publish(ingress_subject("tasks.secret"), "claimed")
    await unsigned.connect()
    await unsigned.broker.publish(ingress_subject("tasks.work"), b"\xc1 not an envelope")  # malformed
    signed = closing(AMB("memory", where, agent_id="agent-a", middleware=[keys["agent-a"].middleware()]))
    await signed.publish(ingress_subject("tasks.secret"), "signed")  # after the two others
    await copies.wait_for(1)
    await operator.wait_for(3)
    assert [m.headers[DLQ_REASON] for m in operator.metadata][1:] == ["malformed", "policy_denied"]
    assert operator.metadata[0].headers[DLQ_REASON] != "policy_denied"  # IATP refused it first
    assert subjects(copies) == ["_DLQ_AGENT.agent-a.ingress.tasks.secret"]
    assert decode(copies.messages[0]).payload == "signed"
    assert service.stats.agent_dead_letters == 1


async def test_a_held_message_dropped_by_sigkill_reaches_its_sender(closing: Closing) -> None:
    where = f"memory://cp-dlq-{uuid.uuid4().hex}"
    kernel = closing(KernelSpace(policy=policy()))
    service = closing(trusting(where, kernel))
    await service.start()
    operator, copies = await watchers(closing, where)
    sender = closing(AMB("memory", where, agent_id="agent-a"))
    await kernel.send_signal("agent-a", AgentSignal.SIGSTOP)
    await sender.publish(ingress_subject("tasks.work"), "held")
    await wait_until(lambda: kernel.get_agent("agent-a").held >= 1, what="the message held")
    await kernel.send_signal("agent-a", AgentSignal.SIGKILL)
    await copies.wait_for(1)
    await operator.wait_for(1)
    assert service.stats.released_dead_lettered == 1
    assert subjects(copies) == ["_DLQ_AGENT.agent-a.ingress.tasks.work"]
    assert copies.metadata[0].headers == operator.metadata[0].headers
    assert copies.metadata[0].headers[DLQ_REASON] == "agent_killed"
    assert decode(copies.messages[0]).payload == "held"


async def test_the_client_hook_sees_each_dead_letter_and_its_failure_changes_nothing(
    closing: Closing,
) -> None:
    where = f"memory://cp-dlq-{uuid.uuid4().hex}"
    client = closing(AMB("memory", where, agent_id="svc"))
    seen: list[tuple[Envelope, Metadata | None]] = []

    async def hook(dead: Envelope, metadata: Metadata | None) -> None:
        seen.append((dead, metadata))
        raise RuntimeError("a broken hook")

    client.dead_letter_hook = hook

    async def refuse(message: Any, metadata: Metadata) -> None:
        raise ValueError("no")

    await client.subscribe("work.>", refuse)
    await client.publish("work.a", 1)
    await client.broker.publish("work.b", b"\xc1")
    await wait_until(lambda: len(seen) == 2, what="both dead letters")
    assert client.stats.dead_lettered == 2
    (first, meta), (second, none) = seen
    assert (first.topic, meta is not None and meta.subject) == ("_DLQ.work.a", "work.a")
    assert (second.topic, none) == ("_DLQ.work.b", None)  # undecodable: no metadata


def test_the_agent_dead_letter_subject_is_bounded_and_the_agents_own() -> None:
    assert dead_letter_subject("ingress.tasks.work", agent="alice") == "_DLQ_AGENT.alice.ingress.tasks.work"
    assert dead_letter_subject(">", agent="alice") == "_DLQ_AGENT.alice.>"  # to subscribe
    assert dead_letter_subject("ingress.*", "dl", agent="bob") == "dl.bob.ingress.*"
    long = "ingress." + "x" * MAX_SUBJECT_BYTES
    bounded = dead_letter_subject(long, agent="alice")
    assert subject_ok(bounded)
    assert bounded.startswith("_DLQ_AGENT.alice.ingress.")
    assert bounded.endswith(subject_digest(long)[:32])
    for bad in ("alice.bob", "*", ">", "", "a b"):  # one agent's subject would cover another's
        with pytest.raises(ValueError, match="agent id"):
            dead_letter_subject("ingress.x", agent=bad)


@pytest.mark.parametrize("prefix", ["_DLQ", "_DLQ.agents", "ingress", "deliver.x", "_INBOX", "_ctl"])
def test_an_agent_dead_letter_prefix_overlapping_another_is_refused(prefix: str) -> None:
    # Under _DLQ, an agent named "ingress" would read the operator's dead letters of everyone.
    with pytest.raises(ValueError, match="overlaps"):
        nats_users(["alice"], agent_dead_letter_prefix=prefix)
    with pytest.raises(ValueError, match="overlaps"):
        ControlPlaneService(
            AMB("memory", "memory://unused", agent_id="control-plane"),
            KernelSpace(),
            trust_bus=True,
            agent_dead_letter_prefix=prefix,
        )
