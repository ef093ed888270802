"""Session mode: authenticated X25519 handshake, per-message MAC, counters against replay."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_os.amb import Envelope, new_id
from agent_os.iatp import (
    IATP,
    Reason,
    Session,
    SessionAnswer,
    SessionConfirmation,
    SessionError,
    SessionOffer,
    SigningRejected,
    UnknownAgent,
    _crypto,
)
from agent_os.iatp.handshake import MAX_SESSIONS_PER_PAIR
from agent_os.iatp.session import MAX_SCOPES, MOST_SCOPES, WINDOW


async def pair(clock: Callable[[], int] | None = None, **options: Any) -> tuple[IATP, IATP]:
    """Two processes' IATPs (``clock`` and ``options`` for both), each with its own agent and
    the other's public identity."""
    now = time.time_ns if clock is None else clock  # IATP's default clock
    a, b = IATP(clock=now, **options), IATP(clock=now, **options)
    await a.register_agent("alice")
    await b.register_agent("bob")
    await a.add_identity(b.identity("bob"))
    await b.add_identity(a.identity("alice"))
    return a, b


def envelope(sender: str, recipient: str, payload: object = b"data") -> Envelope:
    return Envelope(new_id(), "p2p.data", sender, payload, recipient, timestamp=time.time_ns())


async def test_handshake_and_macs_in_both_directions() -> None:
    a, b = await pair()
    pending = await a.offer_session("alice", "bob")
    session_b, answer = await b.accept_session("bob", pending.offer.to_bytes())
    session_a = await a.complete_session(pending, answer)
    assert session_a.session_id == session_b.session_id
    out = envelope("alice", "bob")
    session_a.seal(out)
    result = b.verify_envelope(out)
    assert result.valid, result
    assert result.key_id == session_b.session_id
    back = envelope("bob", "alice")
    session_b.seal(back)
    assert a.verify_envelope(back).valid
    # a MAC made for one direction does not verify in the other
    reflected = dataclasses.replace(out, sender="bob", recipient="alice")
    assert not a.verify_envelope(reflected).valid


async def test_session_messages_resist_tampering_and_replay() -> None:
    a, b = await pair()
    pending = await a.offer_session("alice", "bob")
    session_b, answer = await b.accept_session("bob", pending.offer.to_bytes())
    session_a = await a.complete_session(pending, answer)
    msgs = [envelope("alice", "bob", i) for i in range(3)]
    for m in msgs:
        session_a.seal(m)
    tampered = dataclasses.replace(msgs[0], payload=99)
    assert b.verify_envelope(tampered).reason == Reason.BAD_SIGNATURE
    assert b.verify_envelope(msgs[2]).valid
    assert b.verify_envelope(msgs[0]).valid  # reordering within the window is fine
    assert b.verify_envelope(msgs[0]).reason == Reason.REPLAYED
    assert msgs[1].sig is not None
    bumped = dataclasses.replace(
        msgs[1], sig=msgspec.structs.replace(msgs[1].sig, nonce=(7).to_bytes(8, "big"))
    )
    assert b.verify_envelope(bumped).reason == Reason.BAD_SIGNATURE  # the counter is MACed
    b.close_session(session_b)
    assert b.verify_envelope(msgs[1]).reason == Reason.UNKNOWN_SESSION


async def test_a_forged_offer_or_answer_is_refused() -> None:
    a, b = await pair()
    mallory = IATP()
    await mallory.register_agent("alice")  # same name, different key
    await mallory.add_identity(b.identity("bob"))
    fake = await mallory.offer_session("alice", "bob")
    with pytest.raises(SessionError):
        await b.accept_session("bob", fake.offer.to_bytes())
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    parsed = SessionAnswer.from_bytes(answer)
    with pytest.raises(SessionError):
        await a.complete_session(pending, dataclasses.replace(parsed, ephemeral=b"\x09" * 32))


async def test_a_replayed_offer_and_garbage_are_refused() -> None:
    a, b = await pair()
    pending = await a.offer_session("alice", "bob")
    await b.accept_session("bob", pending.offer.to_bytes())
    with pytest.raises(SessionError):
        await b.accept_session("bob", pending.offer.to_bytes())
    for garbage in (b"", b"\x00", b"\x97" + b"\x00" * 7, SessionOffer.__name__.encode()):
        with pytest.raises(SessionError):
            await b.accept_session("bob", garbage)
    with pytest.raises(SessionError):
        await b.complete_session(pending, b"\x01\x02")


async def test_low_order_ephemeral_keys_are_refused() -> None:
    a, b = await pair()
    pending = await a.offer_session("alice", "bob")
    offer = pending.offer
    # re-sign a valid offer carrying an all-zero ephemeral key (a low-order point)
    _key_id, secret = a.registry.signing_key("alice") or ("", b"")
    from agent_os.iatp import _crypto

    bad = dataclasses.replace(offer, ephemeral=bytes(32), signature=b"")
    bad = dataclasses.replace(bad, signature=_crypto.sign(secret, bad.signed_bytes()))
    with pytest.raises(SessionError):
        await b.accept_session("bob", bad.to_bytes())


async def test_expired_sessions_stop_verifying() -> None:
    now = [time.time_ns()]
    a, b = IATP(clock=lambda: now[0], session_lifetime=5), IATP(clock=lambda: now[0])
    await a.register_agent("alice")
    await b.register_agent("bob")
    await a.add_identity(b.identity("bob"))
    await b.add_identity(a.identity("alice"))
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    await a.complete_session(pending, answer)
    assert a.sessions.for_pair("alice", "bob", now[0]) is not None
    now[0] += 6_000_000_000
    assert a.sessions.for_pair("alice", "bob", now[0]) is None


async def handshake(a: IATP, b: IATP) -> tuple[Session, Session]:
    """A new session from alice (in ``a``) to bob (in ``b``): alice's side and bob's."""
    pending = await a.offer_session("alice", "bob")
    session_b, answer = await b.accept_session("bob", pending.offer.to_bytes())
    return await a.complete_session(pending, answer), session_b


async def test_a_peer_handshaking_in_a_loop_keeps_a_bounded_number_of_sessions() -> None:
    """Each accepted offer used to add a session that stayed for good: a known peer could
    grow the other side's memory without end. The pair's oldest session is closed instead."""
    a, b = await pair()
    made = []
    for _ in range(MAX_SESSIONS_PER_PAIR + 5):
        session_a, session_b = await handshake(a, b)
        made.append((session_a, session_b, sealed(session_a, "alice", "bob")))
    for process in (a, b):
        assert len(process.verifier.sessions) == MAX_SESSIONS_PER_PAIR
    for i, (session_a, session_b, message) in enumerate(made):
        result = b.verify_envelope(message)
        if i < 5:  # closed on both sides
            assert result.reason == Reason.UNKNOWN_SESSION
            with pytest.raises(SessionError):
                session_a.seal(envelope("alice", "bob"))
            with pytest.raises(SessionError):
                session_b.seal(envelope("bob", "alice"))
        else:
            assert result.valid, (i, result)
    assert a.sessions.for_pair("alice", "bob", time.time_ns()) is made[-1][0]


async def test_expired_sessions_are_dropped_by_later_handshakes() -> None:
    clock = Clock()
    a, b = await pair(clock, session_lifetime=8)
    first_a, first_b = await handshake(a, b)
    clock.advance(3)
    await handshake(a, b)  # within the sweep's interval (a quarter lifetime): nothing dropped yet
    assert len(b.verifier.sessions) == 2
    clock.advance(6)  # the first has expired, the second not
    last_a, _ = await handshake(a, b)
    for process, gone in ((a, first_a), (b, first_b)):
        assert (gone.session_id, gone.peer) not in process.verifier.sessions
        assert len(process.verifier.sessions) == 2
    assert b.verify_envelope(sealed(last_a, "alice", "bob", at=clock.now)).valid


async def test_a_session_in_use_outlasts_handshakes_whose_answers_were_lost() -> None:
    """Offers whose answers never reach the initiator leave sessions it does not hold on the
    responder's side: the responder does not seal in them, and the pair's bound closes those
    first, not the session both sides hold."""
    a, b = await pair()
    used_a, used_b = await handshake(a, b)
    assert b.verify_envelope(sealed(used_a, "alice", "bob")).valid
    for _ in range(MAX_SESSIONS_PER_PAIR + 3):
        pending = await a.offer_session("alice", "bob")
        orphan, _ = await b.accept_session("bob", pending.offer.to_bytes())  # the answer is lost
        assert b.sessions.for_pair("bob", "alice", time.time_ns()) is used_b
        orphan.seal(envelope("bob", "alice"))  # sealing in it does not make it one alice holds
    assert a.sessions.for_pair("alice", "bob", time.time_ns()) is used_a
    assert b.verify_envelope(sealed(used_a, "alice", "bob")).valid
    assert len(b.verifier.sessions) == MAX_SESSIONS_PER_PAIR


async def test_sessions_renewed_by_both_sides_at_once_keep_working() -> None:
    """Both agents offer at the same moment, round after round: each side must not close the
    session the other is about to seal in (its newest, just answered) when the pair is full."""
    a, b = await pair()
    for _ in range(MAX_SESSIONS_PER_PAIR):
        from_a = await a.offer_session("alice", "bob")
        from_b = await b.offer_session("bob", "alice")
        _, answer_to_a = await b.accept_session("bob", from_a.offer.to_bytes())
        _, answer_to_b = await a.accept_session("alice", from_b.offer.to_bytes())
        await a.complete_session(from_a, answer_to_a)
        await b.complete_session(from_b, answer_to_b)
        now = time.time_ns()
        sending_a, sending_b = (
            a.sessions.for_pair("alice", "bob", now),
            b.sessions.for_pair("bob", "alice", now),
        )
        assert sending_a is not None
        assert sending_b is not None
        assert b.verify_envelope(sealed(sending_a, "alice", "bob")).valid
        assert a.verify_envelope(sealed(sending_b, "bob", "alice")).valid
        for process in (a, b):
            assert len(process.verifier.sessions) <= MAX_SESSIONS_PER_PAIR


@pytest.mark.parametrize(
    ("used", "racing"), [(MAX_SESSIONS_PER_PAIR - 1, 2), (MAX_SESSIONS_PER_PAIR - 1, 5), (0, 12)]
)
async def test_racing_offers_completed_out_of_order_leave_a_session_both_sides_hold(
    used: int, racing: int
) -> None:
    """Several of alice's tasks offer at once; bob answers each, and the answers reach alice
    in another order (the first offer's last). Alice seals in the session she offered last,
    which bob keeps however full the pair is."""
    a, b = await pair()
    for _ in range(used):
        used_a, _ = await handshake(a, b)
        assert b.verify_envelope(sealed(used_a, "alice", "bob")).valid
    offers = [await a.offer_session("alice", "bob") for _ in range(racing)]
    answers = [(await b.accept_session("bob", offer.offer.to_bytes()))[1] for offer in offers]
    last_offered = await a.complete_session(offers[-1], answers[-1])
    for offer, answer in list(zip(offers, answers, strict=True))[:-1]:
        await a.complete_session(offer, answer)
    assert a.sessions.for_pair("alice", "bob", time.time_ns()) is last_offered
    assert b.verify_envelope(sealed(last_offered, "alice", "bob")).valid


async def test_a_late_answer_does_not_take_over_after_the_peer_offered_in_between() -> None:
    """The order rule compared only with the session sealed in, which may be one this side
    answered: a late answer to alice's first offer then took over from the one she offered
    last, and bob had closed it."""
    a, b = await pair()
    offers = [await a.offer_session("alice", "bob") for _ in range(MAX_SESSIONS_PER_PAIR + 4)]
    answers = [(await b.accept_session("bob", offer.offer.to_bytes()))[1] for offer in offers]
    last_offered = await a.complete_session(offers[-1], answers[-1])
    from_b = await b.offer_session("bob", "alice")  # bob offers meanwhile
    _, answer = await a.accept_session("alice", from_b.offer.to_bytes())
    await b.complete_session(from_b, answer)
    await a.complete_session(offers[0], answers[0])  # a late answer to alice's first offer
    sending = a.sessions.for_pair("alice", "bob", time.time_ns())
    assert sending is not None
    assert b.verify_envelope(sealed(sending, "alice", "bob")).valid
    assert b.verify_envelope(sealed(last_offered, "alice", "bob")).valid


async def test_the_responder_seals_in_a_session_once_the_initiator_has_sent_in_it() -> None:
    """Until then bob cannot know alice got his answer: he has no session to seal in (the
    middleware signs), and alice's first message in it makes it his."""
    a, b = await pair()
    session_a, session_b = await handshake(a, b)
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is None
    assert not session_b.confirmed
    assert not b.verify_envelope(sealed(session_a, "alice", "bob", at=time.time_ns() - 3600 * 10**9)).valid
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is None  # refused: proves nothing
    assert b.verify_envelope(sealed(session_a, "alice", "bob")).valid
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is session_b
    assert a.verify_envelope(sealed(session_b, "bob", "alice")).valid


async def test_answered_sessions_confirmed_out_of_order_leave_the_responder_in_the_newest() -> None:
    a, b = await pair()
    first_a, first_b = await handshake(a, b)
    second_a, second_b = await handshake(a, b)
    late = sealed(first_a, "alice", "bob")  # sent before alice moved on, arriving last
    assert b.verify_envelope(sealed(second_a, "alice", "bob")).valid
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is second_b
    assert b.verify_envelope(late).valid
    assert first_b.confirmed
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is second_b


async def test_confirming_an_older_answer_leaves_the_responder_in_its_own_later_offer() -> None:
    a, b = await pair()
    answered_a, _ = await handshake(a, b)
    from_b = await b.offer_session("bob", "alice")
    _, answer = await a.accept_session("alice", from_b.offer.to_bytes())
    own = await b.complete_session(from_b, answer)
    assert b.verify_envelope(sealed(answered_a, "alice", "bob")).valid
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is own


async def test_renewals_the_initiator_never_sends_in_leave_the_session_the_responder_uses() -> None:
    """alice handshakes, sends once, then renews more times than a pair keeps sessions and
    sends nothing more: bob, who heard her only in the first, still seals in it, so her bound
    must close the renewals she never sealed in, not that one."""
    a, b = await pair()
    first_a, first_b = await handshake(a, b)
    assert b.verify_envelope(sealed(first_a, "alice", "bob")).valid
    for _ in range(MAX_SESSIONS_PER_PAIR + 2):
        await handshake(a, b)
        assert b.sessions.for_pair("bob", "alice", time.time_ns()) is first_b
        assert a.verify_envelope(sealed(first_b, "bob", "alice")).valid


async def test_a_full_pair_keeps_the_session_the_peer_was_last_heard_sealing_in() -> None:
    """alice seals in a session bob answered and heard her in; her next offer's answer is on
    the way. bob then makes session after session, sealing in each (messages still in flight):
    his bound must not close the one she seals in, though it is his oldest."""
    a, b = await pair()
    used_a, _ = await handshake(a, b)
    assert b.verify_envelope(sealed(used_a, "alice", "bob")).valid
    in_flight = await a.offer_session("alice", "bob")
    await b.accept_session("bob", in_flight.offer.to_bytes())  # the answer is on its way
    for _ in range(MAX_SESSIONS_PER_PAIR):
        from_b = await b.offer_session("bob", "alice")
        _, answer = await a.accept_session("alice", from_b.offer.to_bytes())
        sealed(await b.complete_session(from_b, answer), "bob", "alice")  # not delivered yet
        assert len(b.verifier.sessions) <= MAX_SESSIONS_PER_PAIR
    assert a.sessions.for_pair("alice", "bob", time.time_ns()) is used_a
    assert b.verify_envelope(sealed(used_a, "alice", "bob")).valid


async def test_a_full_pair_closes_an_offer_never_sealed_in_before_the_peers_unheard_ones() -> None:
    """bob offers again and again; only his first answer has reached him, and he seals in that
    session, which alice has not heard in yet. Her bound used to close the oldest she had not
    heard in, his; an offer of hers she never sealed in is of no use to him."""
    a, b = await pair()
    offers = [await b.offer_session("bob", "alice") for _ in range(MAX_SESSIONS_PER_PAIR - 1)]
    answers = [(await a.accept_session("alice", o.offer.to_bytes()))[1] for o in offers]
    used_b = await b.complete_session(offers[0], answers[0])  # the later answers are on the way
    await handshake(a, b)  # alice's own, completed: she seals in it, but sends nothing
    await handshake(a, b)  # the pair is full: one of alice's sessions goes
    assert len(a.verifier.sessions) == MAX_SESSIONS_PER_PAIR
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is used_b
    assert a.verify_envelope(sealed(used_b, "bob", "alice")).valid


async def test_a_message_late_in_an_older_session_does_not_make_it_the_one_sealed_in() -> None:
    """alice renewed (bob answered) and may have closed the first session: a message of hers
    sent in it before, arriving now, must not make bob seal in it; he waits for the new one."""
    a, b = await pair()
    first_a, _ = await handshake(a, b)
    late = sealed(first_a, "alice", "bob")
    second_a, second_b = await handshake(a, b)
    a.close_session(first_a)
    assert b.verify_envelope(late).valid
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is None  # bob signs meanwhile
    assert b.verify_envelope(sealed(second_a, "alice", "bob")).valid
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is second_b


async def test_a_later_session_expired_unswept_does_not_keep_a_heard_one_from_being_used() -> None:
    clock = Clock()
    a, b = await pair(clock, session_lifetime=100)
    from_a = await a.offer_session("alice", "bob")
    heard_b, answer = await b.accept_session("bob", from_a.offer.to_bytes())
    heard_a = await a.complete_session(from_a, answer)
    clock.advance(1)
    from_b = await b.offer_session("bob", "alice")
    _, answer = await a.accept_session("alice", from_b.offer.to_bytes())
    own = await b.complete_session(from_b, answer)
    own.expires_at = clock.now + 10**9  # made later, ending first (its key retiring, say)
    clock.advance(2)
    assert b.verify_envelope(sealed(heard_a, "alice", "bob", at=clock.now)).valid
    assert b.sessions.for_pair("bob", "alice", clock.now) is heard_b


async def test_the_initiators_confirmation_lets_the_responder_seal_at_once() -> None:
    """Traffic from the responder alone: without the third message bob would sign every
    message, since alice never sends in the session."""
    a, b = await pair()
    session_a, session_b = await handshake(a, b)
    confirmation = a.session_confirmation(session_a)
    assert await b.confirm_session("bob", confirmation) is session_b
    assert session_b.confirmed
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is session_b
    assert a.verify_envelope(sealed(session_b, "bob", "alice")).valid
    assert await b.confirm_session("bob", confirmation) is session_b  # again: harmless


async def test_a_confirmation_is_refused_unless_it_proves_the_initiator_holds_the_session() -> None:
    a, b = await pair()
    session_a, session_b = await handshake(a, b)
    good = SessionConfirmation.from_bytes(a.session_confirmation(session_a))
    forged = dataclasses.replace(good, tag=bytes([good.tag[0] ^ 1]) + good.tag[1:])
    mac = sealed(session_a, "alice", "bob").sig
    assert mac is not None
    as_message_mac = dataclasses.replace(good, tag=mac.value)  # a message's MAC is no confirmation
    retimed = dataclasses.replace(good, timestamp=good.timestamp - 1)  # the time is under the tag
    other_a, _ = await handshake(a, b)
    other_session = SessionConfirmation.from_bytes(a.session_confirmation(other_a))
    crossed = dataclasses.replace(good, tag=other_session.tag)  # another session's tag
    unknown = dataclasses.replace(good, session_id=bytes(16))
    wrong_agent = dataclasses.replace(good, responder="carol")
    for bad in (forged, as_message_mac, retimed, crossed, unknown, wrong_agent):
        with pytest.raises(SessionError):
            await b.confirm_session("bob", bad)
    odd_fields = (
        dataclasses.replace(good, tag="text"),  # type: ignore[arg-type]
        dataclasses.replace(good, session_id="text"),  # type: ignore[arg-type]
        dataclasses.replace(good, initiator=["alice"]),  # type: ignore[arg-type]
        dataclasses.replace(good, timestamp=2**64),
        dataclasses.replace(good, tag=good.tag[:31]),
    )
    not_bytes: tuple[Any, ...] = ("text", {"a": 1}, [1], None, bytearray(good.to_bytes()), 7)
    garbage = (b"", b"\x95", good.to_bytes()[:-1], good.to_bytes() + b"\x00")
    for bad_input in (*odd_fields, *not_bytes, *garbage):
        with pytest.raises(SessionError):
            await b.confirm_session("bob", bad_input)
    with pytest.raises(SessionError):
        await a.confirm_session("alice", good)  # the initiator's own side
    with pytest.raises(SessionError):
        session_b.confirmation(time.time_ns())  # only the initiator confirms
    assert not session_b.confirmed
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is None
    b.close_session(session_b)
    with pytest.raises(SessionError):
        await b.confirm_session("bob", good)
    a.close_session(other_a)
    with pytest.raises(SessionError):
        a.session_confirmation(other_a)


async def test_the_other_handshake_messages_refuse_what_is_not_one_with_a_session_error() -> None:
    a, b = await pair()
    pending = await a.offer_session("alice", "bob")
    not_offers: tuple[Any, ...] = ("text", None, [1], dataclasses.replace(pending.offer, ephemeral=b"x"))
    for bad_offer in not_offers:
        with pytest.raises(SessionError):
            await b.accept_session("bob", bad_offer)
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    parsed = SessionAnswer.from_bytes(answer)
    odd_answer = dataclasses.replace(parsed, timestamp=-1.5)  # type: ignore[arg-type]
    not_answers: tuple[Any, ...] = ("text", {"x": 1}, odd_answer)
    for bad_answer in not_answers:
        with pytest.raises(SessionError):
            await a.complete_session(pending, bad_answer)
    assert (await a.complete_session(pending, parsed)).confirmed  # an object as parsed is fine


async def test_only_the_session_the_initiator_seals_in_is_confirmed() -> None:
    """alice's answers came back out of order: she seals in the session she offered last;
    confirming the other would make bob seal in a session her bound closes first."""
    a, b = await pair()
    first, last = await a.offer_session("alice", "bob"), await a.offer_session("alice", "bob")
    _, answer_last = await b.accept_session("bob", last.offer.to_bytes())
    _, answer_first = await b.accept_session("bob", first.offer.to_bytes())
    last_a = await a.complete_session(last, answer_last)
    first_a = await a.complete_session(first, answer_first)
    assert a.sessions.for_pair("alice", "bob", time.time_ns()) is last_a
    with pytest.raises(SessionError):
        a.session_confirmation(first_a)
    assert (await b.confirm_session("bob", a.session_confirmation(last_a))).confirmed


async def test_a_full_pair_keeps_the_session_it_confirmed_and_the_peer_seals_in() -> None:
    """alice confirms a session and bob seals in it; alice then handshakes more times than a
    pair keeps sessions, none confirmed yet: her bound closed the confirmed one first (offered,
    never sealed in), where a message in it would have kept it."""
    a, b = await pair()
    first_a, _ = await handshake(a, b)
    assert b.verify_envelope(sealed(first_a, "alice", "bob")).valid
    confirmed_a, confirmed_b = await handshake(a, b)
    await b.confirm_session("bob", a.session_confirmation(confirmed_a))
    for _ in range(MAX_SESSIONS_PER_PAIR - 1):
        await handshake(a, b)  # their confirmations are on the way
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is confirmed_b
    assert a.verify_envelope(sealed(confirmed_b, "bob", "alice")).valid


async def test_confirmations_never_delivered_do_not_cost_the_session_the_peer_seals_in() -> None:
    """bob confirms each offer he seals in, and none of it reaches alice, who seals in one she
    offered and bob answered. When bob's pair is full, only his last confirmed offer may be
    the one alice seals in: the earlier ones go before hers."""
    a, b = await pair()
    used_a, _ = await handshake(a, b)
    in_flight = sealed(used_a, "alice", "bob")
    for _ in range(2):
        from_b = await b.offer_session("bob", "alice")
        _, answer = await a.accept_session("alice", from_b.offer.to_bytes())
        b.session_confirmation(await b.complete_session(from_b, answer))  # never delivered
    for _ in range(MAX_SESSIONS_PER_PAIR - 2):
        lost = await a.offer_session("alice", "bob")
        await b.accept_session("bob", lost.offer.to_bytes())  # the answers are lost
    assert len(b.verifier.sessions) == MAX_SESSIONS_PER_PAIR
    assert b.verify_envelope(in_flight).valid


async def test_session_calls_refuse_what_is_not_theirs_with_their_own_errors() -> None:
    a, b = await pair()
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    odd: tuple[Any, ...] = (None, "pending", [pending])
    for not_pending in odd:
        with pytest.raises(SessionError):
            await a.complete_session(not_pending, answer)
        with pytest.raises(SessionError):
            a.close_session(not_pending)
    odd_agents: tuple[tuple[Any, Any], ...] = (("alice", []), ([], "bob"), ("alice", None), (None, "bob"))
    for local, peer in odd_agents:
        with pytest.raises(UnknownAgent):
            await a.offer_session(local, peer)
    assert (await a.complete_session(pending, answer)).confirmed


async def test_a_late_completion_of_no_use_to_a_full_pair_comes_back_closed() -> None:
    """alice seals in her later offer; the earlier one's answer comes last, to a full pair of
    sessions each side sealed in: the session is returned closed, as documented."""
    a, b = await pair()
    early, later = await a.offer_session("alice", "bob"), await a.offer_session("alice", "bob")
    _, answer_early = await b.accept_session("bob", early.offer.to_bytes())
    _, answer_later = await b.accept_session("bob", later.offer.to_bytes())
    await a.complete_session(later, answer_later)
    for _ in range(MAX_SESSIONS_PER_PAIR - 1):
        offer = await b.offer_session("bob", "alice")
        _, answer = await a.accept_session("alice", offer.offer.to_bytes())
        await b.complete_session(offer, answer)
    late = await a.complete_session(early, answer_early)
    assert late.expires_at == 0
    assert late not in a.verifier.sessions.values()
    with pytest.raises(SessionError):
        late.seal(envelope("alice", "bob"))
    with pytest.raises(SessionError):
        a.session_confirmation(late)
    with pytest.raises(SessionError):
        a.session_confirmation(None)  # type: ignore[arg-type]


async def test_a_confirmation_is_timed_as_a_message() -> None:
    """A confirmation held back (or replayed) longer than a message may be is refused, as the
    message would be: it could confirm a session the initiator has closed since."""
    clock = Clock()
    a, b = await pair(clock, max_age=60)
    session_a, _ = await handshake(a, b)
    confirmation = a.session_confirmation(session_a)
    clock.advance(61)
    with pytest.raises(SessionError, match="stale"):
        await b.confirm_session("bob", confirmation)
    assert b.sessions.for_pair("bob", "alice", clock.now) is None
    c, d = await pair(clock)
    c_session, _ = await handshake(c, d)
    ahead = c.session_confirmation(c_session)
    clock.advance(-600)  # the clock steps back ten minutes: the confirmation is from the future
    with pytest.raises(SessionError, match="future"):
        await d.confirm_session("bob", ahead)


async def test_a_confirmation_of_an_expired_session_is_refused() -> None:
    clock = Clock()
    a, b = await pair(clock, session_lifetime=10)
    session_a, _ = await handshake(a, b)
    confirmation = a.session_confirmation(session_a)
    clock.advance(11)
    with pytest.raises(SessionError):
        await b.confirm_session("bob", confirmation)
    assert b.sessions.for_pair("bob", "alice", clock.now) is None


async def test_a_session_closed_before_it_was_heard_is_never_sealed_in() -> None:
    a, b = await pair()
    _, closed = await handshake(a, b)
    b.close_session(closed)
    closed.accept_counter(1, "a scope")  # as if a message in it came late
    assert ("bob", "alice") not in b.sessions.by_pair


async def test_a_lost_answer_leaves_the_responder_sealing_where_the_initiator_can_check() -> None:
    """bob answers alice's offer and the answer is lost: bob goes on sealing in the session he
    completed before, which alice holds, not in the one she never got; a late answer to one of
    his own offers leaves him in his last offer."""
    a, b = await pair()
    delayed = await b.offer_session("bob", "alice")
    _, delayed_answer = await a.accept_session("alice", delayed.offer.to_bytes())
    renewal = await b.offer_session("bob", "alice")
    _, answer = await a.accept_session("alice", renewal.offer.to_bytes())
    renewed = await b.complete_session(renewal, answer)
    lost = await a.offer_session("alice", "bob")
    unheard, _ = await b.accept_session("bob", lost.offer.to_bytes())  # the answer is lost
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is renewed
    assert a.verify_envelope(sealed(renewed, "bob", "alice")).valid
    assert a.verify_envelope(sealed(unheard, "bob", "alice")).reason == Reason.UNKNOWN_SESSION
    await b.complete_session(delayed, delayed_answer)
    sending = b.sessions.for_pair("bob", "alice", time.time_ns())
    assert sending is renewed
    assert a.verify_envelope(sealed(sending, "bob", "alice")).valid


async def test_a_session_stays_confirmed_when_the_scope_that_heard_it_ends() -> None:
    a, b = await pair()
    used_a, used_b = await handshake(a, b)
    assert not used_b.confirmed
    assert b.verifier.verify(sealed(used_a, "alice", "bob"), None, "a subscription", False).valid
    assert used_b.confirmed
    b.sessions.end_scope("a subscription")  # the subscription stopped: its window is gone
    assert "a subscription" not in used_b._windows
    assert used_b.confirmed


async def test_the_bound_closes_a_pairs_expired_sessions_before_a_live_one() -> None:
    clock = Clock()
    a, b = await pair(clock, session_lifetime=80)  # a sweep at most every 20 s
    for _ in range(MAX_SESSIONS_PER_PAIR - 1):  # sessions in use, made a second apart
        made_a, _ = await handshake(a, b)
        assert b.verify_envelope(sealed(made_a, "alice", "bob", at=clock.now)).valid
        clock.advance(1)
    clock.advance(79 - MAX_SESSIONS_PER_PAIR + 1)
    await handshake(a, b)  # sweeps with nothing expired; the pair is full
    clock.advance(11)  # all but the last two have expired, and the next sweep is 9 s away
    fresh_a, _ = await handshake(a, b)
    in_flight = sealed(fresh_a, "alice", "bob", at=clock.now)
    clock.advance(1)
    await handshake(a, b)
    assert b.verify_envelope(in_flight).valid  # the new session was not closed for them
    assert len(b.verifier.sessions) == 3


async def test_a_pair_whose_sessions_all_expired_between_sweeps_stays_within_its_bound() -> None:
    """Closing the pair's expired sessions emptied its list, which was then dropped while the
    new session went into it: that session was never counted, and the pair kept one more."""
    clock = Clock()
    a, b = await pair(clock, session_lifetime=100)  # a sweep at most every 25 s
    await a.register_agent("carol")
    await b.add_identity(a.identity("carol"))
    await handshake(a, b)
    clock.advance(90)
    pending = await a.offer_session("carol", "bob")  # another pair's handshake: a sweep now
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    await a.complete_session(pending, answer)
    clock.advance(15)  # alice's first session has expired, and no sweep is due
    for _ in range(MAX_SESSIONS_PER_PAIR + 3):
        await handshake(a, b)
    alices = [s for s in b.verifier.sessions.values() if s.peer == "alice"]
    assert len(alices) == MAX_SESSIONS_PER_PAIR


async def test_an_offer_reusing_a_live_session_id_is_refused() -> None:
    """Accepting it replaced the live session's entry, and closing either then took the
    other with it."""
    clock = Clock()
    a, b = await pair(clock)
    first = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", first.offer.to_bytes())
    live_a = await a.complete_session(first, answer)
    clock.advance(400)  # the offer's nonce is forgotten; the session lives on
    again = await a.offer_session("alice", "bob")
    again.offer = dataclasses.replace(again.offer, session_id=first.offer.session_id)
    secret = a.registry.signing_key("alice")
    assert secret is not None
    signature = _crypto.sign(secret[1], again.offer.signed_bytes())
    again.offer = dataclasses.replace(again.offer, signature=signature)
    with pytest.raises(SessionError, match="in use"):
        await b.accept_session("bob", again.offer.to_bytes())
    assert b.verify_envelope(sealed(live_a, "alice", "bob", at=clock.now)).valid


async def test_the_sweep_goes_on_after_the_clock_steps_back() -> None:
    clock = Clock()
    a, b = await pair(clock, session_lifetime=60)
    await handshake(a, b)  # a sweep; the next one not before 15 s from now
    clock.advance(-86_400)  # the clock steps back a day
    stale_a, stale_b = await handshake(a, b)
    clock.advance(120)  # both expired
    await handshake(a, b)
    for process, gone in ((a, stale_a), (b, stale_b)):
        assert (gone.session_id, gone.peer) not in process.verifier.sessions
        assert len(process.verifier.sessions) == 2  # the first (by this clock, a day to go) and the last


# -- sessions end with the keys that made them ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000_000)


async def established(clock: Clock | None = None) -> tuple[IATP, IATP, Session, Session]:
    """alice's process, bob's process, alice's session and bob's session."""
    a, b = await pair(clock)
    pending = await a.offer_session("alice", "bob")
    session_b, answer = await b.accept_session("bob", pending.offer.to_bytes())
    session_a = await a.complete_session(pending, answer)
    return a, b, session_a, session_b


def sealed(session: Session, sender: str, recipient: str, at: int | None = None) -> Envelope:
    env = envelope(sender, recipient)
    if at is not None:
        env.timestamp = at
    session.seal(env)
    return env


async def test_sessions_remember_the_keys_of_their_handshake() -> None:
    a, b, session_a, session_b = await established()
    alice_key, bob_key = a.identity("alice").key_id, b.identity("bob").key_id
    assert (session_a.local_key_id, session_a.peer_key_id) == (alice_key, bob_key)
    assert (session_b.local_key_id, session_b.peer_key_id) == (bob_key, alice_key)


async def test_revoking_the_peers_key_ends_its_sessions() -> None:
    """The reported gap: a message MACed after the sender's key was revoked still verified."""
    a, b, session_a, session_b = await established()
    await b.revoke_key(a.identity("alice").key_id, "compromised")
    result = b.verify_envelope(sealed(session_a, "alice", "bob"))
    assert not result.valid
    assert result.reason == Reason.UNKNOWN_SESSION
    assert b.sessions.for_pair("bob", "alice", time.time_ns()) is None  # bob stops sealing to alice
    with pytest.raises(SessionError):
        session_b.seal(envelope("bob", "alice"))


async def test_revoking_the_local_key_ends_its_sessions_both_ways() -> None:
    a, _, session_a, session_b = await established()
    await a.revoke_key(a.identity("alice").key_id, "compromised")
    with pytest.raises(SessionError):
        session_a.seal(envelope("alice", "bob"))
    assert a.sessions.for_pair("alice", "bob", time.time_ns()) is None
    assert a.verify_envelope(sealed(session_b, "bob", "alice")).reason == Reason.UNKNOWN_SESSION


async def test_a_scheduled_revocation_of_the_peers_key_fails_its_session_messages() -> None:
    clock = Clock()
    a, b, session_a, _ = await established(clock)
    alice_key = a.identity("alice").key_id
    await b.revoke_key(alice_key, "compromised", at=(clock.now + 10 * 10**9) / 1e9)
    assert b.verify_envelope(sealed(session_a, "alice", "bob")).valid  # before the revocation time
    stamped_late = sealed(session_a, "alice", "bob", at=clock.now + 20 * 10**9)
    result = b.verify_envelope(stamped_late)
    assert result.reason == Reason.REVOKED_KEY
    assert result.detail == "compromised"
    clock.advance(11)
    assert b.verify_envelope(sealed(session_a, "alice", "bob", at=clock.now)).reason == Reason.REVOKED_KEY
    assert b.sessions.for_pair("bob", "alice", clock.now) is None


async def test_rotation_ends_sessions_after_the_grace_period_on_both_sides() -> None:
    clock = Clock()
    a, b, session_a, _ = await established(clock)
    rotated = await a.rotate_key("alice", grace=60)
    await b.add_identity(rotated)  # bob learns the rotation (and the old key's retirement)
    assert b.verify_envelope(sealed(session_a, "alice", "bob", at=clock.now)).valid
    assert a.sessions.for_pair("alice", "bob", clock.now) is session_a
    clock.advance(61)
    assert a.sessions.for_pair("alice", "bob", clock.now) is None  # alice no longer seals with it
    result = b.verify_envelope(sealed(session_a, "alice", "bob", at=clock.now))
    assert result.reason == Reason.RETIRED_KEY


async def test_a_session_made_with_a_key_already_retiring_ends_when_the_key_does() -> None:
    """bob's offer, signed before he rotated his key, is answered after: the session used to
    last its whole lifetime (key_changed shortens only the sessions there were)."""
    clock = Clock()
    a, b = await pair(clock)
    pending = await b.offer_session("bob", "alice")
    await b.rotate_key("bob", grace=60)  # the key that signed the offer retires in 60 s
    await a.add_identity(b.identity("bob"))
    session_a, answer = await a.accept_session("alice", pending.offer.to_bytes())
    session_b = await b.complete_session(pending, answer)
    retire_at = b.registry.keys[pending.offer.initiator_key_id].retire_at
    assert retire_at is not None
    assert session_a.expires_at == session_b.expires_at == retire_at
    clock.advance(61)
    assert b.sessions.for_pair("bob", "alice", clock.now) is None  # bob signs with his new key
    assert a.verify_envelope(sealed(session_b, "bob", "alice", at=clock.now)).reason == Reason.RETIRED_KEY


async def test_a_handshake_whose_key_retired_before_it_completed_is_refused_and_kept_nowhere() -> None:
    """alice's offer is answered after her key was rotated with no grace: the session would be
    over before it began (completing it raised ValueError and kept it)."""
    clock = Clock()
    a, b = await pair(clock)
    pending = await a.offer_session("alice", "bob")
    await a.rotate_key("alice", grace=0)
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())  # bob has not heard
    with pytest.raises(SessionError, match="revoked or retired"):
        await a.complete_session(pending, answer)
    assert a.verifier.sessions == {}
    assert a.sessions.for_pair("alice", "bob", clock.now) is None


async def test_no_handshake_is_signed_with_a_key_revoked_from_a_time_now_past() -> None:
    clock = Clock()
    a, b = await pair(clock)
    key_id = b.identity("bob").key_id
    await b.revoke_key(key_id, at=clock.now / 10**9 + 1)
    clock.advance(2)
    pending = await a.offer_session("alice", "bob")
    with pytest.raises(UnknownAgent):
        await b.accept_session("bob", pending.offer.to_bytes())
    with pytest.raises(UnknownAgent):
        await b.offer_session("bob", "alice")
    assert b.verifier.sessions == {}


async def test_the_middleware_stops_sealing_with_a_session_of_a_revoked_key() -> None:
    a, b, _, _ = await established()
    sent: list[Envelope] = []

    async def call_next(env: Envelope) -> None:
        sent.append(env)

    middleware = a.middleware()
    await middleware.on_publish(envelope("alice", "bob"), call_next)
    assert sent[-1].sig is not None
    assert sent[-1].sig.scheme == "iatp-session-v1"
    await a.revoke_key(b.identity("bob").key_id, "compromised")  # alice no longer trusts bob's key
    await middleware.on_publish(envelope("alice", "bob"), call_next)
    assert sent[-1].sig is not None
    assert sent[-1].sig.scheme == "ed25519"  # signed, not sealed with the dead session
    await a.revoke_key(a.identity("alice").key_id, "compromised")
    with pytest.raises(SigningRejected):
        await middleware.on_publish(envelope("alice", "bob"), call_next)


def _window_session() -> Session:
    return Session("s" * 32, "bob", "alice", b"k" * 32, b"k" * 32, 2**62, "kb", "ka")


@given(
    st.lists(
        st.one_of(
            st.integers(-3, 3 * WINDOW),  # near the start, and around the window's edge
            st.integers(2**63 - 3 * WINDOW, 2**64 - 1),  # the 8-byte counter's top
        ),
        max_size=300,
    )
)
@settings(max_examples=300, deadline=None)
def test_the_counter_window_accepts_exactly_what_a_model_of_it_does(counters: list[int]) -> None:
    """Each counter is accepted once while it is within WINDOW of the highest accepted one;
    not at all below that, nor zero or less (the rule in docs/trust.md, as a set of seen
    counters)."""
    session = _window_session()
    seen: set[int] = set()
    high = 0
    for counter in counters:
        want = counter > 0 and counter not in seen and counter > high - WINDOW
        assert session.accept_counter(counter) is want, (counter, high)
        if want:
            seen.add(counter)
            high = max(high, counter)


def test_the_counter_window_per_scope_and_at_its_edges() -> None:
    session = _window_session()
    assert session.accept_counter(5, "a")
    assert session.accept_counter(5, "b")  # scopes apart
    assert not session.accept_counter(5, "a")
    assert session.accept_counter(5 + WINDOW - 1, "a")
    assert session.accept_counter(6, "a")  # the oldest counter the window still holds
    assert not session.accept_counter(5, "a")  # fell out of it
    assert session.accept_counter(10 * WINDOW, "a")  # a jump clears every slot ...
    assert not session.accept_counter(6 + WINDOW, "a")  # ... and what it left behind is too old
    assert session.accept_counter(9 * WINDOW + 1, "a")
    assert not session.accept_counter(9 * WINDOW + 1, "a")


@pytest.mark.parametrize("start", [1, 7, 8, 1000, 1023, 1024, 2047])
def test_every_jump_clears_exactly_the_counters_it_skips(start: int) -> None:
    """After counters at every third place below ``start`` and a jump of each size (within a
    byte, across bytes, wrapping round the ring, past the window), each counter of the new
    window is accepted once exactly when the model says so."""
    gaps = [*range(1, 20), *range(20, WINDOW + 2, 37), *range(WINDOW - 10, WINDOW + 2)]
    for gap in gaps:
        session = _window_session()
        seen = {c for c in range(max(1, start - WINDOW + 1), start + 1) if c % 3 == 0 or c == start}
        for counter in sorted(seen):
            assert session.accept_counter(counter)
        top = start + gap
        assert session.accept_counter(top)
        seen.add(top)
        for counter in range(max(1, top - WINDOW - 2), top + 1):
            want = counter not in seen and counter > top - WINDOW
            assert session.accept_counter(counter) is want, (gap, counter)


def test_windows_gone_quiet_are_dropped_and_their_scopes_still_refuse_replays() -> None:
    session = _window_session()
    for counter in (1, 2, 3, 7):
        assert session.accept_counter(counter, "first")
    for counter in range(2000, 2000 + 3 * WINDOW):  # "first" goes quiet
        assert session.accept_counter(counter, "busy")
    for i in range(MAX_SCOPES - 1):  # the scope reaching the bound drops the quiet windows
        assert session.accept_counter(5000 + i, f"scope {i}")
    assert "first" not in session._windows
    assert "busy" in session._windows
    assert len(session._windows) == MAX_SCOPES
    # "first" again: a new window starting at the floor (7), every counter up to it taken as seen
    for replay in (1, 2, 3, 7):
        assert not session.accept_counter(replay, "first")
    assert not session.accept_counter(5, "first")  # never seen, but below the floor: refused
    assert session.accept_counter(8, "first")  # above it: accepted, once
    assert not session.accept_counter(8, "first")
    assert session.accept_counter(7 + WINDOW - 3, "first")
    assert session.accept_counter(9, "first")  # skipped by that jump and within the window
    busy_top = 2000 + 3 * WINDOW - 1
    assert not session.accept_counter(busy_top - WINDOW + 1, "busy")  # seen: the window kept as it was
    assert session.accept_counter(busy_top + 1, "busy")


def test_scopes_that_come_and_go_keep_the_windows_bounded() -> None:
    """A subscription per message (each scope takes one counter and is never seen again): the
    windows stay within MOST_SCOPES, and the dropped scopes refuse their replays."""
    session = _window_session()
    for counter in range(1, MOST_SCOPES + 3 * MAX_SCOPES):
        assert session.accept_counter(counter, f"scope {counter}")
        assert len(session._windows) <= MOST_SCOPES
    assert not session.accept_counter(1, "scope 1")


def test_a_peer_keeping_its_counters_low_cannot_grow_a_session() -> None:
    """A peer reusing counters 1 to 1,000 in every new scope keeps every window from going
    quiet by its counters; the windows still stay within MOST_SCOPES (the longest unused go,
    and what the peer sends below the floor is refused: failing closed)."""
    session = _window_session()
    for i in range(MOST_SCOPES + 3 * MAX_SCOPES):
        session.accept_counter(i % 1000 + 1, f"scope {i}")
        assert len(session._windows) <= MOST_SCOPES


def test_every_live_scope_takes_each_message_however_many_there_are() -> None:
    """Scopes that keep taking the session's messages keep their windows: a message fanned out
    to more than MAX_SCOPES subscriptions, in any order, is taken by each (the reviewed bug: a
    bound on live windows refused some of them every message)."""
    session = _window_session()
    scopes = list(range(MAX_SCOPES + 300))
    for counter in (1, 2, 3, 5, 4, *range(6, 40)):
        scopes.reverse()
        taken = [session.accept_counter(counter, scope) for scope in scopes]
        assert all(taken), counter
    assert not any(session.accept_counter(4, scope) for scope in scopes)


def test_new_scopes_do_not_drop_the_window_of_an_old_scope_still_in_use() -> None:
    session = _window_session()
    assert session.accept_counter(1, "live")  # the oldest window, and still in use
    for i in range(MOST_SCOPES + MAX_SCOPES):  # windows of subscriptions that ended since
        assert session.accept_counter(2 + i, f"dead {i}")
        if i % 100 == 0:
            assert session.accept_counter(10_000 + i, "live")
    assert "live" in session._windows
    assert "dead 0" not in session._windows  # dropped: its replay is still refused
    assert not session.accept_counter(2, "dead 0")
    assert session.accept_counter(20_000, "live")
    assert session.accept_counter(20_000, "new")  # the same message fanned out to both


def test_scopes_draining_their_backlogs_one_after_another_each_take_every_message() -> None:
    """Each subscription's task takes its whole queue before the next one runs (the bus with
    many subscriptions to one topic): the scopes that drained first are not quiet."""
    session = _window_session()
    for scope in range(MAX_SCOPES + 6):
        taken = [session.accept_counter(counter, scope) for counter in range(1, 31)]
        assert all(taken), scope


def test_a_live_scope_that_fell_behind_takes_its_backlog_in_order() -> None:
    """A slow subscription's window is dropped while reply inboxes come and go; when it catches
    up, its window starts from its own highest counter, not from the others' floor."""
    session = _window_session()
    for counter in range(1, 101):
        assert session.accept_counter(counter, "slow")
    for counter in range(101, 2801):  # a new inbox per reply
        assert session.accept_counter(counter, f"inbox {counter}")
    assert "slow" not in session._windows
    assert all(session.accept_counter(counter, "slow") for counter in range(101, 391))
    assert not session.accept_counter(100, "slow")  # its own replays are still refused


def test_a_look_for_quiet_windows_leaves_room_for_128_new_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Near MOST_SCOPES, a look that dropped only a few windows left room for fewer new scopes,
    and each new scope scanned every window again."""
    session = _window_session()
    looks = [0]
    drop = Session._drop_quiet_windows

    def counted(self: Session) -> None:
        looks[0] += 1
        drop(self)

    monkeypatch.setattr(Session, "_drop_quiet_windows", counted)
    top = 5000
    for i in range(MOST_SCOPES - 1):  # live scopes, all taking the newest counter
        assert session.accept_counter(top, ("live", i))
    looks[0] = 0
    for j in range(2000):  # each new scope takes one old counter, then goes quiet
        session.accept_counter(2000 + j, ("new", j))
        assert len(session._windows) <= MOST_SCOPES
    assert looks[0] <= 2000 // (MAX_SCOPES // 8) + 1


def test_an_ended_scope_still_refuses_replays_and_takes_what_it_did_not_see() -> None:
    """A handler draining its own subscription lets its queue run out after the subscription
    has stopped, in any order: what is delivered then is checked against the scope's window
    as it was (a replay refused, a counter overtaken in flight taken), and against its highest
    counter once more scopes have ended since."""
    session = _window_session()
    for counter in (3, 5, 9):
        assert session.accept_counter(counter, "s")
    session.end_scope("s")
    assert "s" not in session._windows
    assert not session.accept_counter(5, "s")
    assert not session.accept_counter(9, "s")
    assert session.accept_counter(4, "s")  # overtaken by 5 and 9, never seen: taken
    assert session.accept_counter(10, "s")
    session.end_scope("s")
    for i in range(200):  # more ended since: "s" keeps only its highest counter
        assert session.accept_counter(100 + i, f"other {i}")
        session.end_scope(f"other {i}")
    assert not session.accept_counter(10, "s")
    assert not session.accept_counter(6, "s")  # never seen, but at or below its highest
    assert session.accept_counter(11, "s")
