"""IATP on the bus, end to end: on the in-memory broker and on the real NATS server.

Signed requests and signed replies verify; forged, tampered and unsigned messages are
dead-lettered with the verification reason, counted, and never reach the handler.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from amb import AMB, Metadata, MsgpackSerializer
from iatp import ACCEPT_UNSIGNED, IATP, MIN_TRUST, RESULT, IATPMiddleware, SigningRejected
from tests.support import Collector, wait_until

BACKENDS = [
    pytest.param(("memory", None), id="memory"),
    pytest.param(("nats", "nats://127.0.0.1:4222"), id="nats", marks=pytest.mark.nats),
]

Factory = Callable[..., Awaitable[AMB]]


@pytest.fixture(params=BACKENDS)
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    backend, url = request.param
    url = url or f"memory://iatp-{uuid.uuid4().hex}"
    clients: list[AMB] = []

    async def make(**options: Any) -> AMB:
        client = AMB(backend=backend, connection_string=url, **options)
        await client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def subject() -> str:
    return f"iatp{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def iatp() -> IATP:
    iatp = IATP()
    for name in ("coordinator", "worker"):
        await iatp.register_agent(name)
    await iatp.establish_trust("worker", "coordinator", 0.9, ["request_action"])
    await iatp.establish_trust("coordinator", "worker", 0.6, ["send_data"])
    return iatp


async def test_signed_request_and_signed_reply_verify(make_client: Factory, iatp: IATP, subject: str) -> None:
    worker = await make_client(agent_id="worker", middleware=[iatp.middleware()])
    coordinator = await make_client(agent_id="coordinator", middleware=[iatp.middleware()])
    seen: list[Any] = []

    async def handle(message: Any, metadata: Metadata) -> None:
        result = metadata.context[RESULT]
        seen.append(result)
        await worker.reply(metadata, {"done": message["task"], "signature": metadata.signature is not None})

    await worker.subscribe(f"{subject}.tasks", handle)
    payload, meta = await coordinator.request(f"{subject}.tasks", {"task": 7}, timeout=5, with_metadata=True)
    assert payload == {"done": 7, "signature": True}
    assert meta.signature is not None
    assert meta.signature.scheme == "ed25519"
    assert meta.sender == "worker"
    (request_result,) = seen
    assert request_result.valid
    assert request_result.sender == "coordinator"
    assert request_result.trust_level == pytest.approx(0.9)  # the worker's view of the coordinator
    assert request_result.to_dict()["valid"] is True


async def test_forged_tampered_and_unsigned_messages_are_dead_lettered(
    make_client: Factory, iatp: IATP, subject: str
) -> None:
    middleware = iatp.middleware()
    receiver = await make_client(agent_id="worker", middleware=[middleware])
    raw = await make_client(agent_id="raw")  # no middleware: can put anything on the wire
    handled = Collector()
    dead = Collector()
    await receiver.subscribe(f"{subject}.in", handled)
    await raw.subscribe(f"_DLQ.{subject}.in", dead)

    mallory = IATP()
    await mallory.register_agent("coordinator")  # claims the name with another key
    forged = await mallory.sign("coordinator", {"cmd": "rm -rf"}, topic=f"{subject}.in")
    good = await iatp.sign("coordinator", {"cmd": "ok"}, topic=f"{subject}.in")
    tampered = dataclasses.replace(good, payload={"cmd": "rm -rf"})
    codec = MsgpackSerializer()
    for env in (forged, tampered):
        await raw.broker.publish(f"{subject}.in", codec.encode(env))
    await raw.publish(f"{subject}.in", {"cmd": "unsigned"}, sender_id="coordinator")
    await raw.broker.publish(f"{subject}.in", codec.encode(good))
    await raw.broker.publish(f"{subject}.in", codec.encode(good))  # a replay

    await dead.wait_for(4)
    await handled.wait_for(1)
    assert handled.messages == [{"cmd": "ok"}]
    reasons = sorted(m.headers["dlq-reason"] for m in dead.metadata)
    assert reasons == ["bad_signature", "replayed_nonce", "unknown_key", "unsigned"]
    assert receiver.stats.rejected == 4
    assert receiver.stats.dead_lettered == 4
    assert middleware.rejected == {"bad_signature": 1, "replayed_nonce": 1, "unknown_key": 1, "unsigned": 1}


async def test_per_subscription_policy_for_unsigned_messages(
    make_client: Factory, iatp: IATP, subject: str
) -> None:
    receiver = await make_client(agent_id="worker", middleware=[iatp.middleware()])
    raw = await make_client(agent_id="raw")
    lenient, strict = Collector(), Collector()
    await receiver.subscribe(f"{subject}.open", lenient, context={ACCEPT_UNSIGNED: True})
    await receiver.subscribe(f"{subject}.closed", strict)
    await raw.publish(f"{subject}.open", "hello")
    await raw.publish(f"{subject}.closed", "hello")
    await lenient.wait_for(1)
    await wait_until(lambda: receiver.stats.rejected == 1, what="the strict subscription's rejection")
    assert strict.messages == []
    context = lenient.metadata[0].context
    assert context[RESULT].valid is False
    assert context[RESULT].reason == "unsigned"
    assert context["subscription"].pattern == f"{subject}.open"


async def test_min_trust_per_subscription(make_client: Factory, iatp: IATP, subject: str) -> None:
    await iatp.register_agent("stranger")
    receiver = await make_client(agent_id="worker", middleware=[iatp.middleware()])
    sender = await make_client(agent_id="stranger", middleware=[iatp.middleware()])
    trusted_sender = await make_client(agent_id="coordinator", middleware=[iatp.middleware()])
    got = Collector()
    await receiver.subscribe(f"{subject}.vip", got, context={MIN_TRUST: 0.5})
    await sender.publish(f"{subject}.vip", "let me in")
    await trusted_sender.publish(f"{subject}.vip", "hello")
    await got.wait_for(1)
    await wait_until(lambda: receiver.stats.rejected == 1, what="the untrusted sender's rejection")
    assert got.messages == ["hello"]


async def test_fan_out_to_two_subscriptions_is_not_a_replay(
    make_client: Factory, iatp: IATP, subject: str
) -> None:
    receiver = await make_client(agent_id="worker", middleware=[iatp.middleware()])
    sender = await make_client(agent_id="coordinator", middleware=[iatp.middleware()])
    a, b = Collector(), Collector()
    await receiver.subscribe(f"{subject}.fan", a)
    await receiver.subscribe(f"{subject}.*", b)
    await sender.publish(f"{subject}.fan", "x")
    await a.wait_for(1)
    await b.wait_for(1)
    assert receiver.stats.rejected == 0


async def test_publishing_as_an_agent_without_a_key_is_refused(make_client: Factory, iatp: IATP) -> None:
    client = await make_client(agent_id="nobody", middleware=[iatp.middleware()])
    with pytest.raises(SigningRejected):
        await client.publish("iatp.any", "x")


async def test_session_mode_over_the_bus(make_client: Factory, subject: str) -> None:
    a, b = IATP(), IATP()
    await a.register_agent("alice")
    await b.register_agent("bob")
    await a.add_identity(b.identity("bob"))
    await b.add_identity(a.identity("alice"))
    alice = await make_client(agent_id="alice", middleware=[IATPMiddleware(a)])
    bob = await make_client(agent_id="bob", middleware=[IATPMiddleware(b)])

    async def accept(message: Any, metadata: Metadata) -> None:
        _, answer = await b.accept_session("bob", message)
        await bob.reply(metadata, answer)

    await bob.subscribe(f"{subject}.handshake", accept)
    pending = await a.offer_session("alice", "bob")
    answer = await alice.request(f"{subject}.handshake", pending.offer.to_bytes(), timeout=5)
    await a.complete_session(pending, answer)

    got = Collector()
    await bob.subscribe(f"{subject}.data", got)
    for i in range(5):
        await alice.publish(f"{subject}.data", i, recipient="bob")
    await got.wait_for(5)
    assert got.messages == list(range(5))
    assert {m.signature.scheme for m in got.metadata if m.signature} == {"iatp-session-v1"}
    assert all(m.context[RESULT].valid for m in got.metadata)
