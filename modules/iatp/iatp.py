"""The IATP facade: identities, signing, verification, trust and sessions in one object
(``docs/trust.md``).

Over 400 lines: the facade of the public API, each method a short delegation to a part.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from agent_os import amb
from agent_os.amb.envelope import Envelope, new_id
from agent_os.amb.numbers import seconds, whole
from agent_os.iatp import _crypto
from agent_os.iatp.errors import (
    CryptoUnavailable,
    IATPConfigError,
    IATPError,
    SessionError,
    TrustError,
    UnknownAgent,
)
from agent_os.iatp.filestore import FileKeyStore
from agent_os.iatp.handshake import SessionManager
from agent_os.iatp.keys import Identity
from agent_os.iatp.keystore import KeyStore, MemoryKeyStore, WatchedKeyStore
from agent_os.iatp.middleware import IATPMiddleware
from agent_os.iatp.models import TrustModel, make_model
from agent_os.iatp.noncestore import SharedNonceStore
from agent_os.iatp.registry import KeyRegistry
from agent_os.iatp.result import Reason, VerificationResult, invalid
from agent_os.iatp.session import (
    PendingSession,
    Session,
    SessionAnswer,
    SessionConfirmation,
    SessionOffer,
    parse_message,
)
from agent_os.iatp.trust import Certificate, TrustEdge, TrustStore, check_level, check_permissions
from agent_os.iatp.verifier import EnvelopeVerifier, TrustEngine

_NS = 1_000_000_000
KEY_WATCH_MISSES = 3
"""Refresh intervals without a successful read of a watched key store after which every
message is refused (``key_store_unavailable``): revocations can no longer be vouched for."""
log = logging.getLogger("agent_os.iatp")


class IATP:
    """Inter-Agent Trust Protocol: ed25519 identities, signed envelopes, replay protection, trust.

    Args:
        key_storage: ``"memory"``, ``"file"`` (needs ``key_path`` and ``passphrase``) or a
            :class:`~agent_os.iatp.keystore.KeyStore`. ``"vault"`` and ``"hsm"`` (``docs/api-reference.md``)
            are not built in: pass a KeyStore for them.
        algorithm: only ``"ed25519"``.
        trust_model: ``"web"``, ``"hierarchical"``, ``"pki"`` or a TrustModel object.
        perspective: the agent whose view the web model takes when verifying (default: the
            receiving agent).
        clock_skew, max_age, max_nonces, rotation_grace, session_lifetime: seconds / counts, see
            ``docs/trust.md``.
        nonce_store: a :class:`~agent_os.iatp.noncestore.SharedNonceStore` (``RedisNonceStore``) that
            this IATP's bus middlewares consult after their in-memory nonce cache, so that a
            queue group spread over several processes refuses replays (see
            :mod:`agent_os.iatp.noncestore`). Default: none (replay protection per process).

    Raises IATPConfigError for an unsupported option and CryptoUnavailable when PyNaCl cannot be
    imported (IATP never runs without it).
    """

    def __init__(
        self,
        key_storage: str | KeyStore = "memory",
        algorithm: str = "ed25519",
        trust_model: str | TrustModel = "web",
        *,
        key_path: str | None = None,
        passphrase: str | bytes | None = None,
        kdf_level: str = "moderate",
        perspective: str | None = None,
        clock_skew: float = 30.0,
        max_age: float = 300.0,
        max_nonces: int = 1_000_000,
        rotation_grace: float | None = None,
        session_lifetime: float = 3600.0,
        nonce_store: SharedNonceStore | None = None,
        verify_workers: int = 0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if not _crypto.AVAILABLE:
            raise CryptoUnavailable(_crypto._IMPORT_ERROR)
        if algorithm != "ed25519":
            raise IATPConfigError(f"unsupported algorithm {algorithm!r}: IATP signs with ed25519")
        self.store = _make_store(key_storage, key_path, passphrase, kdf_level)
        try:
            model = make_model(trust_model) if isinstance(trust_model, str) else trust_model
        except ValueError as exc:
            raise IATPConfigError(str(exc)) from None
        self.registry = KeyRegistry(self.store)
        self.trust_store = TrustStore(self.registry)
        try:
            self.verifier = EnvelopeVerifier(
                self.registry,
                TrustEngine(model, self.trust_store),
                clock_skew=clock_skew,
                max_age=max_age,
                max_nonces=max_nonces,
                clock=clock,
            )
        except ValueError as exc:
            raise IATPConfigError(str(exc)) from None
        self.verifier.perspective = perspective
        lifetime = seconds(session_lifetime, "session_lifetime", error=IATPConfigError)
        self.sessions = SessionManager(self.verifier, int(lifetime * _NS))
        if rotation_grace is not None:
            seconds(rotation_grace, "rotation_grace", zero=True, error=IATPConfigError)
        self.rotation_grace_ns = int((max_age if rotation_grace is None else rotation_grace) * _NS)
        if nonce_store is not None and not isinstance(nonce_store, SharedNonceStore):
            raise IATPConfigError("nonce_store must be a SharedNonceStore (e.g. RedisNonceStore)")
        self.nonce_store = nonce_store
        self.verify_workers = whole(verify_workers, "verify_workers", 0, error=IATPConfigError)
        """What :meth:`middleware` passes as ``verify_workers`` unless told otherwise."""
        self.is_open = False
        self._open_lock: asyncio.Lock | None = None
        # The key-store watch (watch_keys): when the store was last read, and after how long
        # without a read messages are refused; None while not watching.
        self.keys_read_at = 0
        self.key_refresh_failures = 0
        self._stale_after_ns: int | None = None

    @property
    def trust_model(self) -> TrustModel:
        return self.verifier.trust.model

    def __repr__(self) -> str:
        agents = len(self.registry.agents)
        return f"IATP(store={self.store!r}, trust_model={self.trust_model.name!r}, agents={agents})"

    async def open(self) -> None:
        """Load the key store (a file store derives its key in a worker thread). Idempotent;
        called by every other coroutine. Raises KeyStoreError subclasses or TrustError."""
        if self.is_open:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self.is_open:
                return
            contents = await asyncio.to_thread(self.store.open)
            self.registry.load(contents)
            self.trust_store.load(contents.trust)
            self.is_open = True

    def _now(self) -> int:
        return self.verifier.clock()

    # -- identities and keys -----------------------------------------------------------------

    async def register_agent(self, agent_id: str, metadata: Mapping[str, Any] | None = None) -> Identity:
        """Create an ed25519 identity for ``agent_id``; raises AgentExists or IATPConfigError."""
        await self.open()
        return self.registry.register(agent_id, metadata or {}, self._now()).identity()

    def identity(self, agent_id: str) -> Identity:
        """The public identity of a known agent; raises UnknownAgent."""
        return self.registry.agent(agent_id).identity()

    async def add_identity(
        self, identity: Identity | Mapping[str, Any], *, trust_new_keys: bool = False
    ) -> Identity:
        """Import another process's public identity (keys, their revocations and retirements).

        An agent not known here is taken as given: *trust on first use*. Check a first import
        out of band (or let the trust model decide how far to trust it: an unknown agent has
        trust 0.0 until an edge, endorsement or certificate says otherwise). For a known agent
        an import adds a key only with a rotation statement (made by :meth:`rotate_key`) by a
        key held here as valid, or through a chain of them; ``trust_new_keys=True`` says the
        caller checked the new keys out of band (after a compromise, when no valid key was
        left to sign a statement). A local agent never gains a key by import. Imports never
        un-revoke a key; sessions with the agent end when its handshake key is revoked or
        retired by what is imported.

        Raises KeyStoreCorrupt for a malformed identity and IdentityConflict (nothing merged)
        for keys without proof, keys for a local agent, or a key id bound to another agent.
        """
        await self.open()
        data = identity.to_dict() if isinstance(identity, Identity) else identity
        now = self._now()
        record = self.registry.add_public(data, now, trust_new_keys=trust_new_keys)
        self.sessions.key_changed(record.agent_id, now)
        return record.identity()

    async def rotate_key(self, agent_id: str, grace: float | None = None) -> Identity:
        """Give a local agent a new signing key; the old one verifies for ``grace`` seconds more
        (default ``rotation_grace``), and so do the agent's sessions made with it. The old key
        signs a rotation statement for the new one (carried by :meth:`identity` exports, so
        other processes accept the new key). Raises UnknownAgent, and IATPConfigError for a
        ``grace`` that is not a finite number of seconds, 0 or more."""
        await self.open()
        if grace is None:
            grace_ns = self.rotation_grace_ns
        else:
            grace_ns = int(seconds(grace, "grace", zero=True, error=IATPConfigError) * _NS)
        now = self._now()
        self.registry.rotate(agent_id, now, grace_ns)
        self.sessions.key_changed(agent_id, now)
        return self.identity(agent_id)

    async def retire_key(self, key_id: str, at: float | None = None) -> None:
        """Stop accepting a replaced key from ``at`` (epoch seconds; default now), and the
        sessions made with it."""
        await self.open()
        now = self._now()
        key = self.registry.retire(key_id, now if at is None else _epoch_ns(at))
        self.sessions.key_changed(key.agent_id, now)

    async def revoke_key(self, key_id: str, reason: str = "revoked", at: float | None = None) -> None:
        """Revoke a key from ``at`` (epoch seconds; default now): its signatures fail with
        ``revoked_key``, trust documents it signed stop counting, and every session its agent
        made with it (as either side) is closed at that time: at once for a revocation now,
        later ones end then (and their messages fail as ``revoked_key``). Raises UnknownKey."""
        await self.open()
        now = self._now()
        key = self.registry.revoke(key_id, now if at is None else _epoch_ns(at), reason, now)
        self.sessions.key_changed(key.agent_id, now)

    # -- revocations from other processes ----------------------------------------------------

    async def refresh_keys(self) -> int:
        """Read what other processes wrote to the key store since it was opened or last read,
        and apply their revocations and retirements (only ever stricter; see
        ``docs/trust.md``, "Revocation reaches running verifiers"). Returns how many agents'
        keys changed. Raises IATPConfigError for a store that cannot be watched (not a
        :class:`~agent_os.iatp.keystore.WatchedKeyStore`, such as ``"memory"``), KeyStoreError
        subclasses when it cannot be read."""
        await self.open()
        store = self.store
        if not isinstance(store, WatchedKeyStore):
            raise IATPConfigError(f"{store!r} cannot be watched for changes by other processes")
        records = await asyncio.to_thread(store.changed_agents)
        now = self._now()
        changed = 0
        for data in records:
            if self.registry.merge_key_states(data):
                changed += 1
                self.sessions.key_changed(str(data.get("agent_id")), now)
        self.keys_read_at = now
        return changed

    async def watch_keys(self, interval: float = 1.0) -> None:
        """Run :meth:`refresh_keys` every ``interval`` seconds until cancelled, so a key revoked
        in the store by another process is refused here within ``interval`` (plus one read).
        While it runs, if the store could not be read for ``KEY_WATCH_MISSES`` intervals every
        message is refused with ``key_store_unavailable`` until a read succeeds (fail closed).
        Reads first (raising what :meth:`refresh_keys` raises), then loops; failures later are
        logged and counted in ``key_refresh_failures``. Run it as a task."""
        seconds(interval, "the key refresh interval", error=IATPConfigError)
        await self.refresh_keys()
        self._stale_after_ns = int(interval * KEY_WATCH_MISSES * _NS)
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.refresh_keys()
                except (IATPError, OSError) as exc:
                    self.key_refresh_failures += 1
                    log.warning("cannot read the key store for revocations: %s", exc)
        finally:
            self._stale_after_ns = None

    def stale_keys(self, envelope: Any = None) -> VerificationResult | None:
        """While :meth:`watch_keys` runs: the refusal (``key_store_unavailable``) of a message
        checked when the key store has not been read for too long, else None."""
        limit = self._stale_after_ns
        if limit is None:
            return None
        now = self._now()
        if now - self.keys_read_at <= limit:
            return None
        return invalid(
            Reason.KEY_STORE_UNAVAILABLE,
            getattr(envelope, "sender", None),
            getattr(envelope, "timestamp", None),
            None,
            f"the key store was not read for {(now - self.keys_read_at) / _NS:.1f} s: revocations unknown",
        )

    # -- signing and verifying ---------------------------------------------------------------

    async def sign(
        self,
        sender_id: str,
        message: Any,
        recipient_id: str | None = None,
        *,
        topic: str = "iatp.direct",
        ttl: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Build and sign an envelope from ``sender_id``; returns it (publish its bytes with any
        serializer). Raises UnknownAgent (no signing key) or amb.UnserializablePayload."""
        await self.open()
        now = self._now()
        env = Envelope(
            new_id(),
            topic,
            sender_id,
            message,
            recipient_id,
            timestamp=now,
            expires_at=None if ttl is None else now + _span_ns(ttl, "ttl"),
            headers=dict(headers or {}),
        )
        return self.sign_envelope(env)

    def sign_envelope(self, envelope: Envelope) -> Envelope:
        """Sign ``envelope`` in place as its sender and return it (synchronous; the store must
        be open). Raises UnknownAgent or amb.UnserializablePayload."""
        try:
            self.verifier.sign(envelope)
        except (TypeError, ValueError, OverflowError) as exc:
            raise amb.UnserializablePayload(f"cannot sign: a field is not msgpack-encodable: {exc}") from exc
        return envelope

    async def verify(self, signed: Envelope | bytes, *, viewer: str | None = None) -> VerificationResult:
        """Verify a signed envelope (or its serialized bytes). Never raises; see
        :class:`~agent_os.iatp.VerificationResult` and :mod:`agent_os.iatp.verifier` for the
        checks. A key store that cannot be opened (wrong passphrase, damaged files) gives
        ``key_store_unavailable``. The shared nonce store (``nonce_store``) is consulted by the
        bus middleware, not here."""
        if isinstance(signed, bytes | bytearray | memoryview):
            try:
                signed = amb.decode(bytes(signed))
            except amb.EnvelopeError as exc:
                return invalid(Reason.MALFORMED_ENVELOPE, None, None, None, str(exc))
        if not self.is_open:
            try:
                await self.open()
            except IATPError as exc:  # fail closed, and say why: it is not the sender's doing
                return invalid(
                    Reason.KEY_STORE_UNAVAILABLE,
                    getattr(signed, "sender", None),
                    getattr(signed, "timestamp", None),
                    None,
                    f"{type(exc).__name__}: {exc}",
                )
        stale = self.stale_keys(signed)
        if stale is not None:
            return stale
        return self.verifier.verify(signed, viewer=viewer)

    def verify_envelope(
        self, envelope: Any, *, viewer: str | None = None, scope: Any = None, redelivery: bool = False
    ) -> VerificationResult:
        """Synchronous verification for callers on the hot path (the store must be open)."""
        return self.verifier.verify(envelope, viewer=viewer, scope=scope, redelivery=redelivery)

    def middleware(self, **options: Any) -> IATPMiddleware:
        """A bus middleware signing and verifying with this IATP (see :mod:`agent_os.iatp.middleware`),
        with this IATP's ``verify_workers`` unless ``options`` name it."""
        options.setdefault("verify_workers", self.verify_workers)
        return IATPMiddleware(self, **options)

    # -- trust -------------------------------------------------------------------------------

    async def establish_trust(
        self,
        from_agent: str,
        to_agent: str,
        trust_level: float,
        permissions: Iterable[str] = (),
        *,
        expires_in: float | None = None,
    ) -> TrustEdge:
        """Record that local agent ``from_agent`` trusts ``to_agent`` at ``trust_level`` and grants
        it ``permissions``, as an edge signed with ``from_agent``'s key (replacing any previous
        edge between them). Raises TrustError or UnknownAgent."""
        await self.open()
        level, perms = check_level(trust_level), check_permissions(permissions)
        held = self.registry.signing_key(from_agent)
        if held is None:
            raise UnknownAgent(from_agent, "signing key")
        if to_agent not in self.registry.agents:
            raise UnknownAgent(to_agent)
        now = self._now()
        edge = TrustEdge(
            from_agent,
            to_agent,
            level,
            perms,
            now,
            None if expires_in is None else now + _span_ns(expires_in, "expires_in"),
            held[0],
        )
        edge = replace(edge, signature=_crypto.sign(held[1], edge.signed_bytes()))
        self.trust_store.add_edge(edge)
        self._save_trust()
        return edge

    async def add_trust_edge(self, edge: TrustEdge | Mapping[str, Any]) -> None:
        """Import an edge signed elsewhere; raises TrustError unless its signature verifies."""
        await self.open()
        self.trust_store.add_edge(edge if isinstance(edge, TrustEdge) else TrustEdge.from_dict(edge))
        self._save_trust()

    async def revoke_trust(self, from_agent: str, to_agent: str) -> bool:
        """Remove the edge ``from_agent -> to_agent``; True if there was one."""
        await self.open()
        removed = self.trust_store.remove_edge(from_agent, to_agent)
        self._save_trust()
        return removed

    async def add_root(self, agent_id: str) -> None:
        """Make a known agent a trust root (hierarchical authority / PKI issuer)."""
        await self.open()
        if agent_id not in self.registry.agents:
            raise UnknownAgent(agent_id)
        self.trust_store.add_root(agent_id)
        self._save_trust()

    async def issue_certificate(
        self,
        issuer: str,
        subject: str,
        trust_level: float,
        permissions: Iterable[str] = (),
        *,
        valid_for: float | None = None,
    ) -> Certificate:
        """Have local root ``issuer`` certify ``subject``'s current key (PKI model).
        Raises TrustError (issuer not a root, bad level) or UnknownAgent."""
        await self.open()
        if issuer not in self.trust_store.roots:
            raise TrustError(f"{issuer!r} is not a trust root")
        held = self.registry.signing_key(issuer)
        if held is None:
            raise UnknownAgent(issuer, "signing key")
        key = self.registry.agent(subject).current
        now = self._now()
        cert = Certificate(
            new_id(),
            issuer,
            held[0],
            subject,
            key.key_id,
            key.public_key,
            check_level(trust_level),
            check_permissions(permissions),
            now,
            None if valid_for is None else now + _span_ns(valid_for, "valid_for"),
        )
        cert = replace(cert, signature=_crypto.sign(held[1], cert.signed_bytes()))
        self.trust_store.add_certificate(cert)
        self._save_trust()
        return cert

    async def add_certificate(self, cert: Certificate | Mapping[str, Any]) -> None:
        """Import a certificate; raises TrustError unless the issuer's signature verifies."""
        await self.open()
        self.trust_store.add_certificate(
            cert if isinstance(cert, Certificate) else Certificate.from_dict(cert)
        )
        self._save_trust()

    def _save_trust(self) -> None:
        self.store.save_trust(self.trust_store.documents())

    def trust_level(self, sender: str, viewer: str | None = None, key_id: str | None = None) -> float:
        """How much ``viewer`` (default: ``perspective``) trusts ``sender`` under the model."""
        return self.verifier.trust.level(viewer or self.verifier.perspective, sender, key_id, self._now())

    def permissions(self, from_agent: str, to_agent: str) -> frozenset[str]:
        """What ``from_agent`` grants ``to_agent`` on their explicit, live, signed edge (empty if
        none). The control plane asks ``permits(recipient, sender, "request_action")``."""
        return self.verifier.trust.permissions(from_agent, to_agent, self._now())

    def permits(self, grantor: str, grantee: str, permission: str) -> bool:
        """True if ``grantor`` granted ``grantee`` the ``permission``."""
        return permission in self.permissions(grantor, grantee)

    # -- sessions ----------------------------------------------------------------------------

    async def offer_session(self, local: str, peer: str) -> PendingSession:
        """Start a session from local agent ``local`` to ``peer``: send ``pending.offer.to_bytes()``
        to the peer, then :meth:`complete_session` with its answer. Raises UnknownAgent."""
        await self.open()
        return self.sessions.offer(local, peer)

    async def accept_session(self, local: str, offer: bytes | SessionOffer) -> tuple[Session, bytes]:
        """Answer an offer to local agent ``local``; returns the session and the answer bytes to
        send back. The middleware seals ``local``'s messages to the initiator in it once the
        initiator has sent in it or confirmed it (:meth:`confirm_session`): the answer reached
        it. Raises SessionError (bad, stale, replayed or forged offer, or not one at all) or
        UnknownAgent."""
        await self.open()
        session, answer = self.sessions.accept(local, parse_message(SessionOffer, offer))
        return session, answer.to_bytes()

    async def complete_session(self, pending: PendingSession, answer: bytes | SessionAnswer) -> Session:
        """Finish the initiator's side and return the session. When the pair is full and this
        side seals in a later offer of its own (answers came back out of order), the session
        may be of no use and be returned closed (see docs/trust.md, "Sessions"). Raises
        SessionError for a bad or forged answer (or not one at all, or no PendingSession)."""
        await self.open()
        return self.sessions.complete(pending, parse_message(SessionAnswer, answer))

    def session_confirmation(self, session: Session) -> bytes:
        """The initiator's confirmation of ``session`` (the handshake's optional third message,
        for the responder's :meth:`confirm_session`): the session ``complete_session`` made,
        when it is the one this side seals in (the live one it offered last). Raises
        SessionError for any other."""
        return self.sessions.confirmation(session).to_bytes()

    async def confirm_session(self, local: str, confirmation: bytes | SessionConfirmation) -> Session:
        """Take the initiator's confirmation (:meth:`session_confirmation`) of a session local
        agent ``local`` answered: from now on the middleware seals ``local``'s messages to the
        initiator in it, as it does after the initiator's first message in it (optional: without
        it, that message confirms). Raises SessionError (malformed or not bytes, stale or
        future-dated as a message would be, forged, or no live session ``local`` answered)."""
        await self.open()
        return self.sessions.confirm(local, parse_message(SessionConfirmation, confirmation))

    def close_session(self, session: Session) -> None:
        """End a session on this side: its keys are dropped and its messages fail. Raises
        SessionError for anything that is not a Session."""
        if not isinstance(session, Session):
            raise SessionError(f"a Session is closed, not {type(session).__name__}")
        self.sessions.close(session)


def _make_store(
    kind: str | KeyStore, path: str | None, passphrase: str | bytes | None, level: str
) -> KeyStore:
    if not isinstance(kind, str):
        if not isinstance(kind, KeyStore):
            raise IATPConfigError("key_storage must be 'memory', 'file' or a KeyStore")
        return kind
    if kind == "memory":
        return MemoryKeyStore()
    if kind == "file":
        if path is None or passphrase is None:
            raise IATPConfigError("key_storage='file' needs key_path and passphrase")
        return FileKeyStore(path, passphrase, level)
    raise IATPConfigError(
        f"key storage {kind!r} is not built in; use 'memory' or 'file', or pass a KeyStore object"
    )


def _span_ns(value: object, name: str) -> int:
    """A duration in seconds (positive, finite, at most MOST_SECONDS) as nanoseconds. Raises
    IATPConfigError."""
    return int(seconds(value, name, error=IATPConfigError) * _NS)


def _epoch_ns(value: object) -> int:
    """A time in epoch seconds (``at``: from 0 to 10**10, the year 2286) as nanoseconds. Raises
    IATPConfigError."""
    return int(seconds(value, "at", zero=True, most=1e10, error=IATPConfigError) * _NS)
