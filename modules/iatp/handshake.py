"""The session handshake (the protocol and its guarantees: ``docs/trust.md``, "Sessions")."""

from __future__ import annotations

import hmac
import itertools
from collections import deque
from dataclasses import replace
from typing import Final

from agent_os.iatp import _crypto
from agent_os.iatp.errors import SessionError, UnknownAgent
from agent_os.iatp.replay import OK
from agent_os.iatp.session import (
    PendingSession,
    Session,
    SessionAnswer,
    SessionConfirmation,
    SessionOffer,
    derive_keys,
    new_session_id,
    offer_digest,
    shared_secret,
)
from agent_os.iatp.verifier import EnvelopeVerifier

MAX_SESSIONS_PER_PAIR: Final = 8
"""Sessions kept per (local agent, peer): a handshake beyond them closes one (see
:func:`_to_close`)."""
MAX_UNCONFIRMED: Final = 4
"""Sessions of a pair the peer is not known to hold that a full pair keeps (see _to_close)."""


class SessionManager:
    """Creates sessions between local and known agents and keeps the live ones.

    What it keeps is bounded: at most :data:`MAX_SESSIONS_PER_PAIR` sessions per pair of
    agents (a handshake beyond them closes the pair's expired sessions, then one chosen by
    :func:`_to_close`: a peer handshaking in a loop replaces its own sessions, it does not add
    to them), and expired sessions are dropped by the handshakes that follow (each a quarter
    of a lifetime after the last sweep, at most)."""

    def __init__(self, verifier: EnvelopeVerifier, lifetime_ns: int) -> None:
        self.verifier = verifier
        self.registry = verifier.registry
        self.lifetime_ns = lifetime_ns
        self.by_pair: dict[tuple[str, str], Session] = {}
        self._kept: dict[tuple[str, str], deque[Session]] = {}  # (local, peer) -> oldest first
        self._sweep_at = 0  # when the next handshake drops the expired sessions
        self._offers = itertools.count(1)  # PendingSession.order

    def _check_signer(
        self, agent_id: str, key_id: str, data: bytes, signature: bytes, ts: int, what: str
    ) -> None:
        record = self.registry.agents.get(agent_id)
        key = self.registry.keys.get(key_id)
        if record is None or key is None or key.agent_id != agent_id:
            raise SessionError(f"{what} signed by an unknown agent or key")
        now = self.verifier.clock()
        if key.state(now, ts) != "valid":
            raise SessionError(f"{what} signed by a {key.state(now, ts)} key")
        self._check_time(ts, now, what)
        if not _crypto.verify(key.public_key, data, signature):
            raise SessionError(f"{what} has a bad signature")

    def _check_time(self, ts: int, now: int, what: str) -> None:
        """Raise SessionError unless ``ts`` is one a message could carry at ``now`` (clock
        skew, max age), as every handshake message must."""
        if not now - self.verifier.max_age_ns <= ts <= now + self.verifier.skew_ns:
            raise SessionError(f"{what} is stale or future-dated")

    def offer(self, local: str, peer: str) -> PendingSession:
        """Start a session from local agent ``local`` to ``peer``; raises UnknownAgent."""
        key_id, secret = self.verifier.signing_key(local)
        if type(peer) is not str or peer not in self.registry.agents:
            raise UnknownAgent(str(peer))
        eph_public, eph_secret = _crypto.x25519_keypair()
        offer = SessionOffer(new_session_id(), local, key_id, peer, eph_public, self.verifier.clock())
        return PendingSession(
            replace(offer, signature=_crypto.sign(secret, offer.signed_bytes())),
            eph_secret,
            next(self._offers),
        )

    def accept(self, local: str, offer: SessionOffer) -> tuple[Session, SessionAnswer]:
        """Answer an offer addressed to local agent ``local``; raises SessionError or UnknownAgent."""
        if offer.responder != local:
            raise SessionError(f"the offer is addressed to {offer.responder!r}, not {local!r}")
        key_id, secret = self.verifier.signing_key(local)
        self._check_signer(
            offer.initiator,
            offer.initiator_key_id,
            offer.signed_bytes(),
            offer.signature,
            offer.timestamp,
            "session offer",
        )
        eph_public, eph_secret = _crypto.x25519_keypair()
        shared = shared_secret(eph_secret, offer.ephemeral)
        answer = SessionAnswer(
            offer.session_id, local, key_id, eph_public, offer_digest(offer), self.verifier.clock()
        )
        answer = replace(answer, signature=_crypto.sign(secret, answer.signed_bytes()))
        if (
            self.verifier.nonces.check_and_add(
                ("session-offer", offer.session_id), offer.timestamp, self.verifier.clock()
            )
            != OK
        ):
            raise SessionError("session offer replayed")
        i2r, r2i = derive_keys(shared, offer, answer)
        session = self._install(
            offer.session_id.hex(),
            local,
            offer.initiator,
            send=r2i,
            recv=i2r,
            keys=(key_id, offer.initiator_key_id),
            initiator=False,
        )
        return session, answer

    def complete(self, pending: PendingSession, answer: SessionAnswer) -> Session:
        """Finish the initiator's side with the responder's answer; raises SessionError."""
        if not isinstance(pending, PendingSession):
            raise SessionError(
                f"a session is completed from its PendingSession, not {type(pending).__name__}"
            )
        offer = pending.offer
        if answer.session_id != offer.session_id or answer.responder != offer.responder:
            raise SessionError("the answer does not belong to this offer")
        if not hmac.compare_digest(answer.offer_digest, offer_digest(offer)):
            raise SessionError("the answer was made for a different offer")
        self._check_signer(
            answer.responder,
            answer.responder_key_id,
            answer.signed_bytes(),
            answer.signature,
            answer.timestamp,
            "session answer",
        )
        shared = shared_secret(pending.ephemeral_secret, answer.ephemeral)
        i2r, r2i = derive_keys(shared, offer, answer)
        pending.ephemeral_secret = b""
        return self._install(
            offer.session_id.hex(),
            offer.initiator,
            offer.responder,
            send=i2r,
            recv=r2i,
            keys=(offer.initiator_key_id, answer.responder_key_id),
            initiator=True,
            order=pending.order,
        )

    def confirmation(self, session: Session) -> SessionConfirmation:
        """The initiator's confirmation of ``session``, the one this side seals in to the peer
        (confirming another would let the peer seal in a session this side may close first).
        Raises SessionError otherwise."""
        if not isinstance(session, Session):
            raise SessionError(f"a session is confirmed, not {type(session).__name__}")
        now = self.verifier.clock()
        if self.by_pair.get((session.local, session.peer)) is not session or now >= session.expires_at:
            raise SessionError("only the live session this side seals in is confirmed")
        return session.confirmation(now)

    def confirm(self, local: str, confirmation: SessionConfirmation) -> Session:
        """Take the initiator's confirmation (:meth:`confirmation`) of a session ``local``
        answered: the session is one the peer holds, and ``local`` seals in it as after a
        message in it (see :meth:`_heard`). Its time is checked as a message's (skew, age).
        Repeating one is harmless. Raises SessionError when it matches no live session
        ``local`` answered, is stale or future-dated, or its tag is wrong."""
        now = self.verifier.clock()
        self._check_time(confirmation.timestamp, now, "the session confirmation")
        session = self.verifier.sessions.get((confirmation.session_id.hex(), confirmation.initiator))
        if (
            confirmation.responder != local
            or session is None
            or session.local != local
            or now >= session.expires_at
            or not session.confirm(confirmation)
        ):
            raise SessionError("the confirmation matches no live session this side answered")
        return session

    def _install(
        self,
        sid: str,
        local: str,
        peer: str,
        *,
        send: bytes,
        recv: bytes,
        keys: tuple[str, str],
        initiator: bool,
        order: int = 0,
    ) -> Session:
        if (sid, peer) in self.verifier.sessions:  # live, or expired and not swept yet
            raise SessionError("the session id is in use")
        now = self.verifier.clock()
        interval = max(self.lifetime_ns // 4, 1)
        # (a clock that stepped back does not hold the sweep off until it catches up)
        if now >= self._sweep_at or now < self._sweep_at - interval:
            self._sweep_at = now + interval
            for old in list(self.verifier.sessions.values()):
                if now >= old.expires_at:
                    self.close(old)
        # As key_changed does for sessions made before: no later than either handshake key's
        # revocation or retirement already set (a rotation before the handshake, say).
        expires_at = now + self.lifetime_ns
        for key_id in keys:
            key = self.registry.keys.get(key_id)
            end = None if key is None else _end_of(key.revoked_at, key.retire_at)
            if end is not None and end < expires_at:
                expires_at = end
        if expires_at <= now:  # a handshake key revoked or retired already (a rotation meanwhile)
            raise SessionError("a key of the handshake is revoked or retired")
        session = Session(sid, local, peer, send, recv, expires_at, keys[0], keys[1], initiator, order)
        pair = (local, peer)
        for old in [old for old in self._kept.get(pair, ()) if now >= old.expires_at]:
            self.close(old)
        kept = self._kept.setdefault(pair, deque())
        kept.append(session)
        self.verifier.sessions[(sid, peer)] = session
        # The session to seal in, one the peer is known to hold: on completing an offer, the
        # live one this side offered last (answers to racing offers may come in any order, and
        # the responder keeps the newest offers; the one offered last may not be the one just
        # completed). One answered waits for the peer's first message in it (_heard): the
        # answer may never reach the initiator, and until then this side seals as before.
        if initiator:
            offered = [old for old in kept if old.initiator and now < old.expires_at]
            session_to_seal = max(offered, key=lambda old: old.order)
            self.by_pair[pair] = session_to_seal
        else:
            session._on_heard = self._heard
        while len(kept) > MAX_SESSIONS_PER_PAIR:
            self.close(_to_close(kept, self.by_pair.get(pair)))
        return session

    def _heard(self, session: Session) -> None:
        """A session this side answered is confirmed (the peer sent in it): seal in it from now
        on, unless this side answered a later offer since (the peer may have moved on and
        closed this one: wait for its message in the later one) or already seals in a live
        session made after it (a later answer confirmed first, or an offer of this side's
        completed since)."""
        session._on_heard = None
        pair = (session.local, session.peer)
        kept = self._kept.get(pair)
        now = self.verifier.clock()
        if kept is None or session not in kept or now >= session.expires_at:
            return  # closed or expired meanwhile
        at = kept.index(session)
        if any(not later.initiator for later in list(kept)[at + 1 :]):
            return
        current = self.by_pair.get(pair)
        if current is None or current not in kept or now >= current.expires_at or kept.index(current) < at:
            self.by_pair[pair] = session

    def for_pair(self, local: str, peer: str | None, now_ns: int) -> Session | None:
        """The live session ``local`` uses to send to ``peer``, if any."""
        if peer is None:
            return None
        session = self.by_pair.get((local, peer))
        if session is None or now_ns >= session.expires_at:
            return None
        return session

    def end_scope(self, scope: object) -> None:
        """``scope`` has ended (its subscription stopped): every session lets its replay window
        go, keeping what still refuses replays into it (see :meth:`Session.end_scope`)."""
        for session in self.verifier.sessions.values():
            session.end_scope(scope)

    def key_changed(self, agent_id: str, now_ns: int) -> None:
        """End or shorten the sessions ``agent_id`` takes part in (as either side) whose
        handshake key of that agent is revoked, retired or gone: closed when that is so at
        ``now_ns``, otherwise made to expire when it will be."""
        keys = self.registry.keys
        for session in list(self.verifier.sessions.values()):
            if session.local == agent_id:
                key = keys.get(session.local_key_id)
            elif session.peer == agent_id:
                key = keys.get(session.peer_key_id)
            else:
                continue
            end = None if key is None else _end_of(key.revoked_at, key.retire_at)
            if key is None or (end is not None and end <= now_ns):
                self.close(session)
            elif end is not None and end < session.expires_at:
                session.expires_at = end

    def close(self, session: Session) -> None:
        session.close()
        pair, key = (session.local, session.peer), (session.session_id, session.peer)
        if self.verifier.sessions.get(key) is session:
            del self.verifier.sessions[key]
        if self.by_pair.get(pair) is session:
            del self.by_pair[pair]
        kept = self._kept.get(pair)
        if kept is not None:
            if session in kept:
                kept.remove(session)
            if not kept:
                del self._kept[pair]


def _to_close(kept: deque[Session], sending: Session | None) -> Session:
    """The session a full pair closes (``kept`` oldest first, the new one last; ``sending``:
    the one this side seals in), the first found of:

    - the oldest this side offered and never sent a message in, but ``sending`` and the last
      it confirmed: the peer seals in a session it answered only once it has heard in it (a
      message or a confirmation, which makes only the last worth keeping);
    - when more than :data:`MAX_UNCONFIRMED` are sessions the peer is not known to hold
      (offers whose answers may never have reached the initiator), the oldest of those: the
      initiator seals in the one it offered last;
    - the oldest the peer is not likely to seal in: neither ``sending``, nor the newest this
      side answered (the peer's last handshake may have made it the session the peer seals
      in, both sides offering at once), nor the newest answered that the peer sent in (its
      last completed offer, while the answer to a later one is on the way).
    """
    vouched = max((s for s in kept if s.initiator and s.vouched), key=lambda s: s.order, default=None)
    for s in kept:
        if s.initiator and not s.sealed and s is not sending and s is not vouched:
            return s
    unconfirmed = [s for s in kept if not s.confirmed]
    if len(unconfirmed) > MAX_UNCONFIRMED:
        return unconfirmed[0]
    spared = {
        id(sending),
        id(next((s for s in reversed(kept) if not s.initiator), None)),
        id(next((s for s in reversed(kept) if not s.initiator and s.confirmed), None)),
    }
    return next(s for s in kept if id(s) not in spared)


def _end_of(revoked_at: int | None, retire_at: int | None) -> int | None:
    if revoked_at is None:
        return retire_at
    return revoked_at if retire_at is None else min(revoked_at, retire_at)
