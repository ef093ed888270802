"""Bus middleware: sign on publish, verify on delivery, reject before the handler.

List it first (the wire side) so it signs last and verifies first::

    iatp = IATP()
    await iatp.register_agent("worker")
    amb = AMB("memory", agent_id="worker", middleware=[iatp.middleware(), policy, ...])

Outbound, an unsigned envelope is MACed with the live session from its sender to its recipient
when there is one, otherwise signed with the sender's ed25519 key; with no key for the sender
the publish fails with :class:`~iatp.errors.SigningRejected`. An envelope that already carries a
signature (a relay forwarding a message verbatim) is passed on unchanged.

Inbound, the result is checked before anything else sees the message. Invalid messages raise
:class:`~iatp.errors.SignatureRejected` with the verification reason: the bus dead-letters them
with that reason (``dlq-reason`` header) and counts them (``amb.stats.rejected``); this
middleware also counts them per reason in ``rejected``. A valid message's result is put in
``metadata.context["iatp"]`` for the layers inside (the control plane) and the handler.

Per-subscription policy through the subscription's context::

    await amb.subscribe("_DLQ.>", handler, context={ACCEPT_UNSIGNED: True, MIN_TRUST: 0.0})

``ACCEPT_UNSIGNED`` (default: the middleware's ``accept_unsigned``, itself False) lets unsigned
messages through, with an *invalid* result (reason ``unsigned``) in the context, so nothing
inside mistakes them for authenticated. ``MIN_TRUST`` rejects valid messages whose trust level is
below it (reason ``untrusted``).

The web model's viewer is the middleware's ``agent_id``, else the IATP's ``perspective``, else
the receiving client's ``agent_id``: always the receiving side, never the sender's choice.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Final

from amb.envelope import Envelope
from amb.metadata import Metadata
from amb.middleware import ConsumeNext, Middleware, PublishNext
from iatp.errors import SignatureRejected, SigningRejected, UnknownAgent
from iatp.result import Reason, invalid

if TYPE_CHECKING:
    from iatp.iatp import IATP

ACCEPT_UNSIGNED: Final = "iatp.accept_unsigned"
"""Subscription context key: accept unsigned messages on this subscription (bool)."""
MIN_TRUST: Final = "iatp.min_trust"
"""Subscription context key: the lowest trust level accepted on this subscription (float)."""
RESULT: Final = "iatp"
"""``metadata.context`` key under which the verification result is stored."""


class IATPMiddleware(Middleware):
    """Signs outgoing and verifies incoming envelopes (see the module docstring)."""

    def __init__(
        self,
        iatp: IATP,
        *,
        accept_unsigned: bool = False,
        min_trust: float = 0.0,
        agent_id: str | None = None,
        use_sessions: bool = True,
    ) -> None:
        self.iatp = iatp
        self.accept_unsigned = accept_unsigned
        self.min_trust = min_trust
        self.agent_id = agent_id
        self.use_sessions = use_sessions
        self.signed = 0
        self.verified = 0
        self.accepted_unsigned = 0
        self.rejected: Counter[str] = Counter()

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
        iatp = self.iatp
        if not iatp.is_open:
            await iatp.open()
        context = metadata.context
        if envelope.sig is None and context.get(ACCEPT_UNSIGNED, self.accept_unsigned):
            self.accepted_unsigned += 1
            context[RESULT] = invalid(Reason.UNSIGNED, envelope.sender, envelope.timestamp)
            await call_next(envelope, metadata)
            return
        subscription: Any = context.get("subscription")
        scope = id(subscription)
        verifier = iatp.verifier
        viewer = self.agent_id or verifier.perspective
        if viewer is None and subscription is not None:
            viewer = getattr(getattr(subscription, "client", None), "agent_id", None)
        result = verifier.verify(envelope, viewer, scope, metadata.attempt > 1)
        if not result.valid:
            self.rejected[result.reason or "invalid"] += 1
            raise SignatureRejected(result)
        minimum = context.get(MIN_TRUST, self.min_trust)
        if minimum and result.trust_level < minimum:
            self.rejected[Reason.UNTRUSTED] += 1
            raise SignatureRejected(
                invalid(
                    Reason.UNTRUSTED,
                    result.sender,
                    result.timestamp_ns,
                    result.key_id,
                    f"trust {result.trust_level:.3f} below the minimum",
                )
            )
        self.verified += 1
        context[RESULT] = result
        await call_next(envelope, metadata)
