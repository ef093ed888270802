"""Coalescing of shared nonce claims (``agent_os.iatp.noncebatch``) against a scripted round trip,
and the store's checks of Redis's answers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agent_os.iatp import (
    IATPConfigError,
    NonceStoreUnavailable,
    RedisNonceStore,
)
from agent_os.iatp.noncebatch import ClaimBatcher
from tests.support import wait_until


class ScriptedRedis:
    """A round trip that remembers keys like ``SET NX`` and holds each batch until released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.seen: set[bytes] = set()
        self.batches: list[list[bytes]] = []
        self.hold = hold
        self.release = asyncio.Event()
        self.fail_next: Exception | None = None
        self.short_answer = False

    async def send(self, keys: Sequence[bytes], ttls: Sequence[int]) -> list[bool]:
        self.batches.append(list(keys))
        if self.hold:
            await self.release.wait()
            self.release.clear()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        answers = []
        for key in keys:
            answers.append(key not in self.seen)
            self.seen.add(key)
        return answers[:-1] if self.short_answer else answers


async def test_claims_made_while_a_round_trip_is_out_go_together_in_the_next() -> None:
    redis = ScriptedRedis(hold=True)
    batcher = ClaimBatcher(redis.send, timeout=5.0)
    first = asyncio.ensure_future(batcher.claim(b"a", 1000))
    # the first round trip starts with the first claim alone
    await wait_until(lambda: len(redis.batches) >= 1)
    assert redis.batches == [[b"a"]]
    rest = [asyncio.ensure_future(batcher.claim(k, 1000)) for k in (b"b", b"a", b"c")]
    await asyncio.sleep(0)  # one loop turn: the claims are queued, not sent
    assert redis.batches == [[b"a"]]  # waiting for the one out
    redis.release.set()
    assert await first is True
    await wait_until(lambda: len(redis.batches) >= 2)
    assert redis.batches == [[b"a"], [b"b", b"a", b"c"]]
    redis.release.set()
    # each claim gets its own answer, in its batch's order: "a" again is a replay
    assert await asyncio.gather(*rest) == [True, False, True]
    assert batcher.batches == 2


async def test_claims_in_one_loop_turn_share_the_first_round_trip_and_max_batch_splits() -> None:
    redis = ScriptedRedis()
    batcher = ClaimBatcher(redis.send, timeout=5.0, max_batch=3)
    keys = [bytes([i]) for i in range(7)]
    assert await asyncio.gather(*(batcher.claim(k, 10) for k in keys)) == [True] * 7
    assert [len(b) for b in redis.batches] == [3, 3, 1]
    assert await asyncio.gather(*(batcher.claim(k, 10) for k in keys)) == [False] * 7
    with pytest.raises(ValueError, match="max_batch"):
        ClaimBatcher(redis.send, timeout=1.0, max_batch=0)


async def test_a_failed_round_trip_fails_every_claim_in_it_and_no_other() -> None:
    redis = ScriptedRedis(hold=True)
    batcher = ClaimBatcher(redis.send, timeout=5.0)
    first = asyncio.ensure_future(batcher.claim(b"x", 10))
    await wait_until(lambda: len(redis.batches) >= 1)
    batch = [asyncio.ensure_future(batcher.claim(k, 10)) for k in (b"p", b"q", b"r")]
    redis.release.set()
    assert await first is True
    await wait_until(lambda: len(redis.batches) >= 2)
    redis.fail_next = ConnectionResetError("gone")
    redis.release.set()
    outcomes = await asyncio.gather(*batch, return_exceptions=True)
    assert [type(o) for o in outcomes] == [ConnectionResetError] * 3
    redis.hold = False
    assert await batcher.claim(b"p", 10) is True  # the next round trip is answered again


async def test_a_wrong_number_of_answers_fails_the_batch() -> None:
    redis = ScriptedRedis()
    redis.short_answer = True
    batcher = ClaimBatcher(redis.send, timeout=5.0)
    outcomes = await asyncio.gather(batcher.claim(b"a", 1), batcher.claim(b"b", 1), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_a_round_trip_beyond_the_timeout_fails_its_claims() -> None:
    redis = ScriptedRedis(hold=True)  # never released
    batcher = ClaimBatcher(redis.send, timeout=0.05)
    outcomes = await asyncio.gather(batcher.claim(b"a", 1), batcher.claim(b"b", 1), return_exceptions=True)
    assert [type(o) for o in outcomes] == [TimeoutError, TimeoutError]
    await batcher.aclose()


async def test_a_cancelled_claimer_leaves_the_others_answered() -> None:
    redis = ScriptedRedis(hold=True)
    batcher = ClaimBatcher(redis.send, timeout=5.0)
    gone = asyncio.ensure_future(batcher.claim(b"a", 1))
    kept = asyncio.ensure_future(batcher.claim(b"b", 1))
    await wait_until(lambda: len(redis.batches) >= 1)
    gone.cancel()
    redis.release.set()
    assert await kept is True
    assert gone.cancelled()
    assert redis.seen == {b"a", b"b"}  # sent: the key is claimed, its answer dropped


async def test_closing_fails_the_claims_not_answered() -> None:
    redis = ScriptedRedis(hold=True)
    batcher = ClaimBatcher(redis.send, timeout=5.0)
    out = asyncio.ensure_future(batcher.claim(b"a", 1))
    await wait_until(lambda: len(redis.batches) >= 1)
    queued = asyncio.ensure_future(batcher.claim(b"b", 1))
    await asyncio.sleep(0)
    await batcher.aclose()
    outcomes = await asyncio.gather(out, queued, return_exceptions=True)
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]


async def test_the_store_turns_any_failure_into_nonce_store_unavailable_and_counts_it() -> None:
    store = RedisNonceStore("redis://redis.invalid:6379/0")
    redis = ScriptedRedis()
    store._batcher.send = redis.send
    try:
        assert await store.claim("s", b"\x01" * 16, 5) is True
        assert await store.claim("s", b"\x01" * 16, 5) is False
        assert redis.batches == [[b"iatp:nonce:s:" + b"01" * 16]] * 2
        redis.fail_next = OSError("refused")
        with pytest.raises(NonceStoreUnavailable):
            await store.claim("s", b"\x02" * 16, 5)
        assert store.failures == 1
        assert store.round_trips == 3
    finally:
        await store.close()


def test_bad_options_of_the_store_are_refused() -> None:
    for options in ({"max_batch": 0}, {"timeout": 0}):
        with pytest.raises(IATPConfigError):
            RedisNonceStore("redis://h", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("answers", [b"1", b"101", b"1x", b"10\n", [1, 0], "OK", None, 10])
async def test_an_answer_that_is_not_one_flag_per_claim_fails_the_round_trip(answers: object) -> None:
    store = RedisNonceStore("redis://redis.invalid:6379/0")

    async def script(*, keys: Sequence[bytes], args: Sequence[int]) -> object:
        return answers

    store._script = script
    try:
        with pytest.raises(NonceStoreUnavailable, match="answered"):
            await store._send([b"a", b"b"], [5, 5])
        store._script = lambda *, keys, args: asyncio.sleep(0, b"10")
        assert await store._send([b"a", b"b"], [5, 5]) == [True, False]
        store._script = lambda *, keys, args: asyncio.sleep(0, "01")  # decode_responses=True
        assert await store._send([b"a", b"b"], [5, 5]) == [False, True]
    finally:
        await store.close()
