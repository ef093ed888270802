"""Replay protection across processes: the shared nonce store (real Redis on 127.0.0.1:6379).

Two service instances in one queue group, each with its own IATP (its own in-memory nonce
cache, as two processes have), on the in-memory broker, which hands a queue group's messages
out round-robin: a signed request replayed to the second instance is refused when both claim
nonces in Redis, and accepted without it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from typing import Any

import pytest

from agent_os.amb import AMB, Envelope, Metadata, MsgpackSerializer, new_id
from agent_os.iatp import (
    IATP,
    REPLAY_SCOPE,
    IATPConfigError,
    IATPMiddleware,
    NonceStoreUnavailable,
    RedisNonceStore,
    SharedNonceStore,
    SignatureRejected,
)
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.servers import REDIS_URL
from tests.support.tcp_gate import TcpGate

redis_asyncio = pytest.importorskip("redis.asyncio")


async def sender_and_instances(count: int = 2) -> tuple[IATP, list[IATP]]:
    sender = IATP()
    await sender.register_agent("coordinator")
    instances = []
    for _ in range(count):
        instance = IATP()  # one per process: each has its own in-memory nonce cache
        await instance.add_identity(sender.identity("coordinator"))
        instances.append(instance)
    return sender, instances


async def replay_across_a_queue_group(stores: list[SharedNonceStore | None]) -> dict[str, Any]:
    """Send one signed request and its replay to a two-instance queue group; report who did what."""
    sender, instances = await sender_and_instances()
    url = f"memory://iatp-nonce-{uuid.uuid4().hex}"
    subject = f"svc{uuid.uuid4().hex[:8]}.work"
    middlewares = [IATPMiddleware(i, nonce_store=s) for i, s in zip(instances, stores, strict=True)]
    clients = [AMB("memory", url, agent_id="service", middleware=[m]) for m in middlewares]
    raw = AMB("memory", url, agent_id="raw")
    handled, dead = Collector(), Collector()
    try:
        for client in clients:
            await client.subscribe(subject, handled, queue="workers")
        await raw.subscribe(f"_DLQ.{subject}", dead)
        await raw.connect()
        request = await sender.sign("coordinator", {"transfer": 100}, topic=subject)
        data = MsgpackSerializer().encode(request)
        await raw.broker.publish(subject, data)  # the original: to the first instance
        await handled.wait_for(1)
        await raw.broker.publish(subject, data)  # the captured copy, replayed: to the second
        await wait_until(
            lambda: sum(m.verified + sum(m.rejected.values()) for m in middlewares) == 2,
            what="both deliveries checked",
        )
        return {
            "handled": list(handled.messages),
            "per_instance": [(m.verified, dict(m.rejected)) for m in middlewares],
            "dead": dead,
        }
    finally:
        for client in [*clients, raw]:
            await client.close()


@pytest.mark.redis
async def test_without_a_shared_store_a_replay_to_another_instance_is_accepted() -> None:
    """The gap the store closes: each process's cache only knows what it saw itself."""
    outcome = await replay_across_a_queue_group([None, None])
    assert outcome["handled"] == [{"transfer": 100}, {"transfer": 100}]
    assert outcome["per_instance"] == [(1, {}), (1, {})]


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_a_replay_to_another_instance_of_the_queue_group_is_refused(prefix: str) -> None:
    stores = [RedisNonceStore(REDIS_URL, prefix=prefix) for _ in range(2)]
    try:
        outcome = await replay_across_a_queue_group(list(stores))
    finally:
        for store in stores:
            await store.close()
    assert outcome["handled"] == [{"transfer": 100}]
    assert outcome["per_instance"] == [(1, {}), (0, {"replayed_nonce": 1})]
    await outcome["dead"].wait_for(1)
    assert outcome["dead"].metadata[0].headers["dlq-reason"] == "replayed_nonce"
    client = redis_asyncio.Redis.from_url(REDIS_URL)
    try:
        (key,) = [k async for k in client.scan_iter(match=prefix + "*")]
        assert key.decode().startswith(f"{prefix}workers@")
        ttl_ms = await client.pttl(key)
        assert 0 < ttl_ms <= 330_000  # the nonce's window: max_age (300 s) + clock skew (30 s)
    finally:
        await client.aclose()


def delivery(env: Envelope, attempt: int = 1, scope: str | None = None) -> Metadata:
    """The metadata of a delivery of ``env``, in the replay scope ``scope`` (None: a plain one)."""
    meta = Metadata(env, env.topic, attempt, {})
    if scope is not None:
        meta.context[REPLAY_SCOPE] = scope
    return meta


async def consume(middleware: IATPMiddleware, env: Envelope, meta: Metadata) -> bool:
    handled: list[Envelope] = []

    async def call_next(envelope: Envelope, metadata: Metadata) -> None:
        handled.append(envelope)

    await middleware.on_consume(env, meta, call_next)
    return bool(handled)


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_replay_scope_redelivery_and_plain_subscriptions(prefix: str) -> None:
    sender, (one, two, three) = await sender_and_instances(3)
    store = RedisNonceStore(REDIS_URL, prefix=prefix)
    first, second = one.middleware(nonce_store=store), IATPMiddleware(two, nonce_store=store)
    third = IATPMiddleware(three, nonce_store=store)
    try:
        env = await sender.sign("coordinator", "x", topic="svc.a")
        assert await consume(first, env, delivery(env, scope="ledger"))
        with pytest.raises(SignatureRejected) as caught:
            await consume(second, env, delivery(env, scope="ledger"))
        assert caught.value.reason == "replayed_nonce"
        assert caught.value.result.detail == "shared nonce store"
        # a broker redelivery (attempt 2) is not a replay, in the store as in the local cache
        assert await consume(second, env, delivery(env, attempt=2, scope="ledger"))
        # another scope is another consumer (a third process: the second's own cache has it)
        assert await consume(third, env, delivery(env, scope="audit"))
        # a plain subscription (no queue group, no scope) relies on its local cache alone
        plain = await sender.sign("coordinator", "y", topic="svc.a")
        assert await consume(first, plain, delivery(plain))
        client = redis_asyncio.Redis.from_url(REDIS_URL)
        try:
            keys = sorted(
                [k.decode()[len(prefix) :].split(":")[0] async for k in client.scan_iter(prefix + "*")]
            )
        finally:
            await client.aclose()
        assert keys == ["audit", "ledger"]
    finally:
        await store.close()


async def test_an_unreachable_store_rejects_and_counts_never_accepts() -> None:
    sender, _ = await sender_and_instances(1)
    store = RedisNonceStore("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens there
    iatp_with_store = IATP(nonce_store=store)
    await iatp_with_store.add_identity(sender.identity("coordinator"))
    middleware = iatp_with_store.middleware()
    assert middleware.nonce_store is store
    try:
        env = await sender.sign("coordinator", "x", topic="svc.a")
        with pytest.raises(SignatureRejected) as caught:
            await consume(middleware, env, delivery(env, scope="svc"))
        assert caught.value.reason == "nonce_store_unavailable"
        assert middleware.rejected == {"nonce_store_unavailable": 1}
        assert middleware.verified == 0
        assert store.failures == 1
        # a plain subscription never asks the store
        plain = await sender.sign("coordinator", "y", topic="svc.a")
        assert await consume(middleware, plain, delivery(plain))
    finally:
        await store.close()


def test_a_nonce_store_must_be_one() -> None:
    with pytest.raises(IATPConfigError):
        IATP(nonce_store=object())  # type: ignore[arg-type]
    with pytest.raises(IATPConfigError):
        RedisNonceStore(timeout=0)


@pytest.mark.usefixtures("redis_keys")
async def test_claims_beyond_a_batch_wait_for_the_next_one_instead_of_failing(prefix: str) -> None:
    """More claims in flight than one round trip carries: every one is answered (first
    claims True, repeats False), none rejected as unavailable."""
    store = RedisNonceStore(REDIS_URL, prefix=prefix, max_batch=4, timeout=5.0)
    nonces = [uuid.uuid4().bytes for _ in range(300)]
    try:
        first = await asyncio.gather(*(store.claim("scope", n, 60_000) for n in nonces))
        again = await asyncio.gather(*(store.claim("scope", n, 60_000) for n in nonces))
    finally:
        await store.close()
    assert first == [True] * 300
    assert again == [False] * 300
    assert store.failures == 0
    with pytest.raises(IATPConfigError):
        RedisNonceStore(REDIS_URL, max_batch=0)


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_claims_in_flight_together_share_round_trips_and_each_gets_its_answer(prefix: str) -> None:
    store = RedisNonceStore(REDIS_URL, prefix=prefix)
    nonces = [uuid.uuid4().bytes for _ in range(200)]
    try:
        mixed = nonces[:100] + nonces[:50]  # the second 50 repeat claims made in the same batch
        answers = await asyncio.gather(*(store.claim("scope", n, 60_000) for n in mixed))
        assert answers == [True] * 100 + [False] * 50
        assert store.round_trips <= 2  # the first claim alone, then the rest together
        one_by_one = [await store.claim("scope", n, 60_000) for n in nonces[100:110]]
        assert one_by_one == [True] * 10
        assert store.failures == 0
    finally:
        await store.close()


async def batched_group(
    stores: list[RedisNonceStore], count: int
) -> tuple[list[IATPMiddleware], Collector, Collector, str, list[bytes], AMB, list[AMB]]:
    """Two instances of a queue group with ``concurrency`` (claims in flight together), their
    subject and ``count`` signed messages for it; the caller closes the clients."""
    sender, instances = await sender_and_instances(2)
    url = f"memory://iatp-batch-{uuid.uuid4().hex}"
    subject = f"svc{uuid.uuid4().hex[:8]}.work"
    middlewares = [IATPMiddleware(i, nonce_store=s) for i, s in zip(instances, stores, strict=True)]
    clients = [AMB("memory", url, agent_id="service", middleware=[m]) for m in middlewares]
    raw = AMB("memory", url, agent_id="raw")
    handled, dead = Collector(), Collector()
    for client in clients:
        await client.subscribe(subject, handled, queue="workers", concurrency=32)
    await raw.subscribe(f"_DLQ.{subject}", dead)
    await raw.connect()
    codec = MsgpackSerializer()
    data = [codec.encode(await sender.sign("coordinator", {"n": n}, topic=subject)) for n in range(count)]
    return middlewares, handled, dead, subject, data, raw, clients


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_batched_replays_across_the_group_are_all_refused(prefix: str) -> None:
    """Originals and replays claimed in batches: every replay reaches the instance that did
    not see its original (the round robin shifted by one message) and is refused by the store."""
    stores = [RedisNonceStore(REDIS_URL, prefix=prefix) for _ in range(2)]
    middlewares, handled, dead, subject, data, raw, clients = await batched_group(stores, 61)
    try:
        for item in data:  # 60 originals, then one more: the replays go to the other instance
            await raw.broker.publish(subject, item)
        await handled.wait_for(61)
        for item in data[:60]:
            await raw.broker.publish(subject, item)
        await dead.wait_for(60)
        assert sorted(m["n"] for m in handled.messages) == list(range(61))
        assert [dict(m.rejected) for m in middlewares] == [{"replayed_nonce": 30}] * 2
        assert {m.headers["dlq-reason"] for m in dead.metadata} == {"replayed_nonce"}
        assert sum(s.round_trips for s in stores) < 120  # claims went together
    finally:
        for client in [*clients, raw]:
            await client.close()
        for store in stores:
            await store.close()


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_a_redis_outage_mid_batch_refuses_every_message_then_the_store_reconnects(
    prefix: str,
) -> None:
    host, port = REDIS_URL.removeprefix("redis://").split("/")[0].split(":")
    async with TcpGate(host, int(port)) as gate:
        store = RedisNonceStore(f"redis://{gate.address}/0", prefix=prefix, timeout=5.0)
        spare = RedisNonceStore(REDIS_URL, prefix=prefix)
        middlewares, handled, dead, subject, data, raw, clients = await batched_group([store, spare], 11)
        try:
            await clients[1].close()  # one instance: every message claims through the gate
            assert await store.claim("warm-up", os.urandom(16), 60_000)  # the connection is open
            warm = gate.received.count(prefix.encode())

            def sent() -> int:  # the claims' keys Redis got since the warm-up
                return gate.received.count(prefix.encode()) - warm

            gate.hold()  # Redis gets the claims; its answers are kept back
            for item in data[:10]:
                await raw.broker.publish(subject, item)
            # every claim sent (in the batch out) or waiting for the next round trip
            await wait_until(lambda: sent() + store.waiting == 10)
            assert sent() >= 2
            gate.cut()  # the outage: the round trip out fails, and so does the next
            await dead.wait_for(10)
            assert handled.messages == []
            assert middlewares[0].rejected == {"nonce_store_unavailable": 10}
            assert {m.headers["dlq-reason"] for m in dead.metadata} == {"nonce_store_unavailable"}
            assert store.failures == 10
            gate.restore()  # Redis is back: the next claim connects again and is answered
            await raw.broker.publish(subject, data[10])
            await handled.wait_for(1)
            assert handled.messages == [{"n": 10}]
        finally:
            for client in [*clients, raw]:
                await client.close()
            await store.close()
            await spare.close()


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_an_ordered_consumer_claims_ahead_in_shared_round_trips_and_keeps_the_order(
    prefix: str, closing: Closing
) -> None:
    """``concurrency=1`` with the store: while Redis is slow to answer, the messages behind the
    first are verified and their claims wait to go together (at most the look-ahead, 64); handlers
    still run one at a time in arrival order, and a message another instance claimed first is
    refused and dead-lettered in its turn."""
    sender, (instance,) = await sender_and_instances(1)
    host, port = REDIS_URL.removeprefix("redis://").split("/")[0].split(":")
    other = closing(RedisNonceStore(REDIS_URL, prefix=prefix))
    url = f"memory://iatp-ahead-{uuid.uuid4().hex}"
    subject = f"svc{uuid.uuid4().hex[:8]}.work"
    raw = closing(AMB("memory", url, agent_id="raw"))
    handled, dead, running = Collector(), Collector(), [0, 0]

    async def handler(message: Any, metadata: Metadata) -> None:
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(0)  # let the messages behind it run ahead meanwhile
        running[0] -= 1
        await handled(message, metadata)

    codec = MsgpackSerializer()
    envelopes = [await sender.sign("coordinator", {"n": n}, topic=subject) for n in range(300)]
    seen_elsewhere = {1, 40, 41, 150, 299}  # claimed by another instance of the group first
    tampered = envelopes[100]
    tampered.payload = {"n": 100, "extra": "changed after signing"}  # refused before any claim
    async with TcpGate(host, int(port)) as gate:
        store = closing(RedisNonceStore(f"redis://{gate.address}/0", prefix=prefix, timeout=10.0))
        middleware = IATPMiddleware(instance, nonce_store=store)
        client = closing(AMB("memory", url, agent_id="service", middleware=[middleware]))
        sub = await client.subscribe(subject, handler, queue="workers")
        assert sub.lookahead == 64
        await raw.subscribe(f"_DLQ.{subject}", dead)
        await raw.connect()
        for n in sorted(seen_elsewhere):
            sig = envelopes[n].sig
            assert sig is not None
            assert await other.claim(f"workers@{subject}", sig.nonce, 60_000)
        assert await store.claim("warm-up", os.urandom(16), 60_000)  # the connection is open
        warm = gate.received.count(prefix.encode())

        def sent() -> int:  # the claims' keys Redis got since the warm-up
            return gate.received.count(prefix.encode()) - warm

        gate.hold()
        for env in envelopes:
            await raw.broker.publish(subject, codec.encode(env))
        # The first message waits for its claim's answer in its turn; 64 behind it are
        # verified and their claims sent or waiting for the next round trip, none further.
        await wait_until(lambda: sent() + store.waiting == 65, what="65 claims made")
        for _ in range(20):
            await asyncio.sleep(0)
        assert sent() + store.waiting == 65
        assert store.round_trips == 2  # the warm-up, then the one out
        gate.restore()
        await handled.wait_for(294)
        await dead.wait_for(6)
        expected = [n for n in range(300) if n not in seen_elsewhere and n != 100]
        assert [m["n"] for m in handled.messages] == expected
        assert running[1] == 1
        refused = [
            (codec.decode(m).payload["n"], meta.headers["dlq-reason"])
            for m, meta in zip(dead.messages, dead.metadata, strict=True)
        ]
        assert refused == sorted([(n, "replayed_nonce") for n in seen_elsewhere] + [(100, "bad_signature")])
        assert middleware.rejected == {"replayed_nonce": 5, "bad_signature": 1}  # each counted once
        assert middleware.verified == 294
        assert store.round_trips < 100  # 300 without looking ahead: one per message
        tampered_sig = tampered.sig
        assert tampered_sig is not None
        checker = redis_asyncio.Redis.from_url(REDIS_URL)
        try:  # the tampered message's nonce was never claimed; the others' were
            assert not await checker.exists(f"{prefix}workers@{subject}:{tampered_sig.nonce.hex()}")
            assert len([k async for k in checker.scan_iter(match=f"{prefix}workers@*")]) == 299
        finally:
            await checker.aclose()
        await client.close()  # before the gate goes (the fixture closes it on failure)
        await store.close()


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_two_verifying_middlewares_on_one_chain_each_keep_their_own_verdict(
    prefix: str, closing: Closing
) -> None:
    """An outer middleware that refuses unsigned messages and an inner one that accepts them,
    both looking ahead: each takes only what it prepared itself, so the outer refuses."""
    store = closing(RedisNonceStore(REDIS_URL, prefix=prefix))
    outer = IATPMiddleware(IATP(), nonce_store=store)
    inner = IATPMiddleware(IATP(), nonce_store=store, accept_unsigned=True)
    await outer.iatp.open()
    await inner.iatp.open()
    url = f"memory://iatp-two-{uuid.uuid4().hex}"
    client = closing(AMB("memory", url, middleware=[outer, inner]))
    raw = closing(AMB("memory", url))
    handled, dead = Collector(), Collector()
    await client.subscribe("u.x", handled, queue="g")
    await raw.subscribe("_DLQ.u.x", dead)
    await raw.connect()
    unsigned = Envelope(new_id(), "u.x", "mallory", "unsigned!", None, timestamp=time.time_ns())
    await raw.broker.publish("u.x", MsgpackSerializer().encode(unsigned))
    await dead.wait_for(1)
    assert dead.metadata[0].headers["dlq-reason"] == "unsigned"
    assert handled.messages == []
    assert (dict(outer.rejected), inner.accepted_unsigned) == ({"unsigned": 1}, 0)  # counted in turn


async def test_a_closed_store_refuses_every_later_claim_without_reconnecting() -> None:
    store = RedisNonceStore(REDIS_URL, prefix=f"closed{uuid.uuid4().hex[:8]}:")
    assert await store.claim("s", os.urandom(16), 60_000)
    await store.close()
    with pytest.raises(NonceStoreUnavailable, match="closed"):
        await store.claim("s", os.urandom(16), 60_000)
    assert store._client is None  # nothing was opened again
    assert store.failures == 1


class ClaimOnly:
    """A store with ``claim`` alone (no ``start_claim``) that is down."""

    def __init__(self) -> None:
        self.calls = 0

    async def claim(self, scope: str, nonce: bytes, ttl_ms: int) -> bool:
        self.calls += 1
        raise NonceStoreUnavailable("down")

    async def close(self) -> None:
        return None


async def test_claims_of_messages_dropped_before_their_turn_log_nothing(
    closing: Closing, caplog: pytest.LogCaptureFixture
) -> None:
    sender, (instance,) = await sender_and_instances(1)
    store = ClaimOnly()
    url = f"memory://iatp-drop-{uuid.uuid4().hex}"
    client = closing(AMB("memory", url, middleware=[IATPMiddleware(instance, nonce_store=store)]))
    raw = closing(AMB("memory", url))
    release = asyncio.Event()

    async def handler(message: Any, metadata: Metadata) -> None:
        await release.wait()

    sub = await client.subscribe("d.x", handler, queue="g")
    await raw.connect()
    codec = MsgpackSerializer()
    for n in range(5):
        await raw.broker.publish("d.x", codec.encode(await sender.sign("coordinator", n, topic="d.x")))
    await wait_until(lambda: store.calls == 5, what="every claim started")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        unsubscribing = asyncio.ensure_future(sub.unsubscribe())  # drops the four waiting
        release.set()
        await unsubscribing
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.redis
async def test_claims_of_messages_dropped_before_their_turn_are_given_back(
    prefix: str, closing: Closing
) -> None:
    """A member that claimed messages ahead and then stops without handling them gives their
    claims back, so the group's next member takes them even when the broker hands them over as
    first deliveries (Kafka after a rebalance); the message stuck in its turn keeps its claim."""
    sender, (first, second) = await sender_and_instances(2)
    store = closing(RedisNonceStore(REDIS_URL, prefix=prefix))
    url = f"memory://iatp-release-{uuid.uuid4().hex}"
    a = closing(AMB("memory", url, middleware=[IATPMiddleware(first, nonce_store=store)]))
    b = closing(AMB("memory", url, middleware=[IATPMiddleware(second, nonce_store=store)]))
    raw = closing(AMB("memory", url))
    handled_by_b, dead = Collector(), Collector()

    async def stuck(message: Any, metadata: Metadata) -> None:
        await asyncio.Event().wait()

    sub = await a.subscribe("k.x", stuck, queue="g")
    await raw.subscribe("_DLQ.k.x", dead)
    await raw.connect()
    codec = MsgpackSerializer()
    data = [codec.encode(await sender.sign("coordinator", n, topic="k.x")) for n in range(6)]
    for item in data:
        await raw.broker.publish("k.x", item)
    async with redis_asyncio.Redis.from_url(REDIS_URL) as checker:
        keys = []
        for item in data:
            sig = codec.decode(item).sig
            assert sig is not None
            keys.append(f"{prefix}g@k.x:{sig.nonce.hex()}")

        async def claimed(count: int) -> bool:
            return int(await checker.exists(*keys)) == count

        await wait_until(lambda: claimed(6), what="six claims")
        await sub.drain(0.2)  # message 0 is stuck in its turn (cancelled); 1..5 never had theirs
        await wait_until(lambda: claimed(1), what="five claims given back")
        assert await checker.exists(keys[0])
        await b.subscribe("k.x", handled_by_b, queue="g")
        for item in data:  # handed to the next member as first deliveries
            await raw.broker.publish("k.x", item)
        await handled_by_b.wait_for(5)
        await dead.wait_for(1)
        assert handled_by_b.messages == [1, 2, 3, 4, 5]
        assert codec.decode(dead.messages[0]).payload == 0  # its claim stands: refused as a replay
        assert dead.metadata[0].headers["dlq-reason"] == "replayed_nonce"
