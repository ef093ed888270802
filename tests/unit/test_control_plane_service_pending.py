"""The control-plane service uses the table of pending requests it is given (in-memory broker)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata, RequestTimeout
from agent_os.control_plane import KernelSpace, Pattern, Policy
from agent_os.control_plane.mediation.replies import PendingRequests
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    ReplyViaService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
)
from tests.support import wait_until
from tests.support.closing import Closing


async def test_the_service_keeps_the_table_of_pending_requests_it_is_given(closing: Closing) -> None:
    """A table passed as ``pending`` is the service's (and its mediator's) even while empty, as
    it always is at construction, so its bound applies: with ``max_pending=1`` a second request
    evicts the first one's entry, and the first one's reply is dropped as unmatched."""
    where = f"memory://cp-pending-{uuid.uuid4().hex}"
    policy = Policy("mediated", default_action="deny")
    policy.add_rule("allow", Pattern("request", "tasks.ask"))
    policy.add_rule("allow", Pattern("reply", "tasks.ask"))
    policy.add_rule("allow", Pattern("deliver", "tasks.ask"))
    kernel = closing(KernelSpace(policy=policy))
    pending = PendingRequests(max_pending=1)
    service = closing(
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"),
            kernel,
            trust_bus=True,
            pending=pending,
            agents=["agent-b"],
        )
    )
    assert service.pending is pending
    assert service.mediator.pending is pending
    await service.start()
    responder = closing(AMB("memory", where, agent_id="agent-b", middleware=[ReplyViaService()]))
    asked: list[Metadata] = []

    async def keep(message: Any, metadata: Metadata) -> None:
        asked.append(metadata)  # answered below, once both requests are in

    await responder.subscribe(delivery_subject("tasks.ask", agent="agent-b"), keep)
    requester = closing(AMB("memory", where, agent_id="agent-a", inbox_prefix=agent_inbox("agent-a")))
    first = asyncio.create_task(requester.request(ingress_subject("tasks.ask"), "first", timeout=1))
    await wait_until(lambda: len(asked) == 1, what="the first request")
    second = asyncio.create_task(requester.request(ingress_subject("tasks.ask"), "second", timeout=5))
    await wait_until(lambda: len(asked) == 2, what="the second request")
    assert (pending.added, pending.evicted, len(pending)) == (2, 1, 1)  # the bound of 1 applies
    for metadata in asked:
        await responder.reply(metadata, f"re: {metadata.envelope.payload}")
    assert await second == "re: second"
    with pytest.raises(RequestTimeout):
        await first  # its entry was evicted: its reply was not forwarded
    assert pending.unmatched == 1
    assert service.stats.replies_forwarded == 1
    for client in (requester, responder):
        await client.close()
    await service.stop()
    await kernel.close()
