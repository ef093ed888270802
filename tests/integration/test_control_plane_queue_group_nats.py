"""Several control-plane service instances in one queue group on the real NATS server.

Three instances share the ingress subjects as a queue group, each with its own kernel and
flight recorder. Several agents publish through ingress at once: every allowed message reaches
its recipient exactly once, every denied one is dead-lettered and reaches nobody, each instance
forwards a share, and the instances' recorders hold exactly one decision per message between
them. Requests through the group get their replies: every instance receives each reply, the one
that forwarded the request checks and forwards it (one decision), the others drop it.

Every name (ingress, delivery and reply prefixes, queue group, agent ids and so their inboxes)
carries a tag unique to the test, so the shared server's other users neither see nor disturb
these messages; core NATS keeps nothing once the clients close.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from agent_os.amb.deadletter import DLQ_ORIGINAL_ID, DLQ_REASON
from agent_os.control_plane import KernelSpace
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    ReplyViaService,
    agent_inbox,
)
from tests.support import Collector, wait_until
from tests.support.queue_group import INSTANCES, SENTINEL, Group, queue_group_policy, real
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


@pytest.fixture
async def group() -> AsyncIterator[Group]:
    g = Group(uuid.uuid4().hex[:10])
    try:
        for i in range(INSTANCES):
            service = ControlPlaneService(
                AMB("nats", NATS_URL, agent_id=f"cp{i}-{g.tag}"),
                KernelSpace(policy=queue_group_policy()),
                trust_bus=True,  # the test's agents do not sign
                ingress_prefix=g.ingress_prefix,
                delivery_prefix=g.delivery_prefix,
                reply_prefix=g.reply_prefix,
                queue=f"cp_{g.tag}",
            )
            g.services.append(service)
            await service.start()
        yield g
    finally:
        await g.close()


async def sentinels_in(collector: Collector, count: int) -> None:
    """Wait until ``collector`` has ``count`` sentinels."""
    await wait_until(
        lambda: collector.messages.count(SENTINEL) >= count, what=f"{count} sentinels", timeout=10
    )


async def test_each_allowed_message_is_forwarded_once_by_one_of_the_group(group: Group) -> None:
    senders = [group.agent(f"s{i}") for i in range(4)]
    receivers = [group.agent(f"r{j}") for j in range(3)]
    wiretap = group.agent("wiretap")
    inboxes = [Collector() for _ in receivers]
    everything, dead = Collector(), Collector()
    for j, (receiver, inbox) in enumerate(zip(receivers, inboxes, strict=True)):
        await receiver.subscribe(group.delivered(f"tasks.to_r{j}", group.agent_id(f"r{j}")), inbox)
    await wiretap.subscribe(group.every_delivery, everything)  # whatever is delivered anywhere
    await wiretap.subscribe(f"_DLQ.{group.ingress_prefix}.>", dead)
    for sender in senders:
        await sender.connect()

    per_sender = 75  # 300 messages, every tenth one denied
    expected: list[dict[str, tuple[str, int]]] = [{} for _ in receivers]  # id -> (sender, n)
    denied: dict[str, str] = {}  # id -> sender
    sent_by: dict[str, str] = {}

    async def send(index: int, client: AMB) -> None:
        name = client.agent_id
        assert name is not None
        for n in range(per_sender):
            if n % 10 == 9:
                denied[await client.publish(group.to("tasks.secret"), [name, n])] = name
                continue
            j = (index + n) % len(receivers)
            message_id = await client.publish(
                group.to(f"tasks.to_r{j}"), [name, n], recipient=group.agent_id(f"r{j}")
            )
            expected[j][message_id] = (name, n)
            sent_by[message_id] = name

    await asyncio.gather(*(send(i, c) for i, c in enumerate(senders)))
    allowed = len(sent_by)
    assert allowed + len(denied) == 4 * per_sender
    assert len(denied) == 4 * (per_sender // 10)

    await wait_until(
        lambda: (
            sum(s.stats.forwarded for s in group.services) >= allowed and len(dead.messages) >= len(denied)
        ),
        timeout=20,
        what=f"{allowed} forwarded and {len(denied)} dead-lettered",
    )
    # Nothing more can be on its way once every subscriber has each instance's sentinel.
    targets = [group.delivered(f"tasks.to_r{j}", group.agent_id(f"r{j}")) for j in range(len(receivers))]
    await group.sentinels([*targets, f"_DLQ.{group.ingress_prefix}.sentinel"])
    for collector, expected_sentinels in [(i, INSTANCES) for i in inboxes] + [
        (everything, INSTANCES * len(targets)),
        (dead, INSTANCES),
    ]:
        await sentinels_in(collector, expected_sentinels)

    # Each recipient got exactly its messages, each once, unchanged (the sender's envelope).
    for j, inbox in enumerate(inboxes):
        got = real(inbox)
        assert sorted(m.id for m in got) == sorted(expected[j]), f"receiver r{j}"
        assert {m.id: tuple(m.envelope.payload) for m in got} == expected[j]  # [sender, n]
        assert all(m.sender == expected[j][m.id][0] for m in got)
    # Nothing else was delivered anywhere: no denied message, no duplicate.
    tapped = real(everything)
    assert sorted(m.id for m in tapped) == sorted(sent_by)
    assert not any(m.id in denied for m in tapped)
    assert {m.subject for m in tapped} == set(targets)
    # Forwarded unchanged: the envelope still names the ingress subject it was published to, and
    # it went to its recipient's own delivery subject only.
    assert all(
        m.subject == group.delivered(m.topic[len(group.ingress_prefix) + 1 :], m.envelope.recipient or "")
        for m in tapped
    )
    # Every denied message was dead-lettered once, for the policy.
    letters = real(dead)
    assert sorted(m.headers[DLQ_ORIGINAL_ID] for m in letters) == sorted(denied)
    assert {m.headers[DLQ_REASON] for m in letters} == {"policy_denied"}

    # The load was shared, and each message decided once across the instances' recorders.
    forwarded = [s.stats.forwarded for s in group.services]
    assert sum(forwarded) == allowed
    assert all(f > 0 for f in forwarded), forwarded
    assert sum(s.client.stats.rejected for s in group.services) == len(denied)
    records = await group.records(**{"data.operation": "publish"})
    deliveries = await group.records(**{"data.operation": "deliver"})
    assert Counter(r.data["message_id"] for each in deliveries for r in each) == Counter(
        dict.fromkeys(sent_by, 1)
    )
    decided = Counter(r.data["message_id"] for each in records for r in each)
    assert decided == Counter({**{i: 1 for i in sent_by}, **{i: 1 for i in denied}})
    for service, each in zip(group.services, records, strict=True):
        allows = [r for r in each if r.data["decision"] == "allow"]
        assert len(allows) == service.stats.forwarded  # the instance that decided forwarded it
        assert all(r.data["message_id"] in sent_by for r in allows)
        assert all(r.data["message_id"] in denied for r in each if r.data["decision"] == "deny")
        assert all(r.agent_id == (sent_by | denied)[r.data["message_id"]] for r in each)
        assert {r.data["operation"] for r in each} == {"publish"}


async def test_requests_through_the_group_are_answered_via_the_instance_holding_them(group: Group) -> None:
    responder = group.agent("responder", middleware=[ReplyViaService(reply_prefix=group.reply_prefix)])
    asked: list[Metadata] = []

    async def answer(message: Any, metadata: Metadata) -> None:
        asked.append(metadata)
        await responder.reply(metadata, f"re: {message}")

    assert responder.agent_id is not None
    await responder.subscribe(group.delivered("tasks.ask", responder.agent_id), answer)
    requesters = [group.agent(f"q{i}", requests=True) for i in range(3)]
    per_requester = 20

    async def ask(client: AMB, n: int) -> tuple[str, Any, Metadata]:
        question = f"{client.agent_id} #{n}"
        payload, meta = await client.request(
            group.to("tasks.ask"), question, timeout=10, with_metadata=True, recipient=responder.agent_id
        )
        return question, payload, meta

    answers = await asyncio.gather(*(ask(c, n) for c in requesters for n in range(per_requester)))
    total = len(requesters) * per_requester
    asked_ids = {m.envelope.payload: m.id for m in asked}  # question -> its request's id
    assert len(asked) == len(asked_ids) == total  # each request reached the responder once
    for question, payload, meta in answers:
        assert payload == f"re: {question}"
        assert meta.correlation_id == asked_ids[question]  # the reply to this very request
        requester = question.split(" #")[0]
        assert meta.subject.startswith(agent_inbox(requester) + ".")  # into its own inbox
        assert meta.sender == responder.agent_id  # forwarded unchanged
    request_ids = list(asked_ids.values())

    # Every instance receives each reply; the one holding its request forwards it, the others
    # drop it (unmatched).
    await wait_until(
        lambda: all(s.pending.unmatched == total - s.stats.replies_forwarded for s in group.services),
        timeout=10,
        what="every instance to have seen every reply",
    )
    requests = await group.records(**{"data.operation": "request"})
    replies = await group.records(**{"data.operation": "reply"})
    assert Counter(r.data["message_id"] for each in requests for r in each) == Counter(
        {i: 1 for i in request_ids}
    )
    assert sorted(r.data["request_id"] for each in replies for r in each) == sorted(request_ids)
    for service, asked_here, answered_here in zip(group.services, requests, replies, strict=True):
        assert len(asked_here) > 0  # the group shared the requests
        assert {r.data["decision"] for r in asked_here + answered_here} == {"allow"}
        # The instance that forwarded a request checked and forwarded its reply: one decision.
        assert sorted(r.data["request_id"] for r in answered_here) == sorted(
            r.data["message_id"] for r in asked_here
        )
        assert service.stats.forwarded == len(asked_here)
        assert service.stats.replies_forwarded == len(answered_here)
        assert all(r.data["requester"] == r.data["reply_to"].split(".")[1] for r in answered_here)
