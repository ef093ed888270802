"""Bus middleware: sign on publish, verify on delivery, reject before the handler.

List it first (the wire side). Its per-subscription options (:data:`ACCEPT_UNSIGNED`,
:data:`MIN_TRUST`, :data:`REPLAY_SCOPE`, :data:`BIND_TOPIC`) and what it does are in
``docs/trust.md``, "On the bus".
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import Counter
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn

from agent_os.amb import tracing as _tracing
from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata
from agent_os.amb.middleware import ConsumeNext, Middleware, PublishNext
from agent_os.amb.numbers import fraction, seconds, whole
from agent_os.iatp.errors import IATPConfigError, IATPError, SignatureRejected, SigningRejected, UnknownAgent
from agent_os.iatp.offload import VerifyWorkers
from agent_os.iatp.result import Reason, VerificationResult, invalid
from agent_os.iatp.verifier import SignedParts

if TYPE_CHECKING:
    from agent_os.amb.subscription import Subscription
    from agent_os.iatp.iatp import IATP
    from agent_os.iatp.noncestore import SharedNonceStore

ACCEPT_UNSIGNED: Final = "iatp.accept_unsigned"
"""Subscription context key: accept unsigned messages on this subscription (bool)."""
MIN_TRUST: Final = "iatp.min_trust"
"""Subscription context key: the lowest trust level accepted on this subscription (float)."""
RESULT: Final = "iatp"
"""``metadata.context`` key under which the verification result is stored."""
REPLAY_SCOPE: Final = "iatp.replay_scope"
"""Subscription context key: the scope (str) under which this subscription's nonces are
remembered, in the local nonce cache and the shared nonce store; subscriptions sharing a scope
refuse a nonce any of them saw (default: the subscription itself locally, and
``"<queue>@<pattern>"`` in the shared store for a queue group, else no shared claim)."""
BIND_TOPIC: Final = "iatp.bind_topic"
"""Subscription context key: refuse (``wrong_subject``) a message whose signed topic is not the
subject it was delivered on (bool; default: the middleware's ``bind_topic``)."""
_AHEAD: Final = "iatp.ahead:"
"""Prefix of the ``metadata.context`` key (one per middleware: two on a chain keep apart) of
what :meth:`IATPMiddleware.prepare` did for a message ahead of its turn, ``(envelope, started,
result or rejection, claim)``, taken out by ``on_consume``; taken only for that very envelope
object, so a context seeded from configuration cannot stand in."""
_ED25519: Final = "ed25519"
Checked = tuple[bytes, bytes, bytes, bool]
"""A signature check done by a worker: the parts checked and its answer."""
_NS_PER_MS: Final = 1_000_000
WORKERS_LINGER: Final = 2.0
"""Default seconds the signature workers outlive the last subscription that used them."""
VERIFY_SPAN: Final = "iatp.verify"
"""The span of one verification while tracing is on (``docs/observability.md``, "Tracing")."""


class IATPMiddleware(Middleware):
    """Signs outgoing and verifies incoming envelopes (see ``docs/trust.md``)."""

    def __init__(
        self,
        iatp: IATP,
        *,
        accept_unsigned: bool = False,
        min_trust: float = 0.0,
        agent_id: str | None = None,
        use_sessions: bool = True,
        nonce_store: SharedNonceStore | None = None,
        bind_topic: bool = False,
        lookahead: int = 64,
        verify_workers: int = 0,
    ) -> None:
        whole(lookahead, "lookahead", 0, error=IATPConfigError)
        whole(verify_workers, "verify_workers", 0, error=IATPConfigError)
        if verify_workers and not lookahead:
            raise IATPConfigError("verify_workers needs a lookahead: the checks are sent ahead of the turns")
        minimum = fraction(min_trust)
        if minimum is None:
            raise IATPConfigError(f"min_trust must be a number from 0 to 1, got {min_trust!r:.40}")
        self.iatp = iatp
        self.max_ahead = lookahead
        self._ahead_key = f"{_AHEAD}{id(self):x}"
        self.bind_topic = bind_topic
        self.nonce_store = nonce_store if nonce_store is not None else iatp.nonce_store
        self.accept_unsigned = accept_unsigned
        self.min_trust = minimum
        self.agent_id = agent_id
        self.use_sessions = use_sessions
        self.signed = 0
        self.verified = 0
        self.accepted_unsigned = 0
        self.rejected: Counter[str] = Counter()
        self.workers = VerifyWorkers(verify_workers) if verify_workers else None
        """The worker processes checking signatures ahead (``verify_workers``), or None."""
        self._served: weakref.WeakSet[Subscription] = weakref.WeakSet()
        """The subscriptions whose checks may go to the workers: the workers run while there
        is one, and ``workers_linger`` seconds after the last one ended."""
        self._workers_linger = WORKERS_LINGER
        self._linger: asyncio.TimerHandle | None = None

    @property
    def workers_linger(self) -> float:
        """Seconds the signature workers outlive the last subscription that used them (a
        client that comes and goes does not start processes each time); default 2. Setting
        anything but a finite number of seconds, 0 or more, raises IATPConfigError."""
        return self._workers_linger

    @workers_linger.setter
    def workers_linger(self, value: float) -> None:
        self._workers_linger = seconds(value, "workers_linger", zero=True, error=IATPConfigError)

    def close(self) -> None:
        """Stop the signature workers (``verify_workers``), if any; messages verify inline from
        then on. Idempotent; the workers also end with this process."""
        self._cancel_linger()
        if self.workers is not None:
            self.workers.close()

    def unsubscribed(self, subscription: Subscription) -> None:
        """A subscription's session replay windows (its scope is the subscription, unless it
        names a ``REPLAY_SCOPE``) end with it, so those of subscriptions that come and go never
        pile up (``docs/trust.md``, "Sessions"). The signature workers stop
        ``workers_linger`` seconds after the last subscription that may send them checks ended
        (closing its client ends it), unless another comes meanwhile; the next starts them
        again."""
        if not isinstance(subscription.context.get(REPLAY_SCOPE), str):  # a named scope is shared
            self.iatp.sessions.end_scope(id(subscription))
        if self.workers is not None and subscription in self._served:
            self._served.discard(subscription)
            if not self._served:  # the last one (a client closed): stop soon, unless one comes
                self._cancel_linger()
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no event loop to wait on: now
                    self._stop_unused()
                else:
                    self._linger = loop.call_later(self._workers_linger, self._stop_unused)

    def _stop_unused(self) -> None:
        """Stop the workers if no subscription uses them (the next one starts them again)."""
        self._linger = None
        if self.workers is not None and not self._served:
            self.workers.stop()

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def lookahead(self, subscription: Subscription) -> int:
        """With a shared nonce store, a queue-group subscription (or one with a
        ``REPLAY_SCOPE``) has up to ``lookahead`` messages verified and their claims sent
        before their turn (:meth:`prepare`), so the claims share round trips even with
        ``concurrency=1``; with ``verify_workers``, every subscription has up to ``lookahead``
        messages' signatures sent to the workers (``docs/trust.md``)."""
        if self.workers is not None:
            # A shared-claim subscription is verified inline ahead (prepare), so that only a
            # verified nonce is claimed.
            if self.nonce_store is None or self._claim_scope(subscription.context) is None:
                # Tracked even when this layer would not look ahead: another layer may ask the
                # bus to, and then prepare() sends this subscription's checks all the same.
                self._served.add(subscription)
                self._cancel_linger()
                if self.max_ahead > subscription.options.concurrency:
                    self.workers.start()  # now, so that the first messages find them running
            return self.max_ahead
        if self.nonce_store is None:
            return 0
        if subscription.options.queue is None and REPLAY_SCOPE not in subscription.context:
            return 0
        return self.max_ahead

    def prepare(self, envelope: Envelope, metadata: Metadata) -> None:
        """Verify a message ahead of its turn and send its nonce's claim; :meth:`on_consume`
        takes the verdict and waits for the claim's answer in the message's turn. Does nothing
        while the key store is not open (``on_consume`` then does it all)."""
        if not self.iatp.is_open:
            return
        started = _tracing.now() if _tracing.active else 0
        workers = self.workers
        if workers is not None and (self.nonce_store is None or self._claim_scope(metadata.context) is None):
            # No shared claim to send ahead: only the signature check goes ahead, to a worker.
            parts = self.iatp.verifier.signed_parts(envelope)
            check = workers.check(*parts) if parts is not None else None
            if check is not None:
                assert parts is not None
                metadata.context[self._ahead_key] = (envelope, started, _Offloaded(parts, check), None)
            return
        try:
            result = self._verdict(envelope, metadata)
        except SignatureRejected as exc:  # counted and traced in its turn
            metadata.context[self._ahead_key] = (envelope, started, exc, None)
            return
        claim: Awaitable[bool] | None = None
        store = self.nonce_store
        if result is not None and store is not None:
            args = self._claim_args(envelope, metadata, result)
            if args is not None:
                start = getattr(store, "start_claim", None)
                if start is not None:
                    claim = start(*args)
                else:  # a store with claim() alone: started as a task
                    claim = task = asyncio.ensure_future(store.claim(*args))
                    task.add_done_callback(_retrieved)  # a dropped message's failure logs nothing
        metadata.context[self._ahead_key] = (envelope, started, result, claim)

    def abandon(self, envelope: Envelope, metadata: Metadata) -> None:
        """A prepared message dropped before its turn: a claim it won is released (the store's
        ``release``, when it has one), so that a broker delivering it again without saying so
        (Kafka, after a rebalance) does not find its nonce taken."""
        ahead = metadata.context.pop(self._ahead_key, None)
        if type(ahead) is not tuple or ahead[0] is not envelope:
            return
        _, _, result, claim = ahead
        release = getattr(self.nonce_store, "release", None)
        if not isinstance(claim, asyncio.Future) or release is None:
            return
        args = self._claim_args(envelope, metadata, result)
        if args is None:
            return
        scope, nonce, _ = args

        def won(answer: asyncio.Future[bool]) -> None:
            if not answer.cancelled() and answer.exception() is None and answer.result():
                release(scope, nonce)

        if claim.done():
            won(claim)
        else:
            claim.add_done_callback(won)

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        iatp = self.iatp
        if not iatp.is_open:
            await iatp.open()
        if envelope.sig is None:
            by_pair = iatp.sessions.by_pair
            recipient = envelope.recipient
            session = (
                by_pair.get((envelope.sender, recipient))
                if by_pair and recipient is not None and self.use_sessions
                else None
            )
            if session is not None and iatp.verifier.clock() < session.expires_at:
                session.seal(envelope)
            else:
                try:
                    iatp.verifier.sign(envelope)
                except UnknownAgent as exc:
                    raise SigningRejected(str(exc)) from exc
            self.signed += 1
        await call_next(envelope)

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        ahead = metadata.context.pop(self._ahead_key, None)
        claim: Awaitable[bool] | None = None
        if type(ahead) is not tuple or ahead[0] is not envelope:
            # Not prepared, or an outer layer passed on another envelope: checked here, in full
            # (a nonce the preparation claimed is then refused: fail closed).
            # While tracing is on, the verification is one span from here to its verdict.
            started = _tracing.now() if _tracing.active else 0
            iatp = self.iatp
            if not iatp.is_open:
                try:
                    await iatp.open()
                except IATPError as exc:  # fail closed: nothing is checked against a store not open
                    self._reject(
                        invalid(
                            Reason.KEY_STORE_UNAVAILABLE,
                            envelope.sender,
                            envelope.timestamp,
                            None,
                            f"{type(exc).__name__}: {exc}",
                        ),
                        started,
                    )
            try:
                result = self._verdict(envelope, metadata)
            except SignatureRejected as exc:
                self._reject(exc.result, started)
            store = self.nonce_store
            if result is not None and store is not None:
                args = self._claim_args(envelope, metadata, result)
                if args is not None:
                    claim = store.claim(*args)
        else:
            _, started, verdict, claim = ahead
            if type(verdict) is _Offloaded:
                checked = verdict.ready()  # an answer that has come needs no await
                if checked is None:
                    checked = await verdict.answer(self.workers)
                try:
                    result = self._verdict(envelope, metadata, checked)
                except SignatureRejected as exc:
                    self._reject(exc.result, started)
            elif isinstance(verdict, SignatureRejected):
                self._reject(verdict.result, started)  # refused ahead: counted in its turn
            else:
                result = verdict
        if result is None:  # an unsigned message let through, with an invalid result
            self.accepted_unsigned += 1
            metadata.context[RESULT] = unsigned = invalid(
                Reason.UNSIGNED, envelope.sender, envelope.timestamp
            )
            if started:
                _traced(started, unsigned, "accepted_unsigned")
            await call_next(envelope, metadata)
            return
        if claim is not None:
            await self._settle_claim(claim, metadata, result, started)
        self.verified += 1
        metadata.context[RESULT] = result
        if started:
            _traced(started, result, "verified")
        await call_next(envelope, metadata)

    def _verdict(
        self, envelope: Envelope, metadata: Metadata, checked: Checked | None = None
    ) -> VerificationResult | None:
        """Everything but the shared claim, with the key store open: the verification result
        of a message accepted so far, or None for an unsigned message to let through, using
        ``checked``, a worker's signature check, where it applies. Raises SignatureRejected,
        neither counted nor traced (the caller does both, in the message's turn)."""
        iatp = self.iatp
        context = metadata.context
        if context.get(BIND_TOPIC, self.bind_topic) and envelope.topic != metadata.subject:
            # Before anything is verified or remembered: a copy moved to another subject must
            # neither act nor use up the nonce of the original.
            raise SignatureRejected(
                invalid(
                    Reason.WRONG_SUBJECT,
                    envelope.sender,
                    envelope.timestamp,
                    None,
                    f"signed for {envelope.topic[:200]!r}, delivered on {metadata.subject[:200]!r}",
                ),
            )
        if envelope.sig is None and context.get(ACCEPT_UNSIGNED, self.accept_unsigned):
            return None
        subscription: Any = context.get("subscription")
        named = context.get(REPLAY_SCOPE)
        scope: Any = named if isinstance(named, str) else id(subscription)
        verifier = iatp.verifier
        stale = iatp.stale_keys(envelope)
        if stale is not None:
            raise SignatureRejected(stale)
        viewer = self.agent_id or verifier.perspective
        if viewer is None and subscription is not None:
            viewer = getattr(getattr(subscription, "client", None), "agent_id", None)
        result = verifier.verify(envelope, viewer, scope, metadata.attempt > 1, checked)
        if not result.valid:
            raise SignatureRejected(result)
        minimum = context.get(MIN_TRUST, self.min_trust)
        if type(minimum) is not float or not 0.0 <= minimum <= 1.0:
            # From a subscription's context: a number's value (NumPy's, a Fraction ...), None for
            # no minimum; anything else (NaN, text, a bool, out of 0..1) refuses every signed
            # message: fail closed.
            found = 0.0 if minimum is None else fraction(minimum)
            minimum = math.inf if found is None else found
        if minimum and not result.trust_level >= minimum:
            raise SignatureRejected(
                invalid(
                    Reason.UNTRUSTED,
                    result.sender,
                    result.timestamp_ns,
                    result.key_id,
                    f"trust {result.trust_level:.3f} below the minimum",
                ),
            )
        return result

    def _reject(self, result: VerificationResult, started: int = 0) -> NoReturn:
        self.rejected[result.reason or "invalid"] += 1
        if started:
            _traced(started, result, "rejected")
        raise SignatureRejected(result)

    def _claim_args(
        self, envelope: Envelope, metadata: Metadata, result: VerificationResult
    ) -> tuple[str, bytes, int] | None:
        """The shared claim of a message accepted so far, as ``(scope, nonce, ttl_ms)`` for the
        store (see the module docstring); None where it makes none: a session MAC (the session
        is in one process) or a plain subscription (its local cache sees every message)."""
        sig = envelope.sig
        if sig is None or sig.scheme != _ED25519:
            return None
        scope = self._claim_scope(metadata.context)
        if scope is None:
            return None
        verifier = self.iatp.verifier
        ts = result.timestamp_ns or 0
        return scope, sig.nonce, (ts + verifier.nonces.max_age_ns - verifier.clock()) // _NS_PER_MS + 1

    @staticmethod
    def _claim_scope(context: Mapping[str, Any]) -> str | None:
        """The scope of the shared claims of a subscription's messages, from its (or a
        delivery's) context: its ``REPLAY_SCOPE``, else ``"<queue>@<pattern>"`` for a queue
        group; None for a plain subscription."""
        scope = context.get(REPLAY_SCOPE)
        if isinstance(scope, str):
            return scope
        subscription = context.get("subscription")
        queue = getattr(getattr(subscription, "options", None), "queue", None)
        if not isinstance(queue, str):
            return None
        return f"{queue}@{getattr(subscription, 'pattern', '')}"

    async def _settle_claim(
        self, claim: Awaitable[bool], metadata: Metadata, result: VerificationResult, started: int
    ) -> None:
        """Wait for the answer to a message's claim; reject a nonce claimed elsewhere (a broker
        redelivery aside), and fail closed on anything the store did."""
        ts = result.timestamp_ns or 0
        try:
            first = await claim
        except Exception as exc:  # fail closed on anything the store does
            self._reject(
                invalid(
                    Reason.NONCE_STORE_UNAVAILABLE,
                    result.sender,
                    ts,
                    result.key_id,
                    f"{type(exc).__name__}: {exc}",
                ),
                started,
            )
        if not first and metadata.attempt <= 1:
            self._reject(
                invalid(Reason.REPLAYED, result.sender, ts, result.key_id, "shared nonce store"), started
            )


class _Offloaded:
    """A message's signature check sent ahead to a worker: the parts checked and the answer."""

    __slots__ = ("check", "parts")

    def __init__(self, parts: SignedParts, check: asyncio.Future[bool]) -> None:
        self.parts = parts
        self.check = check

    def ready(self) -> Checked | None:
        """The parts and the worker's answer if it has come, else None."""
        check = self.check
        if check.done() and not check.cancelled() and check.exception() is None:
            return (*self.parts, check.result())
        return None

    async def answer(self, workers: VerifyWorkers | None) -> Checked | None:
        """The parts and the worker's answer, or None: check inline (see
        :meth:`VerifyWorkers.answer`)."""
        if workers is None:  # closed: the check was failed
            return None
        good = await workers.answer(self.check)
        return None if good is None else (*self.parts, good)


def _retrieved(task: asyncio.Future[bool]) -> None:
    """Mark a claim task's outcome retrieved (its message may be dropped before its turn)."""
    if not task.cancelled():
        task.exception()


def _traced(started: int, result: VerificationResult, outcome: str) -> None:
    """Record the span of one verification (tracing on): its outcome (``verified``,
    ``rejected``, ``accepted_unsigned``), the reason, the sender (authenticated only when
    verified), the key and the trust level; a rejection ends with status ERROR."""
    _tracing.record(
        VERIFY_SPAN,
        started,
        {
            "agent_os.iatp.outcome": outcome,
            "agent_os.iatp.reason": result.reason,
            "agent_os.iatp.sender": result.sender,
            "agent_os.iatp.key_id": result.key_id,
            "agent_os.iatp.trust_level": result.trust_level,
        },
        error=f"{result.reason}: {result.detail or ''}".rstrip(": ") if outcome == "rejected" else None,
    )
