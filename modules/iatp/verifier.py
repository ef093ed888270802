"""Signing and verification of envelopes: the hot path.

Verification checks, in order (cheap checks first, the signature before anything is
remembered, so a forger cannot fill the nonce cache):

1. a signature block is present and well-formed (types, scheme, nonce and signature lengths);
2. the envelope fields it covers have the types the canonical encoding needs;
3. the sender is known; the key is known and belongs to the sender (session: the session is
   live and its peer is the sender);
4. the key is not revoked (at the check time or the message's time) nor retired;
5. the timestamp lies in ``[now - max_age, now + clock_skew]`` and ``expires_at`` has not passed;
6. the ed25519 signature (or session MAC) verifies over the canonical bytes;
7. the nonce (or session counter) has not been seen within the window;
8. the trust level is computed from the trust model.

It never raises: any failure, including an unexpected exception while reading a hostile object
and a missing PyNaCl, gives an invalid result with a reason. It never reports valid without
having run the signature check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, Final

from amb.envelope import Envelope, Signature
from iatp import _crypto
from iatp.canonical import envelope_bytes
from iatp.errors import CryptoUnavailable, UnknownAgent
from iatp.models import TrustModel
from iatp.registry import KeyRegistry
from iatp.replay import BELOW_FLOOR, REPLAYED, NonceCache
from iatp.result import Reason, VerificationResult, invalid
from iatp.session import SESSION_SCHEME, Session
from iatp.trust import TrustStore

ED25519: Final = "ed25519"
NONCE_BYTES: Final = 16
TRUST_CACHE_NS: Final = 1_000_000_000  # expiry-driven trust changes show within one second


class TrustEngine:
    """The trust model over a store, cached per (viewer, sender, key) for up to one second;
    explicit changes (edges, certificates, roots, key states) take effect at once."""

    def __init__(self, model: TrustModel, store: TrustStore) -> None:
        self.model = model
        self.store = store
        self._cache: dict[tuple[str | None, str, str | None], tuple[float, int, int, int]] = {}

    def level(self, viewer: str | None, sender: str, key_id: str | None, now_ns: int) -> float:
        key = (viewer, sender, key_id)
        hit = self._cache.get(key)
        store = self.store
        if (
            hit is not None
            and hit[1] == store.version
            and hit[2] == store.registry.version
            and now_ns - hit[3] < TRUST_CACHE_NS
        ):
            return hit[0]
        value = self.model.level(store, viewer, sender, key_id, now_ns)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = (value, store.version, store.registry.version, now_ns)
        return value

    def permissions(self, from_agent: str, to_agent: str, now_ns: int) -> frozenset[str]:
        return self.model.permissions(self.store, from_agent, to_agent, now_ns)


class EnvelopeVerifier:
    """Signs and verifies envelopes with a registry, a nonce cache and a trust engine."""

    def __init__(
        self,
        registry: KeyRegistry,
        trust: TrustEngine,
        *,
        clock_skew: float = 30.0,
        max_age: float = 300.0,
        max_nonces: int = 1_000_000,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if clock_skew < 0 or max_age <= 0:
            raise ValueError("clock_skew must be >= 0 and max_age > 0")
        self.registry = registry
        self.trust = trust
        self.skew_ns = int(clock_skew * 1e9)
        self.max_age_ns = int(max_age * 1e9)
        self.nonces = NonceCache(self.max_age_ns + self.skew_ns, max_nonces)
        self.sessions: dict[tuple[str, str], Session] = {}  # (session id, peer) -> receiving side
        self.clock = clock
        self.perspective: str | None = None

    # -- signing -----------------------------------------------------------------------------

    def sign(self, env: Envelope) -> None:
        """Sign ``env`` as its sender, setting ``env.sig``.

        Raises UnknownAgent when no signing key for the sender is held here, CryptoUnavailable
        without PyNaCl, and TypeError/ValueError/OverflowError for a field msgpack cannot encode.
        """
        held = self.registry.signing_key(env.sender)
        if held is None:
            raise UnknownAgent(env.sender, "signing key")
        key_id, secret = held
        revoked_at = self.registry.keys[key_id].revoked_at
        if revoked_at is not None and self.clock() >= revoked_at:
            raise UnknownAgent(env.sender, "unrevoked signing key")
        nonce = _crypto.random_bytes(NONCE_BYTES)
        value = _crypto.sign(secret, envelope_bytes(env, ED25519, key_id, nonce))
        env.sig = Signature(ED25519, key_id, nonce, value)

    # -- verifying ---------------------------------------------------------------------------

    def verify(
        self,
        env: Any,
        *,
        viewer: str | None = None,
        scope: Hashable = None,
        redelivery: bool = False,
    ) -> VerificationResult:
        """Verify ``env`` (see the module docstring); never raises.

        ``viewer`` is whose trust the web model measures: default ``perspective``, else the
        envelope's recipient if it is a local agent (a sender cannot pick a remote viewer);
        ``scope`` separates replay tracking (the bus passes the subscription); ``redelivery``
        (the broker says this is a repeated delivery) lets an already-seen nonce pass.
        """
        try:
            return self._verify(env, viewer, scope, redelivery)
        except CryptoUnavailable as exc:
            return invalid(Reason.CRYPTO_UNAVAILABLE, getattr(env, "sender", None), None, None, str(exc))
        except Exception as exc:  # fail closed on anything a hostile object can provoke
            return invalid(
                Reason.MALFORMED_ENVELOPE, getattr(env, "sender", None), None, None, f"{type(exc).__name__}"
            )

    def _verify(self, env: Any, viewer: str | None, scope: Hashable, redelivery: bool) -> VerificationResult:
        if not isinstance(env, Envelope):
            return invalid(Reason.MALFORMED_ENVELOPE, None, None, None, "not an envelope")
        sig = env.sig
        sender = env.sender
        ts = env.timestamp
        if sig is None:
            return invalid(Reason.UNSIGNED, sender, ts)
        if not (
            type(sig) is Signature
            and type(sig.scheme) is str
            and type(sig.key_id) is str
            and type(sig.nonce) is bytes
            and type(sig.value) is bytes
        ):
            return invalid(Reason.MALFORMED_SIGNATURE, sender, ts, None, "signature block has wrong types")
        scheme = sig.scheme
        key_id = sig.key_id
        if scheme == ED25519:
            if len(sig.nonce) != NONCE_BYTES or len(sig.value) != _crypto.SIGNATURE_BYTES:
                return invalid(
                    Reason.MALFORMED_SIGNATURE, sender, ts, key_id, "wrong nonce or signature length"
                )
        elif scheme == SESSION_SCHEME:
            if len(sig.nonce) != 8 or len(sig.value) != 32:
                return invalid(Reason.MALFORMED_SIGNATURE, sender, ts, key_id, "wrong counter or MAC length")
        else:
            return invalid(Reason.UNSUPPORTED_SCHEME, sender, ts, key_id, f"scheme {scheme[:40]!r}")
        if (
            type(sender) is not str
            or type(ts) is not int
            or type(env.headers) is not dict
            or (env.expires_at is not None and type(env.expires_at) is not int)
        ):
            return invalid(Reason.MALFORMED_ENVELOPE, sender, ts, key_id, "sender, time, headers or expiry")
        if viewer is None:
            viewer = self.perspective
            recipient = env.recipient
            if viewer is None and type(recipient) is str and self.registry.is_local(recipient):
                viewer = recipient
        now = self.clock()
        if scheme == SESSION_SCHEME:
            return self._verify_session(env, sig, now, viewer, scope)
        if sender not in self.registry.agents:
            return invalid(Reason.UNKNOWN_SENDER, sender, ts, key_id)
        key = self.registry.keys.get(key_id)
        if key is None or key.agent_id != sender:
            return invalid(Reason.UNKNOWN_KEY, sender, ts, key_id, "no such key for this sender")
        state = key.state(now, ts)
        if state != "valid":
            reason = Reason.REVOKED_KEY if state == "revoked" else Reason.RETIRED_KEY
            return invalid(reason, sender, ts, key_id, key.revocation_reason)
        bad_time = self._check_time(env, ts, now)
        if bad_time is not None:
            return invalid(bad_time, sender, ts, key_id)
        if not _crypto.verify(key.public_key, envelope_bytes(env, scheme, key_id, sig.nonce), sig.value):
            return invalid(Reason.BAD_SIGNATURE, sender, ts, key_id)
        seen = self.nonces.check_and_add((scope, sig.nonce), ts, now)
        if seen == REPLAYED and not redelivery:
            return invalid(Reason.REPLAYED, sender, ts, key_id)
        if seen == BELOW_FLOOR:
            return invalid(Reason.REPLAY_WINDOW, sender, ts, key_id, "older than the nonce cache covers")
        level = self.trust.level(viewer, sender, key_id, now)
        return VerificationResult(True, sender, ts, level, None, key_id)

    def _check_time(self, env: Envelope, ts: int, now: int) -> Reason | None:
        if ts > now + self.skew_ns:
            return Reason.CLOCK_SKEW
        if ts < now - self.max_age_ns:
            return Reason.TOO_OLD
        if env.expires_at is not None and now >= env.expires_at:
            return Reason.EXPIRED
        return None

    def _verify_session(
        self, env: Envelope, sig: Signature, now: int, viewer: str | None, scope: Hashable
    ) -> VerificationResult:
        sender, ts, sid = env.sender, env.timestamp, sig.key_id
        session = self.sessions.get((sid, sender))
        if session is None or now >= session.expires_at:
            return invalid(Reason.UNKNOWN_SESSION, sender, ts, sid)
        bad_time = self._check_time(env, ts, now)
        if bad_time is not None:
            return invalid(bad_time, sender, ts, sid)
        if not session.check_mac(env, sig):
            return invalid(Reason.BAD_SIGNATURE, sender, ts, sid, "session MAC")
        if not session.accept_counter(int.from_bytes(sig.nonce, "big"), scope):
            return invalid(Reason.REPLAYED, sender, ts, sid, "session counter")
        level = self.trust.level(viewer or session.local, sender, None, now)
        return VerificationResult(True, sender, ts, level, None, sid)
