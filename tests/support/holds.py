"""Held messages in mediated mode: a deployment of one control-plane service instance and two
agents, and the scenario both the in-memory and the NATS test run (one stopped agent's held
messages do not stall the other agent's traffic; SIGCONT releases them in order)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from agent_os.amb import AMB
from agent_os.control_plane import AgentSignal, KernelSpace, Pattern, Policy
from agent_os.services.control_plane_service import ControlPlaneService
from tests.support import Collector, wait_until


def mediated_policy() -> Policy:
    policy = Policy("mediated", default_action="deny")
    policy.add_rule("deny", Pattern("publish", "tasks.secret"), reason="secret")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    policy.add_rule("allow", Pattern("signal", "*"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


@dataclass
class Deployment:
    """One service instance and two agents on one broker, each name unique to the test."""

    kernel: KernelSpace
    service: ControlPlaneService
    a: AMB
    b: AMB
    observer: AMB
    got: Collector  # what reaches the delivery subjects
    dead: Collector  # dead letters of the ingress subjects
    ingress: str
    delivery: str

    async def close(self) -> None:
        try:
            for client in (self.a, self.b, self.observer):
                await client.close()
        finally:
            try:
                await self.service.stop()
            finally:
                await self.kernel.close()

    def to(self, topic: str) -> str:
        return f"{self.ingress}.{topic}"


async def deploy(backend: str, url: str) -> Deployment:
    """A single control-plane service instance (claims taken from the bus: the test's agents
    are not signed) and agents ``a`` and ``b`` with an observer of deliveries and dead letters."""
    tag = uuid.uuid4().hex[:10]
    ingress, delivery = f"in_{tag}", f"out_{tag}"
    kernel = KernelSpace(policy=mediated_policy())
    service = ControlPlaneService(
        AMB(backend, url, agent_id=f"cp-{tag}"),
        kernel,
        trust_bus=True,
        ingress_prefix=ingress,
        delivery_prefix=delivery,
        reply_prefix=f"re_{tag}",
        queue=f"cp_{tag}",
        agents=[f"obs-{tag}"],  # the observer receives every message
    )
    a = AMB(backend, url, agent_id=f"a-{tag}")
    b = AMB(backend, url, agent_id=f"b-{tag}")
    observer = AMB(backend, url, agent_id=f"obs-{tag}")
    got, dead = Collector(), Collector()
    deployment = Deployment(kernel, service, a, b, observer, got, dead, ingress, delivery)
    try:
        await service.start()
        await observer.subscribe(f"{delivery}.>", got)
        await observer.subscribe(f"_DLQ.{ingress}.>", dead)
        await a.connect()
        await b.connect()
    except BaseException:
        await deployment.close()
        raise
    return deployment


async def a_stopped_agent_does_not_stall_the_others(backend: str, url: str) -> None:
    """Agent a is stopped with held messages; agent b's messages still pass the same single
    instance; SIGCONT releases a's messages in their order. Exactly one ``message_held`` per
    held message, then one ``policy_decision`` each at the release."""
    d = await deploy(backend, url)
    a_id, b_id = d.a.agent_id, d.b.agent_id
    assert a_id is not None
    assert b_id is not None
    try:
        assert await d.kernel.send_signal(a_id, AgentSignal.SIGSTOP)
        a_ids = [await d.a.publish(d.to("tasks.work"), f"a{i}") for i in range(5)]
        # All five are held at once: the handler did not wait for the first one's release.
        await wait_until(lambda: d.kernel.get_agent(a_id).held == 5, what="a's five messages held")
        for i in range(3):
            await d.b.publish(d.to("tasks.work"), f"b{i}")
        await d.got.wait_for(3)
        assert d.got.messages == ["b0", "b1", "b2"]  # b passes while a is stopped
        held = await d.kernel.recorder.query(event_type="message_held")
        assert [(r.agent_id, r.data["message_id"]) for r in held] == [(a_id, i) for i in a_ids]
        assert await d.kernel.send_signal(a_id, AgentSignal.SIGCONT)
        await d.got.wait_for(8)
        assert d.got.messages[3:] == [f"a{i}" for i in range(5)]  # in their order
        assert [m.sender for m in d.got.metadata] == [b_id] * 3 + [a_id] * 5
        records = await d.kernel.recorder.query(agent_id=a_id)
        assert [(r.event_type, r.data.get("message_id")) for r in records if r.event_type != "signal"] == [
            *(("message_held", i) for i in a_ids),
            *(("policy_decision", i) for i in a_ids),
        ]
        assert d.service.stats.forwarded == 8
        assert (d.service.mediator.release_failures, d.service.mediator.held_dropped) == (0, 0)
    finally:
        await d.close()
