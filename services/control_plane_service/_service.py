"""One instance of the mediated control plane: takes agents' messages from ingress subjects,
verifies, decides and records them, and forwards the allowed ones to delivery subjects
(``docs/services.md``, "The control-plane service")."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent_os.amb import AMB, MessageRejected, Metadata, Subscription, get_serializer
from agent_os.amb import tracing as _tracing
from agent_os.amb.deadletter import DLQ_ORIGINAL_ID, dead_letter_headers
from agent_os.amb.deadletter import dead_letter_subject as operator_dead_letter_subject
from agent_os.amb.envelope import Envelope, new_id
from agent_os.control_plane import KernelSpace, Mediator, Policy
from agent_os.control_plane.mediation.control import CONTROL_PREFIX
from agent_os.control_plane.mediation.identity import message_sender
from agent_os.control_plane.mediation.replies import PendingRequests
from agent_os.control_plane.policy.policy_set import PolicySet
from agent_os.iatp import IATP, IATPMiddleware
from agent_os.services._identity import require_verification
from agent_os.services.control_plane_service._actions import ACTION_PREFIX, TOOL_SERVICE, MediatedActions
from agent_os.services.control_plane_service._delivery import Deliveries, fixed_roster, identities_roster
from agent_os.services.control_plane_service._subjects import (
    AGENT_DEAD_LETTERS,
    DELIVERY,
    INBOX,
    INGRESS,
    QUEUE_GROUP,
    REPLIES,
    check_agent_dead_letter_prefix,
    check_agent_id,
    check_prefix,
    dead_letter_subject,
    delivery_subject,
)

log = logging.getLogger("agent_os.services.control_plane")


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service instance (denied messages are in ``client.stats.rejected``;
    held messages that failed or were dropped in ``mediator.release_failures`` and
    ``mediator.held_dropped``). ``released_dead_lettered``: held messages dead-lettered after
    their delivery was settled; ``dead_letter_failures``: those that could not be.
    ``forwarded``: messages delivered to at least one agent; ``deliveries``: the copies
    forwarded (one per recipient); ``deliveries_denied``: recipients the ``deliver`` policy
    refused. ``agent_dead_letters``: copies of dead letters published for the agent
    concerned; ``agent_dead_letter_failures``: those that could not be."""

    forwarded: int = 0
    deliveries: int = 0
    deliveries_denied: int = 0
    replies_forwarded: int = 0
    forward_failures: int = 0
    released_dead_lettered: int = 0
    dead_letter_failures: int = 0
    agent_dead_letters: int = 0
    agent_dead_letter_failures: int = 0


class ControlPlaneService:
    """One instance of the mediated control plane.

    ``client`` is the service's own bus client (not yet connected, with no middleware of its
    own: the service adds IATP's, then the mediator); ``kernel`` holds the policy and the
    flight recorder; ``iatp`` verifies every message (its middleware is the wire side, first)
    and forces the policy's ``require_verified_sender`` on; ``trust_bus=True`` instead takes
    claimed senders (only behind broker ACLs that authenticate them); ``pending`` bounds the
    table of requests awaiting replies. The service's kernel becomes ``authoritative``: a signal
    to an agent not seen yet applies here, to its first message. Raises VerificationRequired for
    neither or both of ``iatp`` and ``trust_bus``, amb StateError when ``client`` is already
    connected.

    Each allowed message goes to its recipients' own delivery subjects
    (``<delivery_prefix>.<agent>.<topic>``), each recipient checked by the policy as operation
    ``deliver``: the envelope's ``recipient`` alone, or, for a message without one, every agent
    of ``agents`` (the roster; default with ``iatp``: the agents whose identities it knows).
    Raises ValueError for an agent id or prefix that cannot go into a subject.

    A message the service dead-letters (to the operator's ``<dead_letter_prefix>.<subject>``)
    whose sender is verified (or, with ``trust_bus``, claimed) is also copied, with the same
    payload and ``dlq-*`` headers, to that sender's own ``<agent_dead_letter_prefix>.<sender>.
    <subject>`` (:func:`dead_letter_subject`); the intended recipients get nothing.

    An ingress request on ``<action_prefix>.<action>`` is an action (``docs/services.md``,
    "Actions across processes"): decided by the kernel's action gate
    (``kernel.decide_action``, one record), a denial answered by the service at once, an
    allowed one forwarded to the delivery subjects of ``tool_service`` (the agent id of
    ``agent-os serve tools``), and its outcome recorded (``action_outcome``) when the tool
    service's reply passes. The providers' configuration (``KernelSpace(workspace=...)``)
    must be the tool service's.

    Example::

        kernel = KernelSpace(policy=Policy.from_yaml("policy.yaml"))
        service = ControlPlaneService(AMB("nats", url, agent_id="control-plane"), kernel, iatp=iatp)
        await service.start()
    """

    def __init__(
        self,
        client: AMB,
        kernel: KernelSpace,
        *,
        ingress_prefix: str = INGRESS,
        delivery_prefix: str = DELIVERY,
        reply_prefix: str = REPLIES,
        queue: str = QUEUE_GROUP,
        pending: PendingRequests | None = None,
        iatp: IATP | None = None,
        trust_bus: bool = False,
        agents: Iterable[str] | None = None,
        agent_dead_letter_prefix: str = AGENT_DEAD_LETTERS,
        tool_service: str = TOOL_SERVICE,
        action_prefix: str = ACTION_PREFIX,
    ) -> None:
        require_verification(iatp is not None, trust_bus, "control-plane service")
        for what, prefix in (
            ("ingress prefix", ingress_prefix),
            ("delivery prefix", delivery_prefix),
            ("reply prefix", reply_prefix),
            ("agent dead-letter prefix", agent_dead_letter_prefix),
            ("action prefix", action_prefix),
        ):
            check_prefix(prefix, what)
        others = (
            ingress_prefix,
            delivery_prefix,
            reply_prefix,
            client.dead_letter_prefix,
            INBOX,
            CONTROL_PREFIX,
        )
        check_agent_dead_letter_prefix(agent_dead_letter_prefix, others)
        self.client = client
        self.iatp = iatp
        self.trust_bus = trust_bus
        self.kernel = kernel
        self.ingress_prefix = ingress_prefix
        self.delivery_prefix = delivery_prefix
        self.reply_prefix = reply_prefix
        self.agent_dead_letter_prefix = agent_dead_letter_prefix
        self.queue = queue
        self.stats = ServiceStats()
        # "is None", not "or": an empty table is falsy (it has a length), and a given one is kept.
        self.pending = pending if pending is not None else PendingRequests()
        self.iatp_middleware: IATPMiddleware | None = None
        if iatp is not None:
            # Added before the mediator, so it is the wire side: it verifies first and signs
            # last (what the service itself sends: signals, their replies).
            self.iatp_middleware = iatp.middleware(agent_id=client.agent_id)
            client.add_middleware(self.iatp_middleware)
            require_verified_sender(kernel.policy)
        kernel.authoritative = True  # signals to agents not seen yet apply here, ahead of time
        self.mediator: Mediator = kernel.attach(
            client,
            trust_bus=trust_bus,
            inbound_prefix=ingress_prefix,
            reply_prefix=reply_prefix,
            pending=self.pending,
            inbox_prefix=INBOX,
            on_release_error=self._release_failed,
            action_prefix=action_prefix,
        )
        self.actions = MediatedActions(
            kernel,
            self.pending,
            self._send,
            self._answer,
            tool_service=tool_service,
            delivery_prefix=delivery_prefix,
            prefix=action_prefix,
            trust_bus=trust_bus,
        )
        if agents is not None:
            roster = fixed_roster(agents)
        elif iatp is not None:
            roster = identities_roster(iatp, client.agent_id or "", tool_service)
        else:
            roster = None
        self.deliveries = Deliveries(kernel, roster, trust_bus=trust_bus)
        self._encode = get_serializer("msgpack").encode
        self._subs: list[Subscription] = []
        client.dead_letter_hook = self._copy_to_agent

    @property
    def unverified(self) -> int:
        """Messages IATP refused (unsigned, forged, replayed, ...); 0 without IATP."""
        mw = self.iatp_middleware
        return sum(mw.rejected.values()) if mw is not None else 0

    async def start(self) -> None:
        """Connect and start taking ingress messages (as a queue group) and replies (all)."""
        self._subs = [
            await self.client.subscribe(f"{self.ingress_prefix}.>", self._forward, queue=self.queue),
            await self.client.subscribe(f"{self.reply_prefix}.>", self._forward_reply),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish in-flight messages, close the client, then record the messages still held
        for stopped agents as dropped (``message_dropped``, reason ``service stopped``; they
        live in this instance's memory only)."""
        await self.client.close(timeout)
        dropped = await self.mediator.drop_held()
        if dropped:
            log.warning("stopped with %d held messages of stopped agents: recorded as dropped", dropped)

    async def __aenter__(self) -> ControlPlaneService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _forward(self, message: Any, metadata: Metadata) -> None:
        # Reached only when the mediator allowed the message (a deny was dead-lettered before),
        # checked that the envelope's topic is this subject and, for a request, that its
        # reply_to is the verified requester's own inbox, noted in self.pending. Each
        # recipient gets it on its own delivery subject if the policy lets it receive it.
        topic = metadata.subject[len(self.ingress_prefix) + 1 :]
        if self.actions.is_action(topic):
            await self.actions.request(topic, message, metadata)
            return
        deliveries = self.deliveries
        sent = 0
        for agent in deliveries.recipients(metadata.envelope):
            if not await deliveries.allowed(agent, topic, metadata):
                self.stats.deliveries_denied += 1
                continue
            await self._send(delivery_subject(topic, self.delivery_prefix, agent=agent), metadata)
            self.stats.deliveries += 1
            sent += 1
        if sent:
            self.stats.forwarded += 1

    async def _forward_reply(self, message: Any, metadata: Metadata) -> None:
        # Reached only on the instance holding the request, when the mediator allowed the reply.
        reply_to = metadata.subject[len(self.reply_prefix) + 1 :]
        await self.actions.outcome(reply_to, message, metadata)
        await self._send(reply_to, metadata)
        self.stats.replies_forwarded += 1

    async def _answer(self, metadata: Metadata, payload: dict[str, Any]) -> None:
        # The service's own reply to a request (a denied action): signed by the service when
        # it has IATP, and sent past its mediator, since the decision is recorded already.
        assert metadata.reply_to is not None
        answer = Envelope(
            new_id(),
            metadata.reply_to,
            self.client.agent_id,
            payload,
            correlation_id=metadata.id,
            timestamp=time.time_ns(),
        )
        if self.iatp_middleware is not None:
            await self.iatp_middleware.on_publish(answer, self._publish)
        else:
            await self._publish(answer)

    async def _publish(self, envelope: Envelope) -> None:
        await self._wire(envelope.topic, envelope, envelope.sender)

    async def _wire(self, subject: str, envelope: Envelope, key: str) -> None:
        # What the service sends past its client's publish chain (forwards, its own answers):
        # while tracing is on, a span of its own and its trace context in the copy sent.
        if _tracing.active:
            client = self.client
            with _tracing.forwarding(envelope, subject, client.agent_id, client.broker.name) as traced:
                await client.broker.publish(subject, self._encode(traced), key=key)
            return
        await self.client.broker.publish(subject, self._encode(envelope), key=key)

    async def _release_failed(self, envelope: Envelope, metadata: Metadata, error: Exception) -> None:
        # A held message that did not go through after its handler returned (its delivery was
        # settled when it was held): dead-letter it as the bus does, with the reason.
        reason = error.reason if isinstance(error, MessageRejected) else "handler_error"
        subject = metadata.subject
        headers = dead_letter_headers(subject, reason, error, metadata.attempt)
        headers[DLQ_ORIGINAL_ID] = envelope.id
        dead = Envelope(
            new_id(),
            operator_dead_letter_subject(self.client.dead_letter_prefix, subject),
            self.client.agent_id,
            self._encode(envelope),
            timestamp=time.time_ns(),
            headers=headers,
        )
        try:
            await self.client.broker.publish(dead.topic, self._encode(dead), key=dead.sender)
        except Exception as exc:
            self.stats.dead_letter_failures += 1
            log.error(
                "could not dead-letter held message %s from %r (%s): %r", envelope.id, subject, reason, exc
            )
            return
        self.stats.released_dead_lettered += 1
        await self._copy_to_agent(dead, metadata)

    async def _copy_to_agent(self, dead: Envelope, metadata: Metadata | None) -> None:
        # The agent concerned by a dead letter is the established sender of the refused message
        # (IATP's verified signer; with trust_bus the claimed sender): the copy holds that
        # agent's own message. A message without one (undecodable, unsigned, forged, replayed)
        # stays with the operator, and so does one from the service itself. The recipients get
        # nothing: a refused message is one they must not read.
        if metadata is None:
            return
        sender, _, _, _ = message_sender(metadata, self.trust_bus)
        if sender is None or sender == self.client.agent_id:
            return
        try:
            subject = dead_letter_subject(
                metadata.subject, self.agent_dead_letter_prefix, agent=check_agent_id(sender)
            )
        except ValueError:
            return  # no agent of mediated mode: it has no dead-letter subject to read
        copy = Envelope(
            new_id(),
            subject,
            self.client.agent_id,
            dead.payload,
            timestamp=time.time_ns(),
            headers=dict(dead.headers),
        )
        try:
            await self.client.broker.publish(subject, self._encode(copy), key=sender)
        except Exception as exc:
            self.stats.agent_dead_letter_failures += 1
            log.error("could not copy dead letter %s to %r: %r", dead.id, subject, exc)
            return
        self.stats.agent_dead_letters += 1

    async def _send(self, subject: str, metadata: Metadata) -> None:
        try:
            await self._wire(subject, metadata.envelope, metadata.sender)
        except Exception:
            self.stats.forward_failures += 1
            raise  # the bus retries or dead-letters it


def require_verified_sender(policy: Policy | PolicySet) -> None:
    """Turn ``require_verified_sender`` on in ``policy`` (every policy of a set)."""
    for each in policy.policies if isinstance(policy, PolicySet) else (policy,):
        each.require_verified_sender = True
