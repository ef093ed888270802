"""A signed message moved to another subject is never acted on, on the real NATS server (and
the real Redis for the shared nonce store).

The services choose the operation from the delivery subject; the envelope's signed ``topic``
says what its sender meant. Every handler acting on the subject refuses a message whose signed
topic is another (``wrong_subject``, dead-lettered and counted), before its nonce is used up;
and a service's subjects share one replay scope, locally and in the shared store.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from agent_os.amb import AMB, Envelope, MsgpackSerializer, new_id
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.control_plane import AgentSignal, KernelSpace, Pattern, Policy, control_subject
from agent_os.emk import EMK, HashingEmbedder
from agent_os.iatp import IATP, REPLAY_SCOPE, RedisNonceStore
from agent_os.services.memory_service import MemoryService
from agent_os.services.verifier_service import VerifierService
from tests.support import Collector, wait_until
from tests.support.cleanup import delete_redis_keys
from tests.support.closing import Closing
from tests.support.identities import identities
from tests.support.servers import NATS_URL, REDIS_URL

pytestmark = [pytest.mark.nats, pytest.mark.redis]

WIRE = MsgpackSerializer()


@dataclass
class Memory:
    tag: str
    prefix: str
    service: MemoryService
    keys: dict[str, IATP]
    alice: AMB
    raw: AMB
    dead: Collector
    nonce_prefix: str


@pytest.fixture
async def m() -> AsyncIterator[Memory]:
    """A memory service on NATS verifying with IATP and a shared nonce store in Redis; alice's
    client signs; ``raw`` publishes bytes as an attacker would; ``dead`` sees the dead letters."""
    tag = uuid.uuid4().hex[:10]
    prefix, nonce_prefix = f"emk{tag}", f"t{tag}:nonce:"
    keys = await identities("memory-service", "alice")
    keys["memory-service"].nonce_store = RedisNonceStore(REDIS_URL, prefix=nonce_prefix)
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    bus = AMB("nats", NATS_URL, agent_id="memory-service", middleware=[keys["memory-service"].middleware()])
    service = MemoryService(bus, emk, prefix=prefix)
    alice = AMB("nats", NATS_URL, agent_id="alice", middleware=[keys["alice"].middleware()])
    raw = AMB("nats", NATS_URL, agent_id=f"raw-{tag}")
    dead = Collector()
    try:
        await service.start()
        await raw.subscribe(f"_DLQ.{prefix}.>", dead)
        await alice.connect()
        yield Memory(tag, prefix, service, keys, alice, raw, dead, nonce_prefix)
    finally:
        await service.stop()
        for client in (alice, raw, bus):
            await client.close()
        await emk.close()
        await keys["memory-service"].nonce_store.close()
        await delete_redis_keys(REDIS_URL, key_prefix=nonce_prefix)


async def alices_records(m: Memory) -> list[object]:
    answer = await m.alice.request(f"{m.prefix}.query", {}, timeout=10)
    return list(answer["records"])


async def test_a_message_signed_for_a_chat_topic_is_not_stored_when_moved_to_store(m: Memory) -> None:
    signed = await m.keys["alice"].sign("alice", {"content": "transfer 100 to mallory"}, topic="chat.general")
    await m.raw.broker.publish(f"{m.prefix}.store", WIRE.encode(signed))
    await m.dead.wait_for(1, timeout=10)
    assert m.dead.metadata[0].headers[DLQ_REASON] == "wrong_subject"
    assert await alices_records(m) == []
    mw = m.service.amb._middleware[0]
    assert mw.rejected == {"wrong_subject": 1}  # type: ignore[attr-defined]


async def test_a_request_replayed_onto_another_operation_is_refused(m: Memory) -> None:
    """alice's search (answered) captured and re-published on store: refused, nothing stored."""
    copies = Collector()
    await m.raw.subscribe(f"{m.prefix}.search", copies)
    found = await m.alice.request(f"{m.prefix}.search", {"query": "q", "content": "planted"}, timeout=10)
    assert found["ok"] is True
    await copies.wait_for(1)
    captured = WIRE.encode(copies.metadata[0].envelope)
    for op in ("store", "get", "history", "query"):
        await m.raw.broker.publish(f"{m.prefix}.{op}", captured)
    await m.dead.wait_for(4, timeout=10)
    assert {md.headers[DLQ_REASON] for md in m.dead.metadata} == {"wrong_subject"}
    assert await alices_records(m) == []


async def test_a_refused_copy_does_not_use_up_the_nonce_of_the_original(m: Memory) -> None:
    """The copy arrives first on the wrong subject; the original is still served after."""
    signed = await m.keys["alice"].sign("alice", {"content": "kept"}, topic=f"{m.prefix}.store")
    data = WIRE.encode(signed)
    await m.raw.broker.publish(f"{m.prefix}.search", data)
    await m.dead.wait_for(1, timeout=10)
    await m.raw.broker.publish(f"{m.prefix}.store", data)
    await wait_until(lambda: m.service.stats["ok"] >= 1, 10, "the original stored")
    assert [r["content"] for r in await alices_records(m)] == ["kept"]  # type: ignore[index]
    await m.raw.broker.publish(f"{m.prefix}.store", data)  # a plain replay: still refused
    await m.dead.wait_for(2, timeout=10)
    assert m.dead.metadata[1].headers[DLQ_REASON] == "replayed_nonce"


async def test_the_service_claims_nonces_under_one_scope_for_all_its_subjects(m: Memory) -> None:
    import redis.asyncio as aioredis

    copies = Collector()
    await m.raw.subscribe(f"{m.prefix}.>", copies)
    await m.alice.request(f"{m.prefix}.store", {"content": "one"}, timeout=10)
    await m.alice.request(f"{m.prefix}.search", {"query": "one"}, timeout=10)
    await copies.wait_for(2)
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        for md in copies.metadata:
            sig = md.envelope.sig
            assert sig is not None
            assert await r.exists(f"{m.nonce_prefix}{m.service.replay_scope}:{sig.nonce.hex()}") == 1
    finally:
        await r.aclose()


async def test_without_iatp_the_memory_service_refuses_a_claimed_topic_of_another_subject() -> None:
    """``trust_bus``: nothing is signed, but the topic still decides: refused, counted, answered."""
    tag = uuid.uuid4().hex[:10]
    prefix = f"emk{tag}"
    answers = Collector()
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    bus = AMB("nats", NATS_URL, agent_id="memory-service")
    service = MemoryService(bus, emk, prefix=prefix, trust_bus=True)
    caller = AMB("nats", NATS_URL, agent_id="alice")
    try:
        await service.start()
        await caller.subscribe(f"answers.{tag}", answers)
        env = Envelope(new_id(), "chat.general", "alice", {"content": "x"}, reply_to=f"answers.{tag}")
        await caller.broker.publish(f"{prefix}.store", WIRE.encode(env))
        await answers.wait_for(1, timeout=10)
        assert answers.messages[0]["error"] == "WrongSubject"
        assert service.stats["errors.WrongSubject"] == 1
        assert (await caller.request(f"{prefix}.query", {}, timeout=10))["records"] == []
    finally:
        await service.stop()
        for client in (caller, bus):
            await client.close()
        await emk.close()


async def test_the_verifier_refuses_a_message_signed_for_another_topic_and_asks_no_model() -> None:
    tag = uuid.uuid4().hex[:10]
    subject = f"cmvk{tag}.verify"
    keys = await identities("verifier-service", "alice")
    async with ScriptedLLMServer(default=Reply(verdict("supported"))) as llm:
        cmvk = CMVK([ModelSpec("a", model="openai/a")], api_base=llm.url, api_key="k", retries=0)
        service_mw = keys["verifier-service"].middleware()
        dead = Collector()
        bus = AMB("nats", NATS_URL, agent_id="verifier-service", middleware=[service_mw])
        service = VerifierService(bus, cmvk, subject=subject, queue=f"q{tag}")
        raw = AMB("nats", NATS_URL, agent_id=f"raw-{tag}")
        try:
            await service.start()
            await raw.subscribe(f"_DLQ.{subject}", dead)
            signed = await keys["alice"].sign(
                "alice", {"prompt": "p", "response": "r", "context": None}, topic="chat.general"
            )
            await raw.broker.publish(subject, WIRE.encode(signed))
            await dead.wait_for(1, timeout=10)
            assert dead.metadata[0].headers[DLQ_REASON] == "wrong_subject"
            assert llm.requests == []
            assert service.stats.verified + service.stats.rejected == 0
        finally:
            await service.stop()
            for client in (raw, bus):
                await client.close()


async def test_a_signal_for_one_agent_replayed_onto_another_agents_control_subject_is_refused(
    closing: Closing,
) -> None:
    """The supervisor stops alice; the captured request re-published on carol's control
    subject must not stop carol (the policy allows the supervisor to signal both)."""
    tag = uuid.uuid4().hex[:8]
    alice_id, carol_id, boss = f"alice-{tag}", f"carol-{tag}", f"supervisor-{tag}"
    keys = await identities(boss, alice_id, carol_id)
    policy = Policy("signals", default_action="deny")
    policy.add_rule("allow", Pattern("signal", "*", conditions={"sender": boss}))
    policy.add_rule("allow", Pattern("reply", "*"))
    kernel = closing(KernelSpace(policy=policy))
    agents = {
        name: closing(AMB("nats", NATS_URL, agent_id=name, middleware=[keys[name].middleware()]))
        for name in (alice_id, carol_id)
    }
    for client in agents.values():
        kernel.attach(client)
    supervisor = closing(AMB("nats", NATS_URL, agent_id=boss, middleware=[keys[boss].middleware()]))
    raw = closing(AMB("nats", NATS_URL, agent_id=f"raw-{tag}"))
    copies, dead = Collector(), Collector()
    try:
        for client in agents.values():
            await client.connect()
        await raw.subscribe(control_subject(alice_id), copies)
        await raw.subscribe(f"_DLQ.{control_subject(carol_id)}", dead)
        assert await supervisor.request(control_subject(alice_id), {"signal": "SIGSTOP"}, timeout=10) == {
            "ok": True
        }
        assert kernel.get_agent_status(alice_id).state == "stopped"
        await copies.wait_for(1)
        await raw.broker.publish(control_subject(carol_id), WIRE.encode(copies.metadata[0].envelope))
        await dead.wait_for(1, timeout=10)
        assert dead.metadata[0].headers[DLQ_REASON] == "wrong_subject"
        assert kernel.get_agent_status(carol_id).state == "running"
        assert AgentSignal.SIGSTOP.name == "SIGSTOP"
    finally:
        for client in (raw, supervisor, *agents.values()):
            await client.close()
        await kernel.close()


async def test_subscriptions_sharing_a_replay_scope_refuse_a_copy_on_another_subject(
    closing: Closing,
) -> None:
    """Without the topic bound (a handler that reads ``metadata.topic`` itself), one scope
    still means one nonce memory: locally, and in the shared store across processes."""
    tag = uuid.uuid4().hex[:10]
    nonce_prefix = f"t{tag}:nonce:"
    keys = await identities("svc", "alice")
    second = await identities("svc", "alice")  # a second instance of the service: its own cache
    await second["svc"].add_identity(keys["alice"].identity("alice"), trust_new_keys=True)
    stores = [RedisNonceStore(REDIS_URL, prefix=nonce_prefix) for _ in range(2)]
    shared_one = keys["svc"].middleware(nonce_store=stores[0])
    shared_two = second["svc"].middleware(nonce_store=stores[1])
    one = closing(AMB("nats", NATS_URL, agent_id="svc", middleware=[shared_one]))
    local = closing(AMB("nats", NATS_URL, agent_id="svc", middleware=[keys["svc"].middleware()]))
    two = closing(AMB("nats", NATS_URL, agent_id="svc", middleware=[shared_two]))
    raw = closing(AMB("nats", NATS_URL, agent_id=f"raw-{tag}"))
    got, dead = Collector(), Collector()
    scope = {REPLAY_SCOPE: f"svc{tag}"}
    try:
        await local.subscribe(f"a{tag}.x", got, context=scope)
        await local.subscribe(f"a{tag}.y", got, context=scope)
        await one.subscribe(f"b{tag}.x", got, context=scope, queue=f"q{tag}")
        await two.subscribe(f"b{tag}.y", got, context=scope, queue=f"q{tag}")
        await raw.subscribe(f"_DLQ.a{tag}.y", dead)
        await raw.subscribe(f"_DLQ.b{tag}.y", dead)
        for group in ("a", "b"):
            signed = await keys["alice"].sign("alice", {"n": group}, topic=f"{group}{tag}.x")
            data = WIRE.encode(signed)
            await raw.broker.publish(f"{group}{tag}.x", data)
            await got.wait_for(1 if group == "a" else 2, timeout=10)
            await raw.broker.publish(f"{group}{tag}.y", data)
            await dead.wait_for(1 if group == "a" else 2, timeout=10)
        assert [md.headers[DLQ_REASON] for md in dead.metadata] == ["replayed_nonce", "replayed_nonce"]
        assert got.messages == [{"n": "a"}, {"n": "b"}]
    finally:
        for client in (raw, one, two, local):
            await client.close()
        for store in stores:
            await store.close()
        await delete_redis_keys(REDIS_URL, key_prefix=nonce_prefix)
