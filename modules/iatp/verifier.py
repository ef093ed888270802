"""Signing and verification of envelopes: the hot path.

The checks and their order are in ``docs/trust.md``, "Verification"; verification never raises
and never reports valid without having run the signature check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, Final

from agent_os.amb.envelope import Envelope, Signature
from agent_os.amb.numbers import seconds
from agent_os.iatp import _crypto
from agent_os.iatp.canonical import ENVELOPE_DOMAIN, head, rest_bytes
from agent_os.iatp.errors import CryptoUnavailable, UnknownAgent
from agent_os.iatp.models import TrustModel
from agent_os.iatp.registry import KeyRegistry
from agent_os.iatp.replay import REPLAYED, NonceCache
from agent_os.iatp.result import Reason, VerificationResult, invalid, valid_result
from agent_os.iatp.session import BAD_MAC, SESSION_SCHEME, Session
from agent_os.iatp.trust import TrustStore

ED25519: Final = "ed25519"
NONCE_BYTES: Final = 16
_random = _crypto.random_nonce
TRUST_CACHE_NS: Final = 1_000_000_000  # expiry-driven trust changes show within one second
SignedParts = tuple[bytes, bytes, bytes]
"""What an ed25519 check takes: the public key, the signed bytes, the signature."""


class TrustEngine:
    """The trust model over a store, cached per (viewer, sender, key) for up to one second;
    explicit changes (edges, certificates, roots, key states) take effect at once."""

    def __init__(self, model: TrustModel, store: TrustStore) -> None:
        self.model = model
        self.store = store
        self._cache: dict[tuple[str | None, str, str | None], tuple[float, int, int, int]] = {}

    def level(self, viewer: str | None, sender: str, key_id: str | None, now_ns: int) -> float:
        key = (viewer, sender, key_id)
        store = self.store
        hit = self._cache.get(key)
        if (
            hit is not None
            and now_ns - hit[3] < TRUST_CACHE_NS
            and hit[1] == store.version
            and hit[2] == store.registry.version
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
        seconds(clock_skew, "clock_skew", zero=True, error=ValueError)
        seconds(max_age, "max_age", error=ValueError)
        self.registry = registry
        self.trust = trust
        self.skew_ns = int(clock_skew * 1e9)
        self.max_age_ns = int(max_age * 1e9)
        self.nonces = NonceCache(self.max_age_ns + self.skew_ns, max_nonces)
        self.sessions: dict[tuple[str, str], Session] = {}  # (session id, peer) -> receiving side
        self.clock = clock
        self.perspective: str | None = None
        self._heads: dict[str, bytes] = {}
        self.checks_taken = 0
        """Signature checks done elsewhere that :meth:`verify` took (``checked``)."""

    # -- signing -----------------------------------------------------------------------------

    def sign(self, env: Envelope) -> None:
        """Sign ``env`` as its sender, setting ``env.sig``.

        Raises UnknownAgent when no signing key for the sender is held here, CryptoUnavailable
        without PyNaCl, and TypeError/ValueError/OverflowError for a field msgpack cannot encode.
        """
        key_id, secret = self.signing_key(env.sender)
        nonce = _random(NONCE_BYTES)
        value = _crypto.sign(secret, self._head(key_id) + rest_bytes(env, nonce))
        env.sig = Signature(ED25519, key_id, nonce, value)

    def signing_key(self, agent_id: str) -> tuple[str, bytes]:
        """``(key_id, secret_key)`` a local agent signs with now: its current key, unless that
        is revoked from a time already reached. Raises UnknownAgent otherwise."""
        held = self.registry.signing_key(agent_id) if type(agent_id) is str else None
        if held is None:
            raise UnknownAgent(str(agent_id), "signing key")
        revoked_at = self.registry.keys[held[0]].revoked_at
        if revoked_at is not None and self.clock() >= revoked_at:
            raise UnknownAgent(agent_id, "unrevoked signing key")
        return held

    def _head(self, key_id: str) -> bytes:
        """The constant head of the signed bytes for ``key_id`` (cached; called only for keys
        the registry holds, so the cache is bounded by the keys ever known)."""
        found = self._heads.get(key_id)
        if found is None:
            if len(self._heads) >= 100_000:
                self._heads.clear()
            found = self._heads[key_id] = head(ENVELOPE_DOMAIN, ED25519, key_id)
        return found

    # -- verifying ---------------------------------------------------------------------------

    def signed_parts(self, env: Any) -> SignedParts | None:
        """``(public key, signed bytes, signature)`` of an ed25519-signed envelope whose key is
        a key of its sender held here: what a worker process can check ahead of :meth:`verify`
        (``docs/trust.md``, "Verification in worker processes"); None for anything else.
        Checks nothing else and never raises."""
        try:
            sig = env.sig
            if type(sig) is not Signature or sig.scheme != ED25519 or type(sig.nonce) is not bytes:
                return None
            key_id = sig.key_id
            key = self.registry.keys.get(key_id) if type(key_id) is str else None
            if key is None or key.agent_id != env.sender:
                return None
            return key.public_key, self._head(key_id) + rest_bytes(env, sig.nonce), sig.value
        except Exception:  # whatever a hostile object provokes: verify() reports it
            return None

    def verify(
        self,
        env: Any,
        viewer: str | None = None,
        scope: Hashable = None,
        redelivery: bool = False,
        checked: tuple[bytes, bytes, bytes, bool] | None = None,
    ) -> VerificationResult:
        """Verify ``env`` (see ``docs/trust.md``); never raises.

        ``viewer`` is whose trust the web model measures: default ``perspective``, else the
        envelope's recipient if it is a local agent (a sender cannot pick a remote viewer);
        ``scope`` separates replay tracking (the bus passes the subscription); ``redelivery``
        (the broker says this is a repeated delivery) lets an already-seen nonce pass.
        ``checked`` is a signature check done elsewhere, :meth:`signed_parts` and its answer:
        used in place of the check only if the key, the signed bytes and the signature are
        exactly those of ``env`` now; otherwise the check runs here.
        """
        try:
            return self._verify(env, viewer, scope, redelivery, checked)
        except CryptoUnavailable as exc:
            return invalid(Reason.CRYPTO_UNAVAILABLE, getattr(env, "sender", None), None, None, str(exc))
        except Exception as exc:  # fail closed on anything a hostile object can provoke
            return invalid(
                Reason.MALFORMED_ENVELOPE, getattr(env, "sender", None), None, None, f"{type(exc).__name__}"
            )

    def _verify(
        self,
        env: Any,
        viewer: str | None,
        scope: Hashable,
        redelivery: bool,
        checked: tuple[bytes, bytes, bytes, bool] | None = None,
    ) -> VerificationResult:
        if not isinstance(env, Envelope):
            return invalid(Reason.MALFORMED_ENVELOPE, None, None, None, "not an envelope")
        sig = env.sig
        sender = env.sender
        ts = env.timestamp
        if sig is None:
            return invalid(Reason.UNSIGNED, sender, ts)
        if type(sig) is not Signature:
            return invalid(Reason.MALFORMED_SIGNATURE, sender, ts, None, "signature block has wrong types")
        scheme, key_id, nonce, value = sig.scheme, sig.key_id, sig.nonce, sig.value
        if not (
            type(scheme) is str and type(key_id) is str and type(nonce) is bytes and type(value) is bytes
        ):
            return invalid(Reason.MALFORMED_SIGNATURE, sender, ts, None, "signature block has wrong types")
        if scheme == SESSION_SCHEME:
            if len(nonce) != 8 or len(value) != 32:
                return invalid(Reason.MALFORMED_SIGNATURE, sender, ts, key_id, "wrong counter or MAC length")
        elif scheme == ED25519:
            if len(nonce) != NONCE_BYTES or len(value) != _crypto.SIGNATURE_BYTES:
                return invalid(
                    Reason.MALFORMED_SIGNATURE, sender, ts, key_id, "wrong nonce or signature length"
                )
        else:
            return invalid(Reason.UNSUPPORTED_SCHEME, sender, ts, key_id, f"scheme {scheme[:40]!r}")
        expires_at = env.expires_at
        if (
            type(sender) is not str
            or type(ts) is not int
            or type(env.headers) is not dict
            or (expires_at is not None and type(expires_at) is not int)
        ):
            return invalid(Reason.MALFORMED_ENVELOPE, sender, ts, key_id, "sender, time, headers or expiry")
        now = self.clock()
        if viewer is None:
            viewer = self.perspective
            if viewer is None:
                recipient = env.recipient
                if type(recipient) is str and self.registry.is_local(recipient):
                    viewer = recipient
        if scheme == SESSION_SCHEME:
            session = self.sessions.get((key_id, sender))
            if session is None:
                return invalid(Reason.UNKNOWN_SESSION, sender, ts, key_id)
            # The session is only as good as the peer's key that signed its handshake.
            peer_key = self.registry.keys.get(session.peer_key_id)
            if peer_key is None:
                return invalid(Reason.UNKNOWN_KEY, sender, ts, key_id, "the session's handshake key")
            if peer_key.revoked_at is not None or peer_key.retire_at is not None:
                state = peer_key.state(now, ts)
                if state != "valid":
                    reason = Reason.REVOKED_KEY if state == "revoked" else Reason.RETIRED_KEY
                    return invalid(reason, sender, ts, key_id, peer_key.revocation_reason)
            if now >= session.expires_at:
                return invalid(Reason.UNKNOWN_SESSION, sender, ts, key_id)
            if (
                ts > now + self.skew_ns
                or ts < now - self.max_age_ns
                or (expires_at is not None and now >= expires_at)
            ):
                return invalid(self._bad_time(ts, expires_at, now) or Reason.EXPIRED, sender, ts, key_id)
            opened = session.open(env, sig, scope)
            if opened:
                if opened == BAD_MAC:
                    return invalid(Reason.BAD_SIGNATURE, sender, ts, key_id, "session MAC")
                return invalid(Reason.REPLAYED, sender, ts, key_id, "session counter")
            level = self.trust.level(viewer or session.local, sender, None, now)
            return valid_result(sender, ts, level, key_id)
        registry = self.registry
        if sender not in registry.agents:
            return invalid(Reason.UNKNOWN_SENDER, sender, ts, key_id)
        key = registry.keys.get(key_id)
        if key is None or key.agent_id != sender:
            return invalid(Reason.UNKNOWN_KEY, sender, ts, key_id, "no such key for this sender")
        if key.revoked_at is not None or key.retire_at is not None:
            state = key.state(now, ts)
            if state != "valid":
                reason = Reason.REVOKED_KEY if state == "revoked" else Reason.RETIRED_KEY
                return invalid(reason, sender, ts, key_id, key.revocation_reason)
        bad_time = self._bad_time(ts, expires_at, now)
        if bad_time is not None:
            return invalid(bad_time, sender, ts, key_id)
        public_key = key.public_key
        signed = self._head(key_id) + rest_bytes(env, nonce)
        if (
            checked is not None
            and checked[1] == signed
            and checked[0] == public_key
            and checked[2] == value
            and type(checked[3]) is bool
        ):
            good = checked[3]  # that very check, done elsewhere (a worker process)
            self.checks_taken += 1
        else:
            good = _crypto.verify(public_key, signed, value)
        if not good:
            return invalid(Reason.BAD_SIGNATURE, sender, ts, key_id)
        seen = self.nonces.check_and_add((scope, nonce), ts, now)
        if seen:
            if seen == REPLAYED:
                if not redelivery:
                    return invalid(Reason.REPLAYED, sender, ts, key_id)
            else:  # BELOW_FLOOR
                return invalid(Reason.REPLAY_WINDOW, sender, ts, key_id, "older than the nonce cache covers")
        return valid_result(sender, ts, self.trust.level(viewer, sender, key_id, now), key_id)

    def _bad_time(self, ts: int, expires_at: int | None, now: int) -> Reason | None:
        """Why the time is unacceptable (future beyond the skew, too old, expired), or None."""
        if ts > now + self.skew_ns:
            return Reason.CLOCK_SKEW
        if ts < now - self.max_age_ns:
            return Reason.TOO_OLD
        if expires_at is not None and now >= expires_at:
            return Reason.EXPIRED
        return None
