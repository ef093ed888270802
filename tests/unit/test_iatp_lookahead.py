"""The IATP middleware's look-ahead: where it asks for it, and that what it prepared is taken
only for the very envelope it prepared (a forged context entry verifies nothing)."""

from __future__ import annotations

import copy
import uuid

import pytest

from agent_os.amb import AMB, Envelope, Metadata
from agent_os.amb.subscription import Subscription, SubscriptionOptions
from agent_os.iatp import (
    IATP,
    REPLAY_SCOPE,
    IATPConfigError,
    IATPMiddleware,
    RedisNonceStore,
    SignatureRejected,
)


async def _handler(message: object, metadata: object) -> None:
    return None


async def test_the_middleware_looks_ahead_only_where_it_claims_in_the_store() -> None:
    iatp = IATP()
    store = RedisNonceStore("redis://redis.invalid:6379/0")
    client = AMB("memory", f"memory://ahead-{uuid.uuid4().hex}")
    try:
        queued = Subscription(client, "a.b", _handler, SubscriptionOptions(queue="workers"))
        scoped = Subscription(client, "a.b", _handler, SubscriptionOptions(context={REPLAY_SCOPE: "s"}))
        plain = Subscription(client, "a.b", _handler, SubscriptionOptions())
        with_store = IATPMiddleware(iatp, nonce_store=store)
        assert [with_store.lookahead(s) for s in (queued, scoped, plain)] == [64, 64, 0]
        assert IATPMiddleware(iatp, nonce_store=store, lookahead=8).lookahead(queued) == 8
        assert IATPMiddleware(iatp).lookahead(queued) == 0  # the local cache alone: nothing to wait for
        for bad in (-1, True, 2.5, "8"):
            with pytest.raises(IATPConfigError, match="lookahead"):
                IATPMiddleware(iatp, nonce_store=store, lookahead=bad)  # type: ignore[arg-type]
    finally:
        await store.close()
        await client.close()


async def test_a_prepared_verdict_counts_only_for_the_envelope_it_was_made_for() -> None:
    sender, receiver = IATP(), IATP()
    await sender.register_agent("alice")
    await receiver.add_identity(sender.identity("alice"))
    middleware = receiver.middleware()
    genuine = await sender.sign("alice", {"amount": 1}, topic="pay.x")
    forged = copy.copy(genuine)
    forged.payload = {"amount": 1_000}
    handled: list[Envelope] = []

    async def call_next(envelope: Envelope, metadata: Metadata) -> None:
        handled.append(envelope)

    # A verdict prepared for the genuine envelope (or planted in the context by configuration)
    # does not vouch for another envelope object: the forged one is verified in full.
    meta = Metadata(forged, forged.topic, 1, {})
    middleware.prepare(genuine, meta)
    key = middleware._ahead_key
    meta.context[key] = (genuine, *meta.context[key][1:])
    with pytest.raises(SignatureRejected) as caught:
        await middleware.on_consume(forged, meta, call_next)
    assert caught.value.reason == "bad_signature"
    assert handled == []
    # a genuine one, prepared, is taken in its turn (verifying it again would find its nonce
    # used: the local cache remembered it when it was prepared)
    another = await sender.sign("alice", {"amount": 2}, topic="pay.x")
    meta = Metadata(another, another.topic, 1, {})
    middleware.prepare(another, meta)
    verified = middleware.verified
    await middleware.on_consume(another, meta, call_next)
    assert handled == [another]
    assert middleware.verified == verified + 1
    assert key not in meta.context
