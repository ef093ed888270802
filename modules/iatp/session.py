"""Session mode: an X25519 session key, authenticated by ed25519 identities, then a keyed
BLAKE2b MAC per message with a counter window (``docs/trust.md``, "Sessions").
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack

from agent_os.amb.envelope import Envelope, Signature
from agent_os.iatp import _crypto
from agent_os.iatp.canonical import (
    ANSWER_DOMAIN,
    OFFER_DOMAIN,
    SESSION_DOMAIN,
    head,
    pack,
    signed_fields,
)
from agent_os.iatp.errors import SessionError

SESSION_SCHEME: Final = "iatp-session-v1"
WINDOW: Final = 1024
_NONE_SEEN: Final = bytes(WINDOW // 8)  # a window's bits, all clear
_ALL_SEEN: Final = b"\xff" * (WINDOW // 8)  # all set
MAX_SCOPES: Final = 1024
"""Replay windows (about 420 bytes each) a session holds before a new scope makes it drop
those gone quiet (see :meth:`Session.accept_counter`), so subscriptions that come and go
cannot grow a session."""
MOST_SCOPES: Final = 4 * MAX_SCOPES
"""Windows a session never holds more of: beyond them the quietest go even if not quiet."""
_MORE_SCOPES: Final = MAX_SCOPES // 8  # new scopes between two looks for quiet windows, at least
_ENDED_KEPT: Final = 128  # ended scopes whose whole window is kept (see Session.end_scope)
OPENED: Final = 0
BAD_MAC: Final = 1
REPLAYED_COUNTER: Final = 2
_compare = hmac.compare_digest
_from_bytes = int.from_bytes


@dataclass(frozen=True, slots=True)
class SessionOffer:
    """The initiator's signed handshake message."""

    session_id: bytes
    initiator: str
    initiator_key_id: str
    responder: str
    ephemeral: bytes
    timestamp: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return pack(
            [
                OFFER_DOMAIN,
                self.session_id,
                self.initiator,
                self.initiator_key_id,
                self.responder,
                self.ephemeral,
                self.timestamp,
            ]
        )

    def to_bytes(self) -> bytes:
        return pack(
            [
                self.session_id,
                self.initiator,
                self.initiator_key_id,
                self.responder,
                self.ephemeral,
                self.timestamp,
                self.signature,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionOffer:
        """Parse; raises SessionError for anything that is not a well-formed offer."""
        f = _fields(data, 7, "offer")
        if not (_is(f, (bytes, str, str, str, bytes, int, bytes)) and len(f[0]) == 16 and len(f[4]) == 32):
            raise SessionError("malformed session offer")
        return cls(*f)


@dataclass(frozen=True, slots=True)
class SessionAnswer:
    """The responder's signed handshake message."""

    session_id: bytes
    responder: str
    responder_key_id: str
    ephemeral: bytes
    offer_digest: bytes
    timestamp: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return pack(
            [
                ANSWER_DOMAIN,
                self.session_id,
                self.responder,
                self.responder_key_id,
                self.ephemeral,
                self.offer_digest,
                self.timestamp,
            ]
        )

    def to_bytes(self) -> bytes:
        return pack(
            [
                self.session_id,
                self.responder,
                self.responder_key_id,
                self.ephemeral,
                self.offer_digest,
                self.timestamp,
                self.signature,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionAnswer:
        """Parse; raises SessionError for anything that is not a well-formed answer."""
        f = _fields(data, 7, "answer")
        if not (_is(f, (bytes, str, str, bytes, bytes, int, bytes)) and len(f[0]) == 16 and len(f[3]) == 32):
            raise SessionError("malformed session answer")
        return cls(*f)


@dataclass(frozen=True, slots=True)
class SessionConfirmation:
    """The initiator's optional third handshake message: proof, under the session's key and
    at ``timestamp``, that it completed the session (see ``IATP.session_confirmation``)."""

    session_id: bytes
    initiator: str
    responder: str
    timestamp: int
    tag: bytes

    def to_bytes(self) -> bytes:
        return pack([self.session_id, self.initiator, self.responder, self.timestamp, self.tag])

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionConfirmation:
        """Parse; raises SessionError for anything that is not a well-formed confirmation."""
        f = _fields(data, 5, "confirmation")
        if not (
            _is(f, (bytes, str, str, int, bytes))
            and len(f[0]) == 16
            and 0 <= f[3] < 2**63
            and len(f[4]) == 32
        ):
            raise SessionError("malformed session confirmation")
        return cls(*f)


_Message = TypeVar("_Message", SessionOffer, SessionAnswer, SessionConfirmation)


def parse_message(kind: type[_Message], message: object) -> _Message:
    """``message`` (its bytes, or one built by hand) as a checked ``kind``; raises
    SessionError for anything else, whatever its type."""
    if isinstance(message, kind):
        try:
            message = message.to_bytes()  # checked as if it came from the wire
        except Exception as exc:  # msgpack raises several unrelated types on odd fields
            raise SessionError(f"malformed {kind.__name__}") from exc
    if not isinstance(message, bytes):
        raise SessionError(f"a {kind.__name__} is bytes, not {type(message).__name__}")
    return kind.from_bytes(message)


# What a confirmation's tag MACs after the session's head: 0xc1 never starts msgpack data, and
# a message's MAC input there starts with its nonce (msgpack bin, 0xc4), so a tag is never a
# message's MAC nor the other way round. The timestamp follows, 8 bytes big-endian.
_CONFIRMED: Final = b"\xc1IATP/1 session-confirmation"


def _fields(data: Any, n: int, what: str) -> list[Any]:
    try:
        fields = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise SessionError(f"malformed session {what}") from exc
    if type(fields) is not list or len(fields) != n:
        raise SessionError(f"malformed session {what}")
    return fields


def _is(fields: list[Any], types: tuple[type, ...]) -> bool:
    return all(type(v) is t for v, t in zip(fields, types, strict=True))


def offer_digest(offer: SessionOffer) -> bytes:
    return hashlib.blake2b(offer.signed_bytes() + offer.signature, digest_size=32).digest()


def derive_keys(shared: bytes, offer: SessionOffer, answer: SessionAnswer) -> tuple[bytes, bytes]:
    """``(initiator->responder key, responder->initiator key)``."""
    transcript = hashlib.blake2b(
        offer.signed_bytes() + offer.signature + answer.signed_bytes() + answer.signature, digest_size=32
    ).digest()
    i2r = hashlib.blake2b(transcript, key=shared, digest_size=32, person=b"iatp-s-i2r").digest()
    r2i = hashlib.blake2b(transcript, key=shared, digest_size=32, person=b"iatp-s-r2i").digest()
    return i2r, r2i


class Session:
    """One established session, seen from ``local``'s side. Not shareable between processes.

    The MAC states are keyed once and have the constant head of the MACed bytes (domain,
    scheme, session id) absorbed already; each message copies one and adds its own bytes.
    """

    __slots__ = (
        "_accepted",
        "_counter",
        "_dropped",
        "_ended",
        "_floor",
        "_heard",
        "_on_heard",
        "_recv_mac",
        "_room",
        "_send_mac",
        "_vouched",
        "_windows",
        "expires_at",
        "initiator",
        "local",
        "local_key_id",
        "order",
        "peer",
        "peer_key_id",
        "session_id",
    )

    def __init__(
        self,
        session_id: str,
        local: str,
        peer: str,
        send_key: bytes,
        recv_key: bytes,
        expires_at: int,
        local_key_id: str,
        peer_key_id: str,
        initiator: bool = False,
        order: int = 0,
    ) -> None:
        self.session_id = session_id
        self.initiator = initiator  # this side offered the session and completed it
        self.order = order  # the initiator's: its offer's PendingSession.order
        self.local = local
        self.peer = peer
        self.expires_at = expires_at
        # The ed25519 keys that authenticated the handshake: the session is only as good as
        # they are, so it ends when either is revoked or retired.
        self.local_key_id = local_key_id
        self.peer_key_id = peer_key_id
        start = head(SESSION_DOMAIN, SESSION_SCHEME, session_id)
        self._send_mac: Any = hashlib.blake2b(start, key=send_key, digest_size=32)
        self._recv_mac: Any = hashlib.blake2b(start, key=recv_key, digest_size=32)
        self._counter = 0
        self._vouched = False  # this side made a confirmation of it (see vouched)
        # scope -> [highest counter, bits seen, self._accepted when it last accepted one]
        self._windows: dict[Any, list[Any]] = {}
        self._accepted = 0  # messages accepted in this session, all scopes: its clock for windows
        self._heard = False  # a message with a valid MAC came in this session (see confirmed)
        # Called once, when _heard turns True: the manager then lets this side seal in it.
        self._on_heard: Callable[[Session], None] | None = None
        self._floor = 0  # the highest counter of a dropped window forgotten (see accept_counter)
        self._dropped: dict[Any, int] = {}  # dropped windows' scopes -> their highest counter
        self._ended: dict[Any, list[Any]] = {}  # the last scopes ended -> their whole window
        self._room = MAX_SCOPES  # windows held before the next look for quiet ones

    def __repr__(self) -> str:
        return f"Session({self.session_id[:8]}…, local={self.local!r}, peer={self.peer!r})"

    def seal(self, env: Envelope) -> None:
        """MAC ``env`` (sent by ``local``) and set its ``sig``; raises SessionError once the
        session is closed, and TypeError/ValueError/OverflowError for a field msgpack cannot
        encode."""
        mac = self._send_mac
        if mac is None:
            raise SessionError("the session is closed")
        self._counter = counter = self._counter + 1
        nonce = counter.to_bytes(8, "big")
        h = mac.copy()
        h.update(signed_fields(env, nonce, env.payload))
        env.sig = Signature(SESSION_SCHEME, self.session_id, nonce, h.digest())

    def confirmation(self, timestamp: int) -> SessionConfirmation:
        """The initiator's confirmation of this session at ``timestamp`` (see
        ``IATP.session_confirmation``, which says which session to confirm). Raises
        SessionError on the responder's side or once the session is closed."""
        mac = self._send_mac
        if not self.initiator or mac is None:
            raise SessionError("only the initiator of a live session confirms it")
        self._vouched = True
        sid = bytes.fromhex(self.session_id)
        return SessionConfirmation(sid, self.local, self.peer, timestamp, _tag(mac, timestamp))

    def confirm(self, confirmation: SessionConfirmation) -> bool:
        """Check the initiator's confirmation tag (constant-time); a valid one confirms the
        session as a message in it does (see :attr:`confirmed`). False on the initiator's side
        or once the session is closed. The caller checks the timestamp."""
        mac = self._recv_mac
        if self.initiator or mac is None or not _compare(_tag(mac, confirmation.timestamp), confirmation.tag):
            return False
        self._hear()
        return True

    def _hear(self) -> None:
        """The peer is known to hold this session: mark it so, and tell the manager once."""
        if not self._heard:
            self._heard = True
            if self._on_heard is not None:
                self._on_heard(self)

    def check_mac(self, env: Envelope, sig: Signature) -> bool:
        """Whether ``sig`` carries the MAC of ``env`` under the receiving key (constant-time
        comparison); False once the session is closed."""
        mac = self._recv_mac
        if mac is None:
            return False
        h = mac.copy()
        h.update(signed_fields(env, sig.nonce, env.payload))
        return hmac.compare_digest(h.digest(), sig.value)

    def open(self, env: Envelope, sig: Signature, scope: Any = None) -> int:
        """Check the MAC (constant-time), then record the counter: :data:`OPENED`,
        :data:`BAD_MAC` (also once the session is closed) or :data:`REPLAYED_COUNTER`. The
        counter is recorded only for a message whose MAC verified."""
        mac = self._recv_mac
        if mac is None:
            return BAD_MAC
        nonce = sig.nonce
        h = mac.copy()
        h.update(signed_fields(env, nonce, env.payload))
        if not _compare(h.digest(), sig.value):
            return BAD_MAC
        return OPENED if self.accept_counter(_from_bytes(nonce, "big"), scope) else REPLAYED_COUNTER

    def accept_counter(self, counter: int, scope: Any = None) -> bool:
        """Record ``counter``; False if it was seen or fell out of the window (a replay).

        Windows that went quiet are dropped (``docs/trust.md``, "Sessions", says when and what
        it costs): when a new scope finds :data:`MAX_SCOPES` windows or more, those that took
        none of the session's last WINDOW counters go, and beyond MOST_SCOPES less 128 those
        that accepted a message least recently (by this side's count, which the peer cannot
        hold back). A dropped scope's highest counter is remembered: its next window starts
        there, every counter up to it taken as seen, so a replay into it is still refused.
        Beyond MOST_SCOPES remembered, the oldest are forgotten into a floor that windows of
        scopes not remembered start from."""
        if counter <= 0:
            return False
        windows = self._windows
        window = windows.get(scope)
        if window is None:
            if len(windows) >= self._room:
                self._drop_quiet_windows()
            self._hear()  # only after a valid MAC (see open); windows may end, this stays
            window = self._ended.pop(scope, None)
            if window is None:
                floor = self._dropped.pop(scope, self._floor)
                window = [floor, bytearray(_ALL_SEEN if floor else _NONE_SEEN), self._accepted]
            windows[scope] = window
        high, seen, _ = window
        # Bit c % WINDOW of ``seen`` says whether counter c was accepted, for every c in
        # (high - WINDOW, high]: a new highest counter takes over the bits of the counters it
        # skipped (cleared) and its own (set); an older one is checked and set in its bit.
        slot = counter % WINDOW
        byte, bit = slot >> 3, 1 << (slot & 7)
        if counter > high:
            gap = counter - high
            if gap >= WINDOW:
                seen[:] = _NONE_SEEN
            elif gap > 1:
                first = (high + 1) % WINDOW
                if first + gap - 1 <= WINDOW:
                    _clear(seen, first, first + gap - 1)
                else:
                    _clear(seen, first, WINDOW)
                    _clear(seen, 0, first + gap - 1 - WINDOW)
            seen[byte] |= bit
            window[0] = counter
            self._accepted = window[2] = self._accepted + 1
            return True
        if high - counter >= WINDOW or seen[byte] & bit:
            return False
        seen[byte] |= bit
        self._accepted = window[2] = self._accepted + 1
        return True

    def end_scope(self, scope: Any) -> None:
        """``scope`` has ended (its subscription stopped): its window leaves the windows held.
        The last :data:`_ENDED_KEPT` ended are kept whole, since a message may still be
        delivered in one (a handler draining its own subscription lets its queue run out, in
        any order); older ones keep only their highest counter, as a window dropped does (see
        accept_counter). Either way a replay of what the scope took is still refused."""
        window = self._windows.pop(scope, None)
        if window is None:
            return
        ended = self._ended
        ended[scope] = window
        if len(ended) > _ENDED_KEPT:
            oldest = next(iter(ended))
            self._remember(oldest, ended.pop(oldest)[0])

    def _remember(self, scope: Any, high: int) -> None:
        """Keep ``high`` as ``scope``'s remembered highest counter; beyond MOST_SCOPES remembered,
        the oldest are forgotten into the floor."""
        dropped = self._dropped
        dropped[scope] = high  # not there already: a scope is in one of windows, ended, dropped
        while len(dropped) > MOST_SCOPES:
            self._floor = max(self._floor, dropped.pop(next(iter(dropped))))

    def _drop_quiet_windows(self) -> None:
        """Drop the windows gone quiet, and the longest unused others beyond MOST_SCOPES less
        128, remembering each one's highest counter (the oldest remembered beyond MOST_SCOPES
        are forgotten into the floor); set when to look again (see accept_counter)."""
        windows = self._windows
        # Quiet: none of the session's last WINDOW counters taken (a scope that drained its
        # queue before the others did is not quiet: it has taken the newest counters too).
        quiet_until = max(window[0] for window in windows.values()) - WINDOW
        quiet = [key for key, window in windows.items() if window[0] <= quiet_until]
        excess = len(windows) - len(quiet) - (MOST_SCOPES - _MORE_SCOPES)
        if excess > 0:
            dropping = set(quiet)
            live = [key for key in windows if key not in dropping]
            quiet += sorted(live, key=lambda key: windows[key][2])[:excess]
        for key in quiet:
            self._remember(key, windows.pop(key)[0])
        self._room = max(MAX_SCOPES, len(windows) + _MORE_SCOPES)

    @property
    def sealed(self) -> bool:
        """True once this side has sealed a message in this session."""
        return self._counter > 0

    @property
    def vouched(self) -> bool:
        """True once this side (the initiator) has made a confirmation of this session."""
        return self._vouched

    @property
    def confirmed(self) -> bool:
        """True when the peer is known to hold this session: this side completed the handshake
        (the initiator), or received a message with a valid MAC in it, in any scope, ended or
        not, or the initiator's confirmation (a message this side sealed proves nothing: the
        answer to the offer may never have reached the initiator)."""
        return self.initiator or self._heard

    def close(self) -> None:
        """Forget the keys; later messages in this session fail."""
        self._send_mac = self._recv_mac = None
        self._on_heard = None
        self.expires_at = 0


@dataclass(slots=True)
class PendingSession:
    """The initiator's half-open session: send ``offer.to_bytes()``, then complete with the answer."""

    offer: SessionOffer
    ephemeral_secret: bytes
    order: int = 0
    """Which offer of this process it is (later offers are higher): of the sessions completed,
    the initiator seals in the one offered last, whatever order the answers came in."""

    def __repr__(self) -> str:
        return f"PendingSession(initiator={self.offer.initiator!r}, responder={self.offer.responder!r})"


def _tag(mac: Any, timestamp: int) -> bytes:
    """A confirmation's tag: ``mac`` (a session's MAC state, its head absorbed) over
    _CONFIRMED and the timestamp."""
    h = mac.copy()
    h.update(_CONFIRMED + timestamp.to_bytes(8, "big"))
    return bytes(h.digest())


def new_session_id() -> bytes:
    return os.urandom(16)


def shared_secret(secret: bytes, peer_public: bytes) -> bytes:
    try:
        return _crypto.x25519(secret, peer_public)
    except ValueError as exc:
        raise SessionError(f"session key agreement failed: {exc}") from exc


def _clear(seen: bytearray, lo: int, hi: int) -> None:
    """Clear bits ``lo`` to ``hi - 1`` of ``seen`` (``0 <= lo < hi <= WINDOW``)."""
    first, last = lo >> 3, (hi - 1) >> 3
    low = (1 << (lo & 7)) - 1  # the bits below lo in its byte, kept
    high = 0xFF ^ ((1 << (((hi - 1) & 7) + 1)) - 1)  # the bits above hi - 1 in its byte, kept
    if first == last:
        seen[first] &= low | high
        return
    seen[first] &= low
    seen[first + 1 : last] = _NONE_SEEN[: last - first - 1]
    seen[last] &= high
