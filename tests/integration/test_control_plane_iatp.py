"""IATP's middleware and the control plane's mediator together on the in-memory broker."""

from __future__ import annotations

import uuid

from agent_os.amb import AMB
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.control_plane import DECISION_EVENTS, KernelSpace, Pattern, Policy
from agent_os.iatp import IATP
from tests.support import Collector, wait_until
from tests.support.closing import Closing


async def test_signed_verified_governed_delivery(closing: Closing) -> None:
    iatp = IATP()
    for agent in ("alice", "bob", "mallory"):
        await iatp.register_agent(agent)
    await iatp.establish_trust("bob", "alice", 0.9, ["send_data"])  # bob grants alice send_data
    policy = Policy("p", default_action="deny", require_verified_sender=True, permissions=iatp.permissions)
    policy.add_rule("allow", Pattern("publish", "data.*"))
    policy.add_rule("allow", Pattern("deliver", "data.*", conditions={"permission": "send_data"}))
    kernel = closing(KernelSpace(policy=policy))
    where = f"memory://cp-iatp-{uuid.uuid4().hex}"
    bob = closing(AMB("memory", where, agent_id="bob", middleware=[iatp.middleware()]))
    kernel.attach(bob)
    alice = AMB("memory", where, agent_id="alice", middleware=[iatp.middleware()])
    mallory = AMB("memory", where, agent_id="mallory", middleware=[iatp.middleware()])
    watcher = AMB("memory", where)
    try:
        got, dlq = Collector(), Collector()
        await bob.subscribe("data.in", got)
        await watcher.subscribe("_DLQ.>", dlq)
        await alice.publish("data.in", {"n": 1}, recipient="bob")
        await mallory.publish("data.in", {"n": 2}, recipient="bob")  # signed, but no grant from bob
        await got.wait_for(1)
        await dlq.wait_for(1)
        assert got.messages == [{"n": 1}]
        assert dlq.metadata[0].headers[DLQ_REASON] == "policy_denied"
        decisions = await kernel.recorder.query(event_type=DECISION_EVENTS)
        assert [(d.data["sender"], d.data["verified"], d.data["decision"]) for d in decisions] == [
            ("alice", True, "allow"),
            ("mallory", True, "deny"),
        ]
        assert decisions[0].data["trust_level"] > 0
        await wait_until(lambda: bob.stats.rejected == 1)
    finally:
        for client in (alice, mallory, watcher, bob):
            await client.close()
        await kernel.close()
