"""Verification: every reason, the result's shape, keys over their lifecycle, hostile input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_os.amb import Envelope, MsgpackSerializer, Signature, new_id
from agent_os.iatp import (
    IATP,
    AgentExists,
    IATPConfigError,
    Reason,
    UnknownAgent,
    VerificationResult,
)
from agent_os.iatp.replay import BELOW_FLOOR, OK, REPLAYED, NonceCache

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * S)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def iatp(clock: Clock) -> IATP:
    iatp = IATP(clock=clock, clock_skew=30, max_age=300)
    await iatp.register_agent("alice", {"role": "producer"})
    await iatp.register_agent("bob")
    return iatp


async def signed(iatp: IATP, sender: str = "alice", **kw: Any) -> Envelope:
    return await iatp.sign(sender, {"action": "process", "n": 1}, recipient_id="bob", **kw)


async def test_a_signed_message_verifies_with_the_seed_shape(iatp: IATP) -> None:
    result = await iatp.verify(await signed(iatp))
    assert result.valid
    assert bool(result)
    assert result.sender == "alice"
    assert result.reason is None
    assert result.key_id == iatp.identity("alice").key_id
    assert set(result.to_dict()) == {"valid", "sender", "timestamp", "trust_level", "reason"}
    assert result["valid"] is True
    timestamp = result["timestamp"]
    assert isinstance(timestamp, str)
    assert timestamp.endswith("Z")
    assert dict(result) == result.to_dict()


async def test_a_result_is_an_immutable_mapping_that_pickles(iatp: IATP) -> None:
    import copy
    import pickle

    result = await iatp.verify(await signed(iatp))
    with pytest.raises(AttributeError):
        result.valid = False  # type: ignore[misc]
    assert list(result) == ["valid", "sender", "timestamp", "trust_level", "reason"]
    assert len(result) == 5
    assert "sender" in result
    assert "key_id" not in result
    assert result == result.to_dict()
    assert not result != result.to_dict()  # noqa: SIM202 (the tuple's != must not leak through)
    assert result.get("sender") == "alice"
    assert result.get("detail") is None
    with pytest.raises(KeyError):
        result[0]
    with pytest.raises(TypeError):
        hash(result)
    for clone in (pickle.loads(pickle.dumps(result)), copy.copy(result), copy.deepcopy(result)):
        assert clone == result
        assert (clone.key_id, clone.timestamp_ns) == (result.key_id, result.timestamp_ns)
    assert not result._replace(valid=False)


async def test_an_invalid_result_is_falsy_and_carries_a_reason(iatp: IATP) -> None:
    env = await signed(iatp)
    env.payload = {"action": "delete everything"}
    result = await iatp.verify(env)
    assert not result
    assert result.reason == Reason.BAD_SIGNATURE
    assert result.trust_level == 0.0


async def test_verify_accepts_serialized_bytes_and_reports_garbage(iatp: IATP) -> None:
    env = await signed(iatp)
    assert (await iatp.verify(MsgpackSerializer().encode(env))).valid
    assert (await iatp.verify(b"\x93garbage")).reason == Reason.MALFORMED_ENVELOPE


async def test_identity_holds_public_key_and_metadata(iatp: IATP) -> None:
    ident = iatp.identity("alice")
    assert ident.metadata == {"role": "producer"}
    assert len(ident.public_key) == 44  # base64 of 32 bytes
    with pytest.raises(AgentExists):
        await iatp.register_agent("alice")
    with pytest.raises(UnknownAgent):
        iatp.identity("nobody")


async def test_forged_signature_by_another_key_fails(iatp: IATP) -> None:
    env = await signed(iatp)
    assert env.sig is not None
    forged = await signed(iatp, sender="bob")
    assert forged.sig is not None
    # bob's valid signature value, presented under alice's key id
    env.sig = msgspec.structs.replace(env.sig, value=forged.sig.value)
    assert (await iatp.verify(env)).reason == Reason.BAD_SIGNATURE


async def test_claiming_another_senders_key_fails(iatp: IATP) -> None:
    env = await signed(iatp, sender="bob")
    env.sender = "alice"  # bob's key id does not belong to alice
    assert (await iatp.verify(env)).reason == Reason.UNKNOWN_KEY


async def test_unknown_sender_and_unknown_key(iatp: IATP) -> None:
    other = IATP()
    await other.register_agent("mallory")
    await other.register_agent("alice")
    assert (await iatp.verify(await other.sign("mallory", "hi"))).reason == Reason.UNKNOWN_SENDER
    assert (await iatp.verify(await other.sign("alice", "hi"))).reason == Reason.UNKNOWN_KEY


async def test_replayed_nonce_fails_within_the_window(iatp: IATP, clock: Clock) -> None:
    env = await signed(iatp)
    assert (await iatp.verify(env)).valid
    clock.advance(10)
    assert (await iatp.verify(env)).reason == Reason.REPLAYED
    # a redelivery by the broker (attempt > 1) is not a replay
    assert iatp.verify_envelope(env, redelivery=True).valid
    # another scope (another subscription) sees it for the first time
    assert iatp.verify_envelope(env, scope="other-subscription").valid


async def test_replay_after_the_window_is_refused_as_too_old(iatp: IATP, clock: Clock) -> None:
    env = await signed(iatp)
    assert (await iatp.verify(env)).valid
    clock.advance(301)
    assert (await iatp.verify(env)).reason == Reason.TOO_OLD


async def test_future_dated_and_expired_messages_fail(iatp: IATP, clock: Clock) -> None:
    clock.advance(31)
    future = await signed(iatp)
    clock.advance(-31)
    assert (await iatp.verify(future)).reason == Reason.CLOCK_SKEW
    clock.advance(29)
    # within the allowed skew a slightly future-dated message passes
    clock.advance(-29)
    clock.advance(29)
    ok = await signed(iatp)
    clock.advance(-29)
    assert (await iatp.verify(ok)).valid
    expiring = await signed(iatp, ttl=5)
    clock.advance(5)
    assert (await iatp.verify(expiring)).reason == Reason.EXPIRED


async def test_rotation_keeps_old_signatures_valid_until_retired(iatp: IATP, clock: Clock) -> None:
    old_key = iatp.identity("alice").key_id
    before = await signed(iatp)
    identity = await iatp.rotate_key("alice", grace=60)
    assert identity.key_id != old_key
    assert [k.version for k in identity.keys] == [1, 2]
    after = await signed(iatp)
    assert after.sig is not None
    assert after.sig.key_id == identity.key_id
    assert (await iatp.verify(before)).valid
    assert (await iatp.verify(after)).valid
    clock.advance(60)
    before2 = dataclasses.replace(before, id=new_id())
    assert (await iatp.verify(before2)).reason in (Reason.RETIRED_KEY, Reason.BAD_SIGNATURE)
    again = await signed(iatp)
    assert (await iatp.verify(again)).valid
    # an old-key message re-checked after retirement names the retirement
    iatp.verifier.nonces = NonceCache(iatp.verifier.nonces.max_age_ns)
    assert (await iatp.verify(before)).reason == Reason.RETIRED_KEY


async def test_explicit_retirement(iatp: IATP) -> None:
    old = await signed(iatp)
    await iatp.rotate_key("alice", grace=3600)
    assert old.sig is not None
    with pytest.raises(IATPConfigError):
        await iatp.retire_key(iatp.identity("alice").key_id)
    await iatp.retire_key(old.sig.key_id)
    assert (await iatp.verify(old)).reason == Reason.RETIRED_KEY


async def test_revocation_fails_from_the_revocation_time_on(iatp: IATP, clock: Clock) -> None:
    early = await signed(iatp)
    key_id = iatp.identity("alice").key_id
    await iatp.revoke_key(key_id, reason="compromised", at=(clock.now + 10 * S) / S)
    assert (await iatp.verify(early)).valid  # before the revocation time
    late = await signed(iatp)
    clock.advance(10.001)  # epoch seconds as a float are not ns-exact
    result = await iatp.verify(late)
    assert result.reason == Reason.REVOKED_KEY
    assert result.detail == "compromised"
    # the revoked current key cannot sign any more; rotation gives a new one
    with pytest.raises(UnknownAgent):
        await signed(iatp)
    await iatp.rotate_key("alice")
    assert (await iatp.verify(await signed(iatp))).valid


async def test_revoked_message_stamped_after_revocation_fails_even_if_checked_early(
    iatp: IATP, clock: Clock
) -> None:
    key_id = iatp.identity("alice").key_id
    clock.advance(20)
    stamped_late = await signed(iatp)
    clock.advance(-20)
    await iatp.revoke_key(key_id, at=(clock.now + 10 * S) / S)
    assert (await iatp.verify(stamped_late)).reason == Reason.REVOKED_KEY


async def test_imported_identity_verifies_and_imports_never_unrevoke(iatp: IATP) -> None:
    remote = IATP()
    await remote.register_agent("carol")
    await iatp.add_identity(remote.identity("carol"))
    env = await remote.sign("carol", "hello")
    assert (await iatp.verify(env)).valid
    await iatp.revoke_key(remote.identity("carol").key_id)
    await iatp.add_identity(remote.identity("carol").to_dict())  # stale copy without the revocation
    env2 = await remote.sign("carol", "again")
    assert (await iatp.verify(env2)).reason == Reason.REVOKED_KEY


async def test_sign_requires_a_local_key(iatp: IATP) -> None:
    remote = IATP()
    await remote.register_agent("carol")
    await iatp.add_identity(remote.identity("carol"))
    with pytest.raises(UnknownAgent):
        await iatp.sign("carol", "x")


def test_unsupported_options_are_refused() -> None:
    with pytest.raises(IATPConfigError):
        IATP(algorithm="rsa")
    with pytest.raises(IATPConfigError):
        IATP(key_storage="vault")
    with pytest.raises(IATPConfigError):
        IATP(trust_model="anarchy")
    with pytest.raises(IATPConfigError):
        IATP(key_storage="file")


async def test_trust_claims_in_the_message_do_not_raise_trust(iatp: IATP) -> None:
    env = await iatp.sign("alice", {"trust_level": 1.0}, recipient_id="bob", headers={"trust-level": "1.0"})
    assert (await iatp.verify(env)).trust_level == 0.0  # bob never trusted alice


# -- the nonce cache -----------------------------------------------------------------------------


def test_nonce_cache_bounds_entries_and_refuses_below_its_floor() -> None:
    cache = NonceCache(max_age_ns=1000, max_entries=3)
    assert [cache.check_and_add(i, 100 + i, 100) for i in range(3)] == [OK, OK, OK]
    assert cache.check_and_add(1, 101, 100) == REPLAYED
    assert cache.check_and_add(3, 103, 100) == OK  # evicts nonce 0 (stamped 100)
    assert len(cache) == 3
    assert cache.floor_ns == 100
    assert cache.check_and_add(0, 100, 100) == BELOW_FLOOR  # could be a replay: refused
    assert cache.check_and_add(9, 104, 100) == OK


def test_nonce_cache_forgets_after_the_window() -> None:
    cache = NonceCache(max_age_ns=1000)
    assert cache.check_and_add("n", 0, 0) == OK
    assert cache.check_and_add("n", 0, 999) == REPLAYED
    assert cache.check_and_add("n", 0, 1000) == REPLAYED  # the window's last instant
    assert cache.check_and_add("m", 1001, 1001) == OK
    assert not cache.seen("n")


def test_a_forgotten_nonce_stays_refused_when_the_clock_steps_back() -> None:
    cache = NonceCache(max_age_ns=1000)
    assert cache.check_and_add("n", 0, 0) == OK
    assert cache.check_and_add("m", 2000, 2000) == OK  # "n" is forgotten (its expiry 1000 passed)
    assert not cache.seen("n")
    # The wall clock steps back to 500: "n", stamped 0, is inside the window again.
    assert cache.check_and_add("n", 0, 500) == BELOW_FLOOR
    assert cache.floor_ns == 0
    assert cache.check_and_add("k", 1, 500) == OK  # stamped after what was forgotten


async def test_a_replay_after_the_clock_steps_back_is_refused(clock: Clock) -> None:
    iatp = IATP(clock=clock, clock_skew=0, max_age=300)
    await iatp.register_agent("alice")
    env = await iatp.sign("alice", "once")
    assert (await iatp.verify(env)).valid
    clock.now += 301 * 10**9  # the window has passed the message: its nonce can be forgotten
    assert (await iatp.verify(await iatp.sign("alice", "later"))).valid
    clock.now -= 301 * 10**9  # the wall clock steps back: the first message is in the window again
    result = await iatp.verify(env)
    assert not result.valid
    assert result.reason == "replay_window"


async def test_a_replay_at_the_last_instant_of_the_window_fails_without_clock_skew(clock: Clock) -> None:
    iatp = IATP(clock=clock, clock_skew=0, max_age=300)
    await iatp.register_agent("alice")
    env = await signed(iatp)
    assert (await iatp.verify(env)).valid
    clock.advance(300)  # timestamp == now - max_age: still inside the window
    assert (await iatp.verify(env)).reason == Reason.REPLAYED
    clock.now += 1
    assert (await iatp.verify(env)).reason == Reason.TOO_OLD


async def test_flooded_cache_refuses_old_messages_rather_than_miss_replays(clock: Clock) -> None:
    iatp = IATP(clock=clock, max_nonces=2)
    await iatp.register_agent("alice")
    first = await signed(iatp)
    clock.advance(1)
    rest = [await signed(iatp) for _ in range(2)]
    assert all([(await iatp.verify(e)).valid for e in [first, *rest]])
    assert (await iatp.verify(first)).reason == Reason.REPLAY_WINDOW


# -- hostile input -------------------------------------------------------------------------------

hostile = st.one_of(
    st.none(), st.integers(), st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=3)
)
sig_blocks = st.builds(
    Signature,
    st.sampled_from(["ed25519", "iatp-session-v1", "", "rsa"]) | st.text(max_size=8) | hostile,
    st.text(max_size=40) | hostile,
    st.binary(max_size=40) | hostile,
    st.binary(max_size=80) | hostile,
)

_shared = IATP()


@pytest.fixture(scope="module", autouse=True)
def _register_shared() -> None:
    import asyncio

    if "alice" not in _shared.registry.agents:
        asyncio.run(_shared.register_agent("alice"))


def _good_env() -> Envelope:
    env = Envelope(new_id(), "t.x", "alice", {"k": 1}, "bob", timestamp=time.time_ns())
    return _shared.sign_envelope(env)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sig_blocks, st.booleans())
def test_garbage_signature_blocks_give_a_reason_never_an_exception(sig: Signature, real_key: bool) -> None:
    env = _good_env()
    assert env.sig is not None
    if real_key and isinstance(sig.key_id, str):
        sig = msgspec.structs.replace(sig, key_id=env.sig.key_id)
    env.sig = sig
    result = _shared.verify_envelope(env)
    assert isinstance(result, VerificationResult)
    assert not result.valid
    assert result.reason in {r.value for r in Reason}


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["sender", "timestamp", "expires_at", "headers", "payload", "topic", "priority", "sig"]),
    hostile | st.builds(object) | st.dictionaries(st.integers() | st.text(max_size=4), hostile, max_size=2),
)
def test_hostile_field_values_never_raise_nor_verify(field: str, value: Any) -> None:
    env = _good_env()
    original = getattr(env, field)
    object.__setattr__(env, field, value)
    result = _shared.verify_envelope(env)
    assert isinstance(result, VerificationResult)
    if value != original or type(value) is not type(original):
        assert not result.valid


def test_non_envelopes_are_reported_not_raised() -> None:
    for thing in (None, 42, "text", object(), {"sig": None}):
        result = _shared.verify_envelope(thing)
        assert not result.valid
        assert result.reason == Reason.MALFORMED_ENVELOPE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_verify(data: bytes) -> None:
    import asyncio

    result = asyncio.run(_shared.verify(data))
    assert not result.valid


# -- no crypto library: fail closed ---------------------------------------------------------------


def test_without_pynacl_nothing_signs_and_nothing_verifies() -> None:
    script = textwrap.dedent(
        """
        import sys, time
        sys.modules["nacl"] = None  # makes `import nacl...` fail as if it were not installed
        from agent_os.amb import Envelope, Signature, new_id
        from agent_os import iatp
        from agent_os.iatp import IATP, CryptoUnavailable, KeyRecord, MemoryKeyStore, key_id_for
        from agent_os.iatp import _crypto
        from agent_os.iatp.keys import AgentRecord
        from agent_os.iatp.models import WebOfTrust
        from agent_os.iatp.registry import KeyRegistry
        from agent_os.iatp.trust import TrustStore
        from agent_os.iatp.verifier import EnvelopeVerifier, TrustEngine
        assert _crypto.AVAILABLE is False
        try:
            IATP()
        except CryptoUnavailable as exc:
            print("refused:", "pip install 'agent-os[iatp]'" in str(exc))
        registry = KeyRegistry(MemoryKeyStore())
        pk = b"\\x01" * 32
        key = KeyRecord(key_id_for(pk), "alice", 1, pk, time.time_ns())
        registry.agents["alice"] = AgentRecord("alice", {}, {key.key_id: key}, key.key_id)
        registry.keys[key.key_id] = key
        verifier = EnvelopeVerifier(registry, TrustEngine(WebOfTrust(), TrustStore(registry)))
        env = Envelope(new_id(), "t", "alice", b"x", timestamp=time.time_ns())
        env.sig = Signature("ed25519", key.key_id, b"n" * 16, b"s" * 64)
        result = verifier.verify(env)
        print("valid:", result.valid, result.reason)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: True" in out.stdout
    assert "valid: False crypto_unavailable" in out.stdout


def test_nonces_come_from_a_pool_that_never_repeats_and_is_new_after_fork() -> None:
    import os
    import warnings

    from agent_os.iatp import _crypto

    seen = {_crypto.random_nonce(16) for _ in range(2000)}  # spans several 4 KiB refills
    assert len(seen) == 2000
    assert all(len(n) == 16 for n in seen)
    _crypto.random_nonce(16)  # the pool holds unused bytes now
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: report its next nonce and leave at once
        os.write(write, _crypto.random_nonce(16))
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16
    assert child != _crypto.random_nonce(16)  # the parent's next bytes were not the child's
