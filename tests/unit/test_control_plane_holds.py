"""Held messages in mediated mode: a stopped agent's messages are queued and the service's
handler returns at once, so one stopped agent does not stall the others' traffic through the
instance (in-memory broker; ``tests/integration/test_control_plane_holds_nats.py`` runs the
first scenario on NATS; the deployment and that scenario are in ``tests/support/holds.py``)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest

from agent_os.amb import Envelope, Metadata
from agent_os.amb.deadletter import DLQ_ORIGINAL_ID, DLQ_REASON
from agent_os.amb.envelope import new_id
from agent_os.control_plane import DECISION_EVENTS, AgentSignal, KernelSpace
from agent_os.control_plane.mediation.mediator import Mediator
from tests.support import wait_until
from tests.support.holds import a_stopped_agent_does_not_stall_the_others, deploy, mediated_policy


async def test_a_stopped_agent_does_not_stall_the_others() -> None:
    await a_stopped_agent_does_not_stall_the_others("memory", f"memory://holds-{uuid.uuid4().hex}")


async def test_a_held_message_denied_at_its_release_is_dead_lettered_and_counted() -> None:
    d = await deploy("memory", f"memory://holds-{uuid.uuid4().hex}")
    a_id = d.a.agent_id
    assert a_id is not None
    try:
        await d.kernel.send_signal(a_id, AgentSignal.SIGSTOP)
        await d.a.publish(d.to("tasks.work"), "fine")
        secret = await d.a.publish(d.to("tasks.secret"), "not allowed")  # decided at the release
        await wait_until(lambda: d.kernel.get_agent(a_id).held == 2)
        assert d.dead.messages == []
        await d.kernel.send_signal(a_id, AgentSignal.SIGCONT)
        await d.got.wait_for(1)
        await d.dead.wait_for(1)
        assert d.got.messages == ["fine"]
        assert d.dead.metadata[0].headers[DLQ_REASON] == "policy_denied"
        assert d.dead.metadata[0].headers[DLQ_ORIGINAL_ID] == secret
        assert d.service.mediator.release_failures == 1
        assert d.service.stats.released_dead_lettered == 1
        decisions = await d.kernel.recorder.query(
            event_type=DECISION_EVENTS, filters={"data.operation": "publish"}
        )
        assert [r.data["decision"] for r in decisions] == ["allow", "deny"]  # one record each
    finally:
        await d.close()


async def test_sigkill_drops_held_messages_with_a_record_and_a_dead_letter_each() -> None:
    d = await deploy("memory", f"memory://holds-{uuid.uuid4().hex}")
    a_id = d.a.agent_id
    assert a_id is not None
    try:
        await d.kernel.send_signal(a_id, AgentSignal.SIGSTOP)
        ids = [await d.a.publish(d.to("tasks.work"), i) for i in range(3)]
        await wait_until(lambda: d.kernel.get_agent(a_id).held == 3)
        await d.kernel.send_signal(a_id, AgentSignal.SIGKILL)
        await d.dead.wait_for(3)
        assert {m.headers[DLQ_REASON] for m in d.dead.metadata} == {"agent_killed"}
        assert sorted(m.headers[DLQ_ORIGINAL_ID] for m in d.dead.metadata) == sorted(ids)
        await wait_until(lambda: d.service.mediator.held_dropped == 3)
        dropped = await d.kernel.recorder.query(event_type="message_dropped")
        assert [(r.data["message_id"], r.data["reason"]) for r in dropped] == [
            (i, "agent killed (SIGKILL)") for i in ids
        ]
        assert await d.kernel.recorder.query(event_type=DECISION_EVENTS) == []
        await d.b.publish(d.to("tasks.work"), "b still passes")
        await d.got.wait_for(1)
        assert d.got.messages == ["b still passes"]
    finally:
        await d.close()


async def test_stopping_the_service_records_what_is_still_held_as_dropped() -> None:
    d = await deploy("memory", f"memory://holds-{uuid.uuid4().hex}")
    a_id = d.a.agent_id
    assert a_id is not None
    await d.kernel.send_signal(a_id, AgentSignal.SIGSTOP)
    ids = [await d.a.publish(d.to("tasks.work"), i) for i in range(2)]
    await wait_until(lambda: d.kernel.get_agent(a_id).held == 2)
    for client in (d.a, d.b, d.observer):
        await client.close()
    await d.service.stop()
    assert d.service.mediator.held_dropped == 2
    dropped = await d.kernel.recorder.query(event_type="message_dropped")
    assert [(r.data["message_id"], r.data["reason"]) for r in dropped] == [
        (i, "service stopped") for i in ids
    ]
    await d.kernel.close()


# -- the mediator on its own: ordering behind a release in progress, a failing hook -------------


def ingress_delivery(sender: str, payload: Any, topic: str = "tasks.work") -> tuple[Envelope, Metadata]:
    env = Envelope(new_id(), f"ingress.{topic}", sender, payload, timestamp=time.time_ns())
    return env, Metadata(env, env.topic, 1, {})


async def test_a_message_arriving_during_the_release_goes_behind_the_held_ones() -> None:
    async with KernelSpace(policy=mediated_policy()) as kernel:
        mediator = Mediator(kernel, kernel.external("service"), inbound_prefix="ingress", trust_bus=True)
        agent = kernel.external("agent-a")
        forwarded: list[Any] = []
        first_started, go_on = asyncio.Event(), asyncio.Event()

        async def forward(env: Envelope, meta: Metadata) -> None:
            if env.payload == 0:
                first_started.set()
                await go_on.wait()  # the first released message is slow to forward
            forwarded.append(env.payload)

        await kernel.send_signal("agent-a", AgentSignal.SIGSTOP)
        for i in range(2):
            # Returns at once (it would wait for SIGCONT in embedded mode).
            await asyncio.wait_for(mediator.on_consume(*ingress_delivery("agent-a", i), forward), 5)
        assert agent.held == 2
        await kernel.send_signal("agent-a", AgentSignal.SIGCONT)
        await asyncio.wait_for(first_started.wait(), 5)
        assert agent.life.value == "running"
        await asyncio.wait_for(mediator.on_consume(*ingress_delivery("agent-a", 2), forward), 5)
        assert forwarded == []  # not past message 1, still queued
        assert agent.held == 2
        go_on.set()
        await wait_until(lambda: len(forwarded) == 3)
        assert forwarded == [0, 1, 2]
        await mediator.on_consume(*ingress_delivery("agent-a", 3), forward)  # nothing queued: at once
        assert forwarded == [0, 1, 2, 3]
        held = await kernel.recorder.query(event_type="message_held")
        assert len(held) == 2  # the one queued behind was not held by a signal
        assert len(await kernel.recorder.query(event_type=DECISION_EVENTS)) == 4


async def test_a_failing_release_hook_is_logged_and_the_queue_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with KernelSpace(policy=mediated_policy()) as kernel:
        told: list[tuple[str, str]] = []

        async def hook(env: Envelope, meta: Metadata, error: Exception) -> None:
            told.append((env.payload, type(error).__name__))
            raise RuntimeError("the dead-letter subject is gone")

        mediator = Mediator(
            kernel,
            kernel.external("service"),
            inbound_prefix="ingress",
            trust_bus=True,
            on_release_error=hook,
        )
        kernel.external("agent-a")
        forwarded: list[Any] = []

        async def forward(env: Envelope, meta: Metadata) -> None:
            if env.payload == "breaks":
                raise ConnectionError("broker gone")
            forwarded.append(env.payload)

        await kernel.send_signal("agent-a", AgentSignal.SIGSTOP)
        for payload, topic in (("breaks", "tasks.work"), ("secret", "tasks.secret"), ("fine", "tasks.work")):
            await mediator.on_consume(*ingress_delivery("agent-a", payload, topic), forward)
        with caplog.at_level(logging.WARNING, logger="agent_os.control_plane"):
            await kernel.send_signal("agent-a", AgentSignal.SIGCONT)
            await wait_until(lambda: mediator.release_failures == 2 and len(told) == 2)
            await mediator.drop_held()  # waits until the failures are accounted for
        assert forwarded == ["fine"]
        assert told == [("breaks", "ConnectionError"), ("secret", "PolicyViolationError")]
        assert sum("could not account for held message" in r.getMessage() for r in caplog.records) == 2
        assert sum("failed after its release" in r.getMessage() for r in caplog.records) == 2
