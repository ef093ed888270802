"""Property tests of verification over time: replays, the acceptance window, expiry, revocation.

For arbitrary signed envelopes (the field strategies of the tampering tests) and arbitrary times
on a fake clock, each test states the documented rule as an oracle and checks the verifier's
result against it, reason included:

- a message is accepted only while its timestamp lies in ``[now - max_age, now + clock_skew]``
  (``clock_skew`` beyond it, ``too_old`` before it) and ``now < expires_at`` (``expired``); the
  timestamp is judged before the expiry (:meth:`agent_os.iatp.verifier.EnvelopeVerifier._bad_time`);
- a nonce seen once is refused (``replayed_nonce``) whenever the message is inside the window
  again, unless the broker marks the delivery as a redelivery; outside the window the time
  reason applies;
- a key revoked at ``R`` fails (``revoked_key``, with the revocation's reason) for a check at or
  after ``R`` whatever the message's time, and for a message stamped at or after ``R`` whenever
  it is checked (:meth:`agent_os.iatp.KeyRecord.state`); the revocation is judged before the time.

Times are drawn near the boundaries (to the nanosecond) as well as across them. Each example
gets an IATP of its own, so nothing one example remembers (nonces, revocations) reaches another.
"""

from __future__ import annotations

import asyncio
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent_os.amb import Envelope, MsgpackSerializer
from agent_os.iatp import IATP, Reason, VerificationResult
from tests.support.envelopes import MUTATIONS, make_env

S = 1_000_000_000
T0 = 1_750_000_000 * S  # the fake clock's starting point (mid-2025)
CODEC = MsgpackSerializer()

# Every signed field the tampering tests vary, except those a test sets itself: the sender (the
# agent that holds the key), the timestamp and the expiry.
_ENVELOPE_FIELDS = (
    "id", "topic", "recipient", "reply_to", "correlation_id", "priority", "payload", "headers",
)  # fmt: skip
# These envelopes cross the wire codec, whose topic and reply_to must be subjects.
_subjects = st.from_regex(r"[A-Za-z0-9_$-]{1,6}(\.[A-Za-z0-9_$-]{1,6}){0,2}", fullmatch=True)
envelope_fields = st.fixed_dictionaries(
    {name: MUTATIONS[name] for name in _ENVELOPE_FIELDS}
    | {"topic": _subjects, "reply_to": st.none() | _subjects}
)
skews = st.integers(0, 90)  # clock_skew, whole seconds (exact in ns)
max_ages = st.integers(1, 900)  # max_age, whole seconds

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def around(*points: int, spread: int) -> st.SearchStrategy[int]:
    """Integers in ``[min(points) - spread, max(points) + spread]``: as often from each stretch
    between two points (and beyond the outer ones) as within one of a point (the boundaries, to
    the nanosecond), so every side of every boundary is well represented."""
    cuts = sorted(set(points))
    edges = [cuts[0] - spread, *cuts, cuts[-1] + spread]
    stretches = [st.integers(low, high) for low, high in pairwise(edges)]
    near = st.sampled_from(cuts).flatmap(lambda p: st.integers(p - 1, p + 1))
    return st.one_of(*stretches, near)


def fresh_iatp(clock: Clock, skew: int = 30, max_age: int = 300) -> IATP:
    iatp = IATP(clock=clock, clock_skew=skew, max_age=max_age)
    asyncio.run(iatp.register_agent("alice"))
    return iatp


def signed(iatp: IATP, fields: dict[str, Any], timestamp: int, expires_at: int | None = None) -> Envelope:
    env = make_env(sender="alice", timestamp=timestamp, expires_at=expires_at, **fields)
    return iatp.sign_envelope(env)


def time_reason(ts: int, expires_at: int | None, now: int, skew: int, max_age: int) -> str | None:
    """The documented acceptance window (seconds for ``skew`` and ``max_age``): the reason a
    message stamped ``ts`` is refused at ``now``, or None."""
    if ts > now + skew * S:
        return Reason.CLOCK_SKEW
    if ts < now - max_age * S:
        return Reason.TOO_OLD
    if expires_at is not None and expires_at <= now:
        return Reason.EXPIRED
    return None


def check(result: VerificationResult, expected: str | None, env: Envelope) -> None:
    event(f"expected: {expected or 'valid'}")  # --hypothesis-show-statistics: how often each
    assert isinstance(result, VerificationResult)
    assert result.reason == expected, (result, result.detail)
    assert result.valid is (expected is None)
    assert result.sender == "alice"
    assert result.timestamp_ns == env.timestamp
    if expected is None:
        assert env.sig is not None
        assert result.key_id == env.sig.key_id


# -- the acceptance window and expiry --------------------------------------------------------------


@SETTINGS
@given(envelope_fields, skews, max_ages, st.data())
def test_the_window_and_the_expiry_decide_for_any_times(
    fields: dict[str, Any], skew: int, max_age: int, data: st.DataObject
) -> None:
    clock = Clock(T0)
    iatp = fresh_iatp(clock, skew, max_age)
    age = data.draw(around(-max_age * S, skew * S, spread=max_age * S), label="timestamp - now")
    lifetime = data.draw(st.none() | around(0, spread=2 * max_age * S), label="expires_at - now")
    ts = T0 + age
    expires_at = None if lifetime is None else T0 + lifetime
    env = signed(iatp, fields, ts, expires_at)
    check(iatp.verify_envelope(env), time_reason(ts, expires_at, T0, skew, max_age), env)


@SETTINGS
@given(envelope_fields, st.integers(-(2**62), 2**62), st.data())
def test_a_message_past_its_expiry_never_verifies(
    fields: dict[str, Any], expires_at: int, data: st.DataObject
) -> None:
    """Whatever the expiry and however the message is stamped, from ``expires_at`` on it fails."""
    clock = Clock(T0)
    iatp = fresh_iatp(clock)
    ts = T0 + data.draw(around(-300 * S, 30 * S, spread=S), label="timestamp - T0")
    env = signed(iatp, fields, ts, expires_at)
    clock.now = expires_at + data.draw(st.integers(0, 400 * S), label="now - expires_at")
    result = iatp.verify_envelope(env)
    assert not result.valid
    assert result.reason == time_reason(ts, expires_at, clock.now, 30, 300)
    assert result.reason in (Reason.EXPIRED, Reason.CLOCK_SKEW, Reason.TOO_OLD)


# -- replays ---------------------------------------------------------------------------------------


@SETTINGS
@given(envelope_fields, skews, max_ages, st.data())
def test_a_replay_fails_at_any_time_inside_the_window_and_a_redelivery_passes(
    fields: dict[str, Any], skew: int, max_age: int, data: st.DataObject
) -> None:
    clock = Clock(T0)
    iatp = fresh_iatp(clock, skew, max_age)
    first = st.integers(-max_age * S, skew * S) | st.sampled_from([-max_age * S, skew * S])
    ts = T0 + data.draw(first, label="timestamp - first check")
    env = signed(iatp, fields, ts)
    check(iatp.verify_envelope(env), None, env)  # the first delivery

    # The same bytes again at any time: inside the window [ts - skew, ts + max_age] (earlier
    # than the first check too: the clock may step back) it is a replay, outside it the time
    # check refuses it first.
    clock.now = ts + data.draw(around(-skew * S, max_age * S, spread=S), label="replay - timestamp")
    in_window = time_reason(ts, None, clock.now, skew, max_age)
    replay = CODEC.decode(CODEC.encode(env))
    check(iatp.verify_envelope(replay), in_window or Reason.REPLAYED, env)
    # the broker redelivering it (attempt > 1) is not a replay, nor is another subscription's copy
    check(iatp.verify_envelope(replay, redelivery=True), in_window, env)
    check(iatp.verify_envelope(replay, scope="another subscription"), in_window, env)
    # and the redelivery flag did not make the nonce forgettable
    check(iatp.verify_envelope(replay), in_window or Reason.REPLAYED, env)


# -- revocation ------------------------------------------------------------------------------------


@SETTINGS
@given(envelope_fields, st.integers(S // 1000, 10**6 * S), st.data())
def test_a_revoked_key_fails_from_the_revocation_time_for_any_timestamp(
    fields: dict[str, Any], revoke_in: int, data: st.DataObject
) -> None:
    skew, max_age = 30, 300
    clock = Clock(T0)
    iatp = fresh_iatp(clock, skew, max_age)
    key_id = iatp.identity("alice").key_id
    asyncio.run(iatp.revoke_key(key_id, reason="compromised", at=(T0 + revoke_in) / S))
    (record,) = iatp.identity("alice").keys
    revoked_at = record.revoked_at  # the requested time, as the float seconds came out in ns
    assert revoked_at is not None
    assert revoked_at > T0  # still in the future: alice can sign

    # message times around the revocation and far from it; check times around the revocation
    # and around the message's own window, so both rules and the window meet at their edges
    offset = data.draw(around(0, spread=2 * max_age * S), label="timestamp - revoked_at")
    ts = revoked_at + offset
    env = signed(iatp, fields, ts)
    clock.now = revoked_at + data.draw(
        around(0, offset - skew * S, offset + max_age * S, spread=max_age * S), label="now - revoked_at"
    )
    result = iatp.verify_envelope(env)
    if clock.now >= revoked_at or ts >= revoked_at:
        check(result, Reason.REVOKED_KEY, env)
        assert result.detail == "compromised"
    else:
        check(result, time_reason(ts, None, clock.now, skew, max_age), env)


@SETTINGS
@given(envelope_fields, st.integers(1, 300 * S), st.integers(0, 10**6 * S))
def test_a_message_accepted_before_the_revocation_is_refused_after_it(
    fields: dict[str, Any], before: int, after: int
) -> None:
    """Accepted once, the same message checked again at or after the revocation time fails as
    revoked, not as a replay (the key is judged first)."""
    clock = Clock(T0)
    iatp = fresh_iatp(clock)
    env = signed(iatp, fields, T0)
    check(iatp.verify_envelope(env), None, env)
    key_id = iatp.identity("alice").key_id
    asyncio.run(iatp.revoke_key(key_id, at=(T0 + before) / S))
    (record,) = iatp.identity("alice").keys
    assert record.revoked_at is not None
    clock.now = record.revoked_at + after
    check(iatp.verify_envelope(env), Reason.REVOKED_KEY, env)
