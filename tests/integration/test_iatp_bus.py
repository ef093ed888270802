"""IATP on the bus, end to end: on the in-memory broker and on the real NATS server.

Signed requests and signed replies verify (each side sees the other's verification result);
forged, tampered, replayed and unsigned messages are dead-lettered with the verification reason,
counted, and never reach the handler, and such replies on a requester's inbox never resolve its
request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from agent_os.amb import AMB, Envelope, Metadata, MsgpackSerializer, RequestTimeout, new_id
from agent_os.iatp import ACCEPT_UNSIGNED, IATP, MIN_TRUST, RESULT, IATPMiddleware, SigningRejected
from agent_os.iatp import session as iatp_session
from agent_os.iatp.errors import IATPConfigError
from agent_os.iatp.handshake import MAX_SESSIONS_PER_PAIR
from tests.support import Collector, wait_until
from tests.support.closing import Closing

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
    seen_ids: list[str] = []

    async def handle(message: Any, metadata: Metadata) -> None:
        result = metadata.context[RESULT]
        seen.append(result)
        seen_ids.append(metadata.id)
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
    # the requester verified the reply on its inbox before the request resolved with it
    reply_result = meta.context[RESULT]
    assert reply_result.valid
    assert reply_result.sender == "worker"
    assert reply_result.key_id == iatp.identity("worker").key_id == meta.signature.key_id
    assert reply_result.trust_level == pytest.approx(0.6)  # the coordinator's view of the worker
    assert meta.correlation_id == seen_ids[0]
    assert coordinator.stats.rejected == worker.stats.rejected == 0


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


@pytest.fixture
async def parties() -> tuple[IATP, IATP]:
    """The requester's IATP and the responder's, apart, as in two processes: each holds its own
    agent's private key and only the other's public identity."""
    requester, responder = IATP(), IATP()
    await requester.register_agent("coordinator")
    await responder.register_agent("worker")
    await requester.add_identity(responder.identity("worker"))
    await responder.add_identity(requester.identity("coordinator"))
    await requester.establish_trust("coordinator", "worker", 0.6)
    await responder.establish_trust("worker", "coordinator", 0.9, ["request_action"])
    return requester, responder


def reply_envelope(request: Metadata, sender: str, payload: Any, expires_at: int | None = None) -> Envelope:
    """An unsigned answer to ``request`` on its reply subject, as ``reply(metadata, ...)`` builds it."""
    assert request.reply_to is not None
    return Envelope(
        new_id(),
        request.reply_to,
        sender,
        payload,
        correlation_id=request.id,
        timestamp=time.time_ns(),
        expires_at=expires_at,
    )


async def test_forged_replies_are_dead_lettered_at_the_requester_and_the_genuine_reply_resolves(
    make_client: Factory, parties: tuple[IATP, IATP], subject: str
) -> None:
    """The responder holds the request until every forged reply has been dead-lettered at the
    requester, then answers: the request resolves with that genuine reply, verified."""
    requester_iatp, responder_iatp = parties
    guard = requester_iatp.middleware()
    coordinator = await make_client(
        agent_id="coordinator", middleware=[guard], inbox_prefix=f"_INBOX.{subject}"
    )
    worker = await make_client(agent_id="worker", middleware=[responder_iatp.middleware()])
    raw = await make_client(agent_id="raw")  # no middleware: can put anything on the wire
    requests, dead = Collector(), Collector()
    await worker.subscribe(f"{subject}.tasks", requests)  # answered below, after the forgeries
    await raw.subscribe(f"_DLQ._INBOX.{subject}.>", dead)
    codec = MsgpackSerializer()

    # A first round trip; its genuine reply is replayed at the second request.
    first = asyncio.create_task(
        coordinator.request(f"{subject}.tasks", {"task": 1}, timeout=5, with_metadata=True)
    )
    await requests.wait_for(1)
    await worker.reply(requests.metadata[0], {"done": 1})
    _, first_reply = await first
    assert first_reply.context[RESULT].valid

    pending = asyncio.create_task(
        coordinator.request(f"{subject}.tasks", {"task": 2}, timeout=5, with_metadata=True)
    )
    await requests.wait_for(2)
    request = requests.metadata[1]
    inbox = request.reply_to
    assert inbox is not None
    assert inbox.startswith(f"_INBOX.{subject}.")

    mallory = IATP()
    await mallory.register_agent("worker")  # the responder's name with another key
    await mallory.register_agent("mallory")  # a third party the requester does not know
    signed_by_worker = responder_iatp.sign_envelope(reply_envelope(request, "worker", {"done": 2}))
    forgeries = {
        "unknown_key": mallory.sign_envelope(reply_envelope(request, "worker", {"done": "forged"})),
        "unknown_sender": mallory.sign_envelope(reply_envelope(request, "mallory", {"done": "forged"})),
        "bad_signature": dataclasses.replace(signed_by_worker, payload={"done": "tampered"}),
        "replayed_nonce": first_reply.envelope,  # the first request's genuine reply, again
    }
    for env in forgeries.values():
        await raw.broker.publish(inbox, codec.encode(env))
    await raw.publish(inbox, {"done": "unsigned"}, sender_id="worker", correlation_id=request.id)
    # A genuine but expired reply: the bus drops it as expired before it is verified.
    stale = reply_envelope(request, "worker", {"done": "stale"}, expires_at=time.time_ns() - 1)
    await raw.broker.publish(inbox, codec.encode(responder_iatp.sign_envelope(stale)))
    refused = [*forgeries, "unsigned"]
    await dead.wait_for(len(refused))
    await wait_until(lambda: coordinator.stats.expired == 1, what="the stale reply dropped as expired")
    assert not pending.done()

    await worker.reply(request, {"done": 2})
    payload, reply = await pending
    assert payload == {"done": 2}  # the genuine reply, not any that came before it
    result = reply.context[RESULT]
    assert result.valid
    assert result.sender == reply.sender == "worker"
    assert result.key_id == responder_iatp.identity("worker").key_id
    assert result.trust_level == pytest.approx(0.6)  # the coordinator's view of the worker

    assert sorted(m.headers["dlq-reason"] for m in dead.metadata) == sorted(refused)
    assert {m.headers["dlq-subject"] for m in dead.metadata} == {inbox}
    assert guard.rejected == dict.fromkeys(refused, 1)
    assert coordinator.stats.rejected == coordinator.stats.dead_lettered == len(refused)
    # refused before the request machinery: none was taken for a reply, late or mismatched
    assert coordinator.stats.mismatched_replies == coordinator.stats.late_replies == 0


async def test_a_request_answered_only_by_unsigned_and_forged_replies_times_out(
    make_client: Factory, parties: tuple[IATP, IATP], subject: str
) -> None:
    """Whenever the refused replies arrive, before the timeout or after it, they are dead-lettered
    and the request times out: none is taken for its reply."""
    requester_iatp, _ = parties
    guard = requester_iatp.middleware()
    coordinator = await make_client(
        agent_id="coordinator", middleware=[guard], inbox_prefix=f"_INBOX.{subject}"
    )
    responder = await make_client(agent_id="worker")  # answers without IATP: its replies are unsigned
    dead = Collector()
    await responder.subscribe(f"_DLQ._INBOX.{subject}.>", dead)
    mallory = IATP()
    await mallory.register_agent("worker")
    codec = MsgpackSerializer()

    async def answer(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, {"done": message["task"]})
        forged = mallory.sign_envelope(reply_envelope(metadata, "worker", {"done": message["task"]}))
        await responder.broker.publish(forged.topic, codec.encode(forged))

    await responder.subscribe(f"{subject}.tasks", answer)
    with pytest.raises(RequestTimeout):
        await coordinator.request(f"{subject}.tasks", {"task": 3}, timeout=0.5)
    await dead.wait_for(2)
    assert sorted(m.headers["dlq-reason"] for m in dead.metadata) == ["unknown_key", "unsigned"]
    assert guard.rejected == {"unknown_key": 1, "unsigned": 1}
    assert coordinator.stats.request_timeouts == 1
    assert coordinator.stats.rejected == 2
    assert coordinator.stats.mismatched_replies == coordinator.stats.late_replies == 0


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


class _Unreadable(float):
    def __float__(self) -> float:
        raise ZeroDivisionError


@pytest.mark.parametrize(
    "minimum", [math.nan, "0.5", [0.5], -0.5, 1.5, True, False, "", _Unreadable(0.5)], ids=repr
)
async def test_a_minimum_trust_that_is_not_a_number_refuses_every_message(
    make_client: Factory, iatp: IATP, subject: str, minimum: object
) -> None:
    # Fail closed: a NaN minimum compared false with every level, and let the untrusted in.
    await iatp.register_agent("stranger")
    receiver = await make_client(agent_id="worker", middleware=[iatp.middleware()])
    sender = await make_client(agent_id="stranger", middleware=[iatp.middleware()])
    trusted_sender = await make_client(agent_id="coordinator", middleware=[iatp.middleware()])
    got = Collector()
    await receiver.subscribe(f"{subject}.odd", got, context={MIN_TRUST: minimum})
    await sender.publish(f"{subject}.odd", "let me in")
    await trusted_sender.publish(f"{subject}.odd", "hello")
    await wait_until(lambda: receiver.stats.rejected == 2, what="both refused")
    assert got.messages == []
    with pytest.raises(IATPConfigError, match="min_trust"):
        iatp.middleware(min_trust=math.nan)


@pytest.mark.parametrize(
    "minimum", [np.float64(0.5), Fraction(1, 2), np.float32(0.5), Decimal("0.5")], ids=repr
)
async def test_a_minimum_trust_of_another_number_type_counts_by_its_value(
    make_client: Factory, iatp: IATP, subject: str, minimum: object
) -> None:
    await iatp.register_agent("stranger")
    receiver = await make_client(agent_id="worker", middleware=[iatp.middleware(min_trust=minimum)])
    sender = await make_client(agent_id="stranger", middleware=[iatp.middleware()])
    trusted_sender = await make_client(agent_id="coordinator", middleware=[iatp.middleware()])
    got, also = Collector(), Collector()
    await receiver.subscribe(f"{subject}.np", got)
    await receiver.subscribe(f"{subject}.ctx", also, context={MIN_TRUST: minimum})
    for topic in (f"{subject}.np", f"{subject}.ctx"):
        await sender.publish(topic, "let me in")
        await trusted_sender.publish(topic, "hello")
    await got.wait_for(1)
    await also.wait_for(1)
    await wait_until(lambda: receiver.stats.rejected == 2, what="the stranger refused twice")
    assert got.messages == also.messages == ["hello"]


@pytest.mark.parametrize("minimum", [None, 0, 0.0, np.float64(0), Fraction(0)], ids=repr)
async def test_a_minimum_trust_of_none_or_zero_is_no_minimum(
    make_client: Factory, iatp: IATP, subject: str, minimum: object
) -> None:
    await iatp.register_agent("stranger")
    receiver = await make_client(agent_id="worker", middleware=[iatp.middleware()])
    sender = await make_client(agent_id="stranger", middleware=[iatp.middleware()])
    got = Collector()
    await receiver.subscribe(f"{subject}.zero", got, context={MIN_TRUST: minimum})
    await sender.publish(f"{subject}.zero", "in")
    await got.wait_for(1)
    assert receiver.stats.rejected == 0


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


async def alice_and_bob() -> tuple[IATP, IATP]:
    """Two processes' IATPs: alice's and bob's, each knowing the other's public identity."""
    a, b = IATP(), IATP()
    await a.register_agent("alice")
    await b.register_agent("bob")
    await a.add_identity(b.identity("bob"))
    await b.add_identity(a.identity("alice"))
    return a, b


async def test_after_a_loop_of_handshakes_both_sides_still_seal_in_a_session_they_share(
    make_client: Factory, subject: str
) -> None:
    """bob starts a session to alice and talks in it; alice then handshakes more times than
    a pair keeps sessions (a reconnect loop, say) and talks in the last. Each side closes
    different sessions to stay within the bound, and both still seal in one the other holds."""
    a, b = await alice_and_bob()
    guard_a = IATPMiddleware(a)
    alice = await make_client(agent_id="alice", middleware=[guard_a])
    bob = await make_client(agent_id="bob", middleware=[IATPMiddleware(b)])
    to_alice, to_bob = Collector(), Collector()
    await alice.subscribe(f"{subject}.to_alice", to_alice)
    await bob.subscribe(f"{subject}.to_bob", to_bob)

    async def handshake(initiator: IATP, local: str, responder: IATP, peer: str) -> None:
        pending = await initiator.offer_session(local, peer)
        _, answer = await responder.accept_session(peer, pending.offer.to_bytes())
        await initiator.complete_session(pending, answer)

    await handshake(b, "bob", a, "alice")
    await bob.publish(f"{subject}.to_alice", "first", recipient="alice")
    await to_alice.wait_for(1)
    for _ in range(MAX_SESSIONS_PER_PAIR + 1):
        await handshake(a, "alice", b, "bob")
    await alice.publish(f"{subject}.to_bob", "hello", recipient="bob")
    await to_bob.wait_for(1)
    await bob.publish(f"{subject}.to_alice", "reply", recipient="alice")
    await to_alice.wait_for(2)
    assert to_alice.messages == ["first", "reply"]
    schemes = {m.signature.scheme for m in [*to_alice.metadata, *to_bob.metadata] if m.signature}
    assert schemes == {"iatp-session-v1"}
    assert not guard_a.rejected


async def test_a_blocked_subscription_keeps_its_backlog_while_others_come_and_go(
    make_client: Factory, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short-lived subscriptions (one message each) come and go while a long-lived one's
    handler is blocked with messages queued. Their windows end when they stop, so the blocked
    one's window is never dropped into the floor and it takes its whole backlog (with the
    bounds shrunk, it lost all ten)."""
    monkeypatch.setattr(iatp_session, "MAX_SCOPES", 8)
    monkeypatch.setattr(iatp_session, "MOST_SCOPES", 16)
    monkeypatch.setattr(iatp_session, "_MORE_SCOPES", 2)
    a, b = await alice_and_bob()
    guard_b = IATPMiddleware(b)
    alice = await make_client(agent_id="alice", middleware=[IATPMiddleware(a)])
    bob = await make_client(agent_id="bob", middleware=[guard_b])
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    await a.complete_session(pending, answer)
    gate, slow_got = asyncio.Event(), []

    async def slow(message: Any, metadata: Metadata) -> None:
        slow_got.append(message)
        if message == 0:
            await gate.wait()

    await bob.subscribe(f"{subject}.slow", slow)
    await alice.publish(f"{subject}.slow", 0, recipient="bob")
    await wait_until(lambda: slow_got == [0], what="the slow handler blocked")
    for i in range(1, 11):
        await alice.publish(f"{subject}.slow", i, recipient="bob")
    short_got: list[Any] = []

    async def short(message: Any, metadata: Metadata) -> None:
        short_got.append(message)  # not the metadata: its context holds the subscription

    stopped: list[Any] = []

    def received(count: int) -> Callable[[], bool]:
        return lambda: len(short_got) >= count

    for k in range(60):
        sub = await bob.subscribe(f"{subject}.short.{k}", short)
        await alice.publish(f"{subject}.short.{k}", k, recipient="bob")
        await wait_until(received(k + 1), what="its one message")
        await sub.unsubscribe()
        stopped.append(sub)  # kept: its window ends when it stops, not when it is collected
    gate.set()
    await wait_until(lambda: len(slow_got) == 11 or bool(guard_b.rejected), what="the backlog")
    assert slow_got == list(range(11))
    assert not guard_b.rejected


async def test_a_handler_draining_its_own_subscription_still_refuses_a_queued_replay(
    closing: Closing, subject: str
) -> None:
    """The subscription stops (its window ends) while its queue still runs out, as the memory
    broker's does: a replay of the message being handled, queued meanwhile, is refused."""
    a, b = await alice_and_bob()
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    await a.complete_session(pending, answer)
    guard_b = IATPMiddleware(b)
    url = f"memory://iatp-{uuid.uuid4().hex}"
    alice = closing(AMB(connection_string=url, agent_id="alice", middleware=[IATPMiddleware(a)]))
    bob = closing(AMB(connection_string=url, agent_id="bob", middleware=[guard_b]))
    raw = closing(AMB(connection_string=url, agent_id="raw"))
    for client in (alice, bob, raw):
        await client.connect()
    sent: list[tuple[str, bytes]] = []
    publish = alice.broker.publish

    async def tap(topic: str, data: bytes, *, key: str | None = None) -> None:
        sent.append((topic, data))
        await publish(topic, data, key=key)

    alice.broker.publish = tap  # type: ignore[assignment,method-assign]
    got: list[Any] = []
    gate = asyncio.Event()

    async def handler(message: Any, metadata: Metadata) -> None:
        got.append(message)
        await gate.wait()  # the replays queue up meanwhile
        await metadata.context["subscription"].drain()

    await bob.subscribe(f"{subject}.x", handler)
    await alice.publish(f"{subject}.x", "first", recipient="bob")
    await wait_until(lambda: got == ["first"], what="the first message in its handler")
    topic, data = sent[-1]
    await raw.broker.publish(topic, data)
    await raw.broker.publish(topic, data)
    gate.set()
    await wait_until(lambda: sum(guard_b.rejected.values()) >= 1 or len(got) > 1, what="the replays")
    assert got == ["first"]


async def test_a_lost_answer_leaves_the_responders_messages_verifiable(
    make_client: Factory, subject: str
) -> None:
    """bob answers alice's offer and the answer never reaches her: his messages to her are
    signed (she could not check a MAC in that session) until she sends in a session, after
    which he seals in it."""
    a, b = await alice_and_bob()
    alice = await make_client(agent_id="alice", middleware=[IATPMiddleware(a)])
    bob = await make_client(agent_id="bob", middleware=[IATPMiddleware(b)])
    to_alice, to_bob = Collector(), Collector()
    await alice.subscribe(f"{subject}.to_alice", to_alice)
    await bob.subscribe(f"{subject}.to_bob", to_bob)
    lost = await a.offer_session("alice", "bob")
    await b.accept_session("bob", lost.offer.to_bytes())  # the answer is lost
    await bob.publish(f"{subject}.to_alice", "signed", recipient="alice")
    await to_alice.wait_for(1)
    pending = await a.offer_session("alice", "bob")  # alice tries again
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    await a.complete_session(pending, answer)
    await alice.publish(f"{subject}.to_bob", "hello", recipient="bob")
    await to_bob.wait_for(1)
    await bob.publish(f"{subject}.to_alice", "sealed", recipient="alice")
    await to_alice.wait_for(2)
    assert to_alice.messages == ["signed", "sealed"]
    assert all(m.context[RESULT].valid for m in to_alice.metadata)
    schemes = [m.signature.scheme if m.signature else None for m in to_alice.metadata]
    assert schemes == ["ed25519", "iatp-session-v1"]


async def test_a_confirmed_session_carries_the_responders_messages_alone(
    make_client: Factory, subject: str
) -> None:
    """alice starts a session so that bob's stream to her is cheap to check, and never sends
    in it: her confirmation (the handshake's third message) is what lets bob seal in it."""
    a, b = await alice_and_bob()
    alice = await make_client(agent_id="alice", middleware=[IATPMiddleware(a)])
    bob = await make_client(agent_id="bob", middleware=[IATPMiddleware(b)])
    to_alice = Collector()
    await alice.subscribe(f"{subject}.to_alice", to_alice)

    async def confirm(message: Any, metadata: Metadata) -> None:
        await b.confirm_session("bob", message)

    await bob.subscribe(f"{subject}.confirm", confirm)
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    session = await a.complete_session(pending, answer)
    await bob.publish(f"{subject}.to_alice", "before", recipient="alice")
    await to_alice.wait_for(1)
    await alice.publish(f"{subject}.confirm", a.session_confirmation(session))  # not addressed: signed
    await wait_until(
        lambda: b.sessions.for_pair("bob", "alice", time.time_ns()) is not None, what="the confirmation taken"
    )
    for i in range(3):
        await bob.publish(f"{subject}.to_alice", i, recipient="alice")
    await to_alice.wait_for(4)
    assert to_alice.messages == ["before", 0, 1, 2]
    assert all(m.context[RESULT].valid for m in to_alice.metadata)
    schemes = [m.signature.scheme if m.signature else None for m in to_alice.metadata]
    assert schemes == ["ed25519", *["iatp-session-v1"] * 3]


async def test_session_mode_over_the_bus(make_client: Factory, subject: str) -> None:
    a, b = await alice_and_bob()
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
