"""Mediated mode under a hostile agent, on a real nats-server whose authorization block is the
one :func:`nats_authorization` generates (a private server, its own port): mallory can neither
read bob's deliveries or alice's dead letters, nor forge dead letters, deliveries, inbox
replies or signals; the ``deliver`` policy decides who receives what; every agent still gets
its own (dead letters of its own messages included); and nothing an agent id or password holds
can change the server's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import AMB, get_serializer
from agent_os.amb.deadletter import DLQ_REASON, DLQ_SUBJECT
from agent_os.amb.envelope import Envelope, new_id
from agent_os.control_plane import KernelSpace, Pattern, Policy
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    NatsUser,
    ReplyViaService,
    agent_inbox,
    dead_letter_subject,
    delivery_subject,
    ingress_subject,
    nats_authorization,
    nats_users,
)
from tests.support import Collector, wait_until
from tests.support.nats_private import private_nats

pytestmark = pytest.mark.nats

AGENTS = ["alice", "bob", "mallory"]
PASSWORDS = {
    "alice": "pw-alice",
    "bob": "pw-bob",
    "mallory": "pw-mallory",
    "control-plane": "pw-svc",
    "operator": "pw-operator",
}
# An operator who may read everything (and publish nothing useful): the test's witness.
OPERATOR = NatsUser("operator", PASSWORDS["operator"], ("operator.none",), (">",))


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    users = nats_users(AGENTS, "control-plane", passwords=PASSWORDS)
    async with private_nats(nats_authorization([*users, OPERATOR]), tmp_path) as p:
        yield p


def url(port: int, user: str, password: str | None = None) -> str:
    return f"nats://{user}:{password or PASSWORDS[user]}@127.0.0.1:{port}"


def agent(port: int, name: str) -> AMB:
    return AMB(
        "nats", url(port, name), agent_id=name, inbox_prefix=agent_inbox(name), middleware=[ReplyViaService()]
    )


def policy() -> Policy:
    p = Policy("mediated", default_action="deny")
    for op in ("publish", "request", "reply"):
        p.add_rule("allow", Pattern(op, "tasks.*"))
    p.add_rule(
        "deny", Pattern("deliver", "tasks.private", conditions={"agent_id": "mallory"}), reason="not hers"
    )
    p.add_rule("allow", Pattern("deliver", "tasks.*"))
    return p


class Raw:
    """A bare nats-py connection of one user, keeping the server's errors and what it reads."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.got: list[tuple[str, bytes]] = []
        self.nc: Any = None

    async def connect(self, server: str) -> Raw:
        import nats

        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(server, error_cb=on_error, allow_reconnect=False)
        return self

    async def subscribe(self, subject: str) -> None:
        async def keep(msg: Any) -> None:
            self.got.append((msg.subject, msg.data))

        await self.nc.subscribe(subject, cb=keep)
        await self.nc.flush()

    def refused(self, what: str) -> int:
        return sum(f"permissions violation for {what}" in e for e in self.errors)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def started(port: int) -> tuple[KernelSpace, ControlPlaneService]:
    kernel = KernelSpace(policy=policy())
    service = ControlPlaneService(
        AMB("nats", url(port, "control-plane"), agent_id="control-plane"),
        kernel,
        trust_bus=True,
        agents=AGENTS,
    )
    await service.start()
    return kernel, service


async def stop(kernel: KernelSpace, service: ControlPlaneService, *closers: Callable[[], Any]) -> None:
    for close in closers:
        await close()
    await service.stop()
    await kernel.close()


async def test_bobs_delivery_is_unreadable_by_mallory(port: int) -> None:
    spy = Raw()
    kernel, service = await started(port)
    alice, bob, mallory = agent(port, "alice"), agent(port, "bob"), agent(port, "mallory")
    try:
        got_bob, got_mallory = Collector(), Collector()
        await bob.subscribe(delivery_subject("tasks.>", agent="bob"), got_bob)
        await mallory.subscribe(delivery_subject("tasks.>", agent="mallory"), got_mallory)
        await spy.connect(url(port, "mallory"))
        stolen = [
            "deliver.>",
            "deliver.bob.>",
            "deliver.*.tasks.work",
            "deliver.tasks.>",
            ">",
            "_DLQ.>",
            "ingress.>",
        ]
        for subject in stolen:
            await spy.subscribe(subject)
        await spy.subscribe(delivery_subject("tasks.>", agent="mallory"))  # her own: allowed
        await wait_until(
            lambda: spy.refused("subscription") == len(stolen), what="every spying subscription refused"
        )

        await alice.publish(ingress_subject("tasks.work"), "for bob only", recipient="bob")
        await alice.publish(ingress_subject("tasks.work"), "for everyone")
        await got_bob.wait_for(2)
        await got_mallory.wait_for(1)
        # The service sends both on one connection, in order: once the spy's own subscription
        # has the second, any copy of the first would have reached it before.
        await wait_until(lambda: len(spy.got) >= 1, what="the broadcast on mallory's own subject")
        assert got_bob.messages == ["for bob only", "for everyone"]
        assert got_mallory.messages == ["for everyone"]
        assert [s for s, _ in spy.got] == ["deliver.mallory.tasks.work"]
        assert all(b"for bob only" not in data for _, data in spy.got)
        assert spy.refused("subscription") == len(stolen)
    finally:
        await stop(kernel, service, spy.close, alice.close, bob.close, mallory.close)


async def test_mallory_cannot_forge_dead_letters_deliveries_replies_or_signals(port: int) -> None:
    mallory, operator = Raw(), Raw()
    try:
        await operator.connect(url(port, "operator"))
        await operator.subscribe(">")
        await mallory.connect(url(port, "mallory"))
        forged = [
            "_DLQ.ingress.tasks.work",  # a dead letter in the platform's name
            "_DLQ.deliver.bob.tasks.work",
            "_DLQ.deliver.mallory.tasks.work",  # not even under her own name
            "deliver.bob.tasks.work",  # straight to bob, around the policy
            "deliver.mallory.tasks.work",  # to herself, around the policy
            "_INBOX.bob.1",  # a reply bob never asked the service for
            "_ctl.signal.bob",  # a signal
        ]
        for subject in forged:
            await mallory.nc.publish(subject, b"forged")
        await mallory.nc.publish("ingress.tasks.sentinel", b"sentinel")  # allowed: after the forgeries
        await mallory.nc.flush()
        await wait_until(
            lambda: any(s == "ingress.tasks.sentinel" for s, _ in operator.got), what="the sentinel"
        )
        await wait_until(lambda: mallory.refused("publish") == len(forged), what="every forgery refused")
        # The server handles one connection's messages in order: the forgeries came first.
        assert [s for s, _ in operator.got] == ["ingress.tasks.sentinel"]
    finally:
        await mallory.close()
        await operator.close()


async def test_each_agent_gets_its_own_and_the_deliver_policy_decides(port: int) -> None:
    operator = Raw()
    kernel, service = await started(port)
    alice, bob, mallory = agent(port, "alice"), agent(port, "bob"), agent(port, "mallory")
    try:
        await operator.connect(url(port, "operator"))
        await operator.subscribe("_DLQ.>")
        got = {name: Collector() for name in AGENTS}
        for name, client in (("alice", alice), ("bob", bob), ("mallory", mallory)):
            await client.subscribe(delivery_subject("tasks.>", agent=name), got[name])

        async def answer(message: Any, metadata: Any) -> None:
            await bob.reply(metadata, f"bob: {message}")

        await bob.subscribe(delivery_subject("tasks.ask", agent="bob"), answer)

        await alice.publish(ingress_subject("tasks.private"), "not for mallory")
        await alice.publish(ingress_subject("tasks.work"), "for all")
        for name in AGENTS:
            await got[name].wait_for(1 if name == "mallory" else 2)
        assert got["alice"].messages == got["bob"].messages == ["not for mallory", "for all"]
        assert got["mallory"].messages == ["for all"]  # the broadcast after it is there: no copy
        refused = await kernel.recorder.query(filters={"data.operation": "deliver", "data.decision": "deny"})
        assert [(r.agent_id, r.data["resource"], r.data["reason"]) for r in refused] == [
            ("mallory", "tasks.private", "not hers")
        ]
        assert service.stats.deliveries_denied == 1

        # Requests and their replies still work, the reply reaching the requester alone.
        assert (
            await alice.request(ingress_subject("tasks.ask"), "hi", recipient="bob", timeout=3) == "bob: hi"
        )

        # A message for an agent the service does not know is dead-lettered with the reason.
        await alice.publish(ingress_subject("tasks.work"), "for eve", recipient="eve")
        await wait_until(lambda: len(operator.got) >= 1, what="the dead letter")
        assert operator.got[0][0] == "_DLQ.ingress.tasks.work"
        assert get_serializer("msgpack").decode(operator.got[0][1]).headers[DLQ_REASON] == "unknown_recipient"
        assert service.client.stats.dead_lettered == 1
        assert all("for eve" not in m for m in got["bob"].messages + got["mallory"].messages)
    finally:
        await stop(kernel, service, operator.close, alice.close, bob.close, mallory.close)


async def test_each_agent_reads_the_dead_letters_of_its_own_messages_only(port: int) -> None:
    operator, mallory, bob = Raw(), Raw(), Raw()
    kernel, service = await started(port)
    alice = agent(port, "alice")
    try:
        await operator.connect(url(port, "operator"))
        await operator.subscribe("_DLQ.>")
        await operator.subscribe("_DLQ_AGENT.>")
        own = Collector()
        await alice.subscribe(dead_letter_subject(">", agent="alice"), own)
        await bob.connect(url(port, "bob"))
        await bob.subscribe(dead_letter_subject(">", agent="bob"))  # the intended recipient
        await mallory.connect(url(port, "mallory"))
        stolen = [
            "_DLQ.>",
            "_DLQ_AGENT.>",
            "_DLQ_AGENT.alice.>",
            "_DLQ_AGENT.*.>",
            "_DLQ_AGENT.alice.ingress.*",
        ]
        for subject in stolen:
            await mallory.subscribe(subject)
        await mallory.subscribe(dead_letter_subject(">", agent="mallory"))  # her own: allowed
        await wait_until(lambda: mallory.refused("subscription") == len(stolen), what="every spy refused")
        forged = "_DLQ_AGENT.alice.ingress.tasks.work"  # a dead letter in alice's name
        await mallory.nc.publish(forged, b"forged")

        await alice.publish(ingress_subject("other.topic"), "denied", recipient="bob")
        await alice.publish(ingress_subject("tasks.work"), "for eve", recipient="eve")
        await own.wait_for(2)
        assert [m.subject for m in own.metadata] == [
            "_DLQ_AGENT.alice.ingress.other.topic",
            "_DLQ_AGENT.alice.ingress.tasks.work",
        ]
        assert [m.headers[DLQ_REASON] for m in own.metadata] == ["policy_denied", "unknown_recipient"]
        assert own.metadata[0].headers[DLQ_SUBJECT] == "ingress.other.topic"
        codec = get_serializer("msgpack")
        mine = [codec.decode(data) for data in own.messages]
        assert [(m.sender, m.payload) for m in mine] == [("alice", "denied"), ("alice", "for eve")]

        # The operator's dead letters are where they were, beside the agent's copies.
        await wait_until(lambda: len(operator.got) >= 4, what="the operator's dead letters and copies")
        assert sorted(s for s, _ in operator.got) == [
            "_DLQ.ingress.other.topic",
            "_DLQ.ingress.tasks.work",
            "_DLQ_AGENT.alice.ingress.other.topic",
            "_DLQ_AGENT.alice.ingress.tasks.work",
        ]

        # Alice's copies were delivered before mallory and bob send their own denied messages, on
        # the service's one connection: once each has its own copy, a copy of alice's would have
        # reached it before.
        def got_one(raw: Raw) -> bool:
            return len(raw.got) >= 1

        for name, raw in (("mallory", mallory), ("bob", bob)):
            await raw.nc.publish(ingress_subject("other.topic"), codec.encode(envelope_of(name)))
            await wait_until(functools.partial(got_one, raw), what=f"{name}'s own dead letter")
            assert [s for s, _ in raw.got] == [f"_DLQ_AGENT.{name}.ingress.other.topic"]
            refused = codec.decode(codec.decode(raw.got[0][1]).payload)  # the copy holds its message
            assert (refused.sender, refused.payload) == (name, f"{name}'s own")
        await wait_until(lambda: mallory.refused("publish") == 1, what="the forged dead letter refused")
        assert len(own.messages) == 2  # the forgery never reached alice
        assert mallory.refused("subscription") == len(stolen)
        assert service.stats.agent_dead_letters == 4
    finally:
        await stop(kernel, service, operator.close, mallory.close, bob.close, alice.close)


def envelope_of(sender: str) -> Envelope:
    """A message of ``sender`` the policy denies, as its own client would encode it."""
    return Envelope(
        new_id(), ingress_subject("other.topic"), sender, f"{sender}'s own", timestamp=time.time_ns()
    )


@pytest.mark.parametrize(
    ("agents", "service_user"),
    [
        (['x",password:"p'], "control-plane"),  # closes the string and adds a field
        (["x}]authorization{users=[{user:y"], "control-plane"),
        (["control-plane"], "control-plane"),  # the service user twice
        (["alice", "alice"], "control-plane"),
        (["a.b"], "control-plane"),
        (["a\nb"], "control-plane"),
        ([""], "control-plane"),
        (["$SYS"], "control-plane"),
        (["x" * 65], "control-plane"),
        (["alice"], 'svc"'),
    ],
)
def test_an_agent_id_that_could_change_the_configuration_is_refused(
    agents: list[str], service_user: str
) -> None:
    with pytest.raises(ValueError, match=r"agent id|given twice"):
        nats_users(agents, service_user)


@pytest.mark.parametrize("prefix", ["in gress", "in.>", 'a"b', "", "a..b"])
def test_a_prefix_that_could_change_the_configuration_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="ingress prefix"):
        nats_users(["alice"], ingress_prefix=prefix)
    with pytest.raises(ValueError, match="delivery prefix"):
        nats_users(["alice"], delivery_prefix=prefix)


def test_a_forged_user_entry_is_refused_when_rendering() -> None:
    forged = NatsUser('x", password: "y', "p", ("a.>",), ("b.>",))
    with pytest.raises(ValueError, match="agent id"):
        nats_authorization([forged])
    twice = NatsUser("alice", "p", ("a.>",), ("b.>",))
    with pytest.raises(ValueError, match="given twice"):
        nats_authorization([twice, twice])
    with pytest.raises(ValueError, match="control character"):
        nats_users(["alice"], passwords={"alice": "line\nbreak"})


async def authenticates(port: int, user: str, password: str) -> bool:
    """Whether the server takes ``user`` with ``password``: the NATS protocol by hand (CONNECT,
    PING), so a refusal leaves nothing open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(reader.readline(), 5)  # INFO
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 5)
        return answer.startswith(b"PONG")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_passwords_are_written_exactly_and_only_the_exact_one_is_accepted(tmp_path: Path) -> None:
    hostile = 'p"}], x: "$y\\ # // z'
    users = nats_users(["alice"], "control-plane", passwords={"alice": hostile, "control-plane": "pw-svc"})
    async with private_nats(nats_authorization(users), tmp_path) as p:
        assert await authenticates(p, "alice", hostile)
        for wrong in ('p"}]', 'p\\"}], x: \\"$y\\\\ # // z', "p", ""):
            assert not await authenticates(p, "alice", wrong), wrong
