"""The control-plane service: mediated mode, where no message reaches an agent unchecked.

Agents publish to *ingress* subjects (``ingress.<topic>``) and receive on *delivery* subjects
(``deliver.<topic>``). The service subscribes to ``ingress.>`` in the queue group
``control-plane`` (run several instances to share the load); for each message IATP verifies
the signature first, then the mediator applies signals and policy as operation ``publish`` on
``<topic>`` for the *verified sender*, and records the decision; an allowed message is
forwarded, envelope unchanged (so its signature still verifies at the receiver), to
``deliver.<topic>``; a denied one is dead-lettered by the service with the reason and counted.

**Senders are verified.** ``ControlPlaneService(client, kernel, iatp=iatp)`` puts IATP's
middleware on the service's client on the wire side of the mediator: an unsigned, forged,
replayed or tampered message is dead-lettered with IATP's reason (``unsigned``,
``bad_signature``, ...) and counted (``client.stats.rejected``, ``service.iatp_middleware
.rejected``) before policy sees it, and the kernel's policy gets ``require_verified_sender``
(kept on across admin reloads). ``iatp`` holds the service's own signing key (for the signals it
sends) and the agents' public identities. Without ``iatp`` the service refuses to run unless
``trust_bus=True`` says the broker's ACLs already authenticate senders: then the envelope's
claimed sender is believed, and any agent able to publish can claim any name.

Broker permissions make this the only way through: :func:`nats_authorization` generates the
NATS server's ``authorization`` block in which agents may publish only to ingress subjects (and
reply inboxes and dead letters) and subscribe only to delivery subjects, their inbox and their
own control subject, while only the service may publish to delivery and control subjects. A
message an agent sends straight to a delivery subject is refused by the server.

**Replies are mediated too.** A forwarded request keeps its ``reply_to``, which must be an
inbox of the (verified) requester, ``_INBOX.<requester>.…`` (:func:`agent_inbox`; any other
``reply_to``, or one still waiting for another reply, is denied), and the service notes it in
its table of pending requests (:mod:`agent_os.control_plane.mediation.replies`). The responder's
client carries
:class:`ReplyViaService`, which sends a reply meant for ``_INBOX.x`` to ``replies._INBOX.x``
instead. Every service instance receives replies (no queue group: the instance that forwarded
the request holds its entry); the one holding the entry checks the reply as operation
``reply`` on the request's topic, from the replier to the requester (plus: the correlation id
must be the request's, a request addressed to one agent is answered by that agent, one reply
per request, not after it expired), records exactly one decision, and forwards it unchanged to
the inbox. Instances without the entry drop the reply and count it
(``pending.unmatched``): a forged reply nobody waits for is dropped by all and recorded by
none, since no instance owns that decision. Under the generated NATS permissions agents may
not publish to ``_INBOX.>`` (a reply around the service is refused by the server) and each
agent may subscribe only to its own inboxes ``_INBOX.<agent>.>`` (nobody reads another's
replies). The service's own requests (remote signals) are noted the same way, so their replies
also pass.

*Agents' inboxes.* An agent's requests pass the service only when its client's reply inbox is
under ``agent_inbox(agent_id)``: ``AMB(..., inbox_prefix=agent_inbox(agent_id))`` (without
the option the inbox is the adapter's ``_INBOX.<random>``, and the request is denied).

**A stopped agent stalls nobody else.** A message of a stopped agent (SIGSTOP) is queued in
that agent's hold queue and recorded once (``message_held``), and the ingress handler returns
at once: the instance goes on forwarding every other agent's traffic (the mediator's mediated
mode; see :mod:`agent_os.control_plane.mediation.holds`). At SIGCONT the agent's held messages are
decided and
forwarded in arrival order, and a message of it arriving meanwhile goes behind them (FIFO per
agent). The delivery of a held message is settled when it is held, so it lives in this
instance's memory until then. One that fails after its release (denied by the policy, the
forward failed) or that SIGKILL drops (recorded as ``message_dropped``) is logged, counted
(``mediator.release_failures``, ``mediator.held_dropped``) and dead-lettered by the service
with the reason (``policy_denied``, ``agent_killed``, ...) as the bus would have done;
:meth:`ControlPlaneService.stop` records those still held as dropped (``service stopped``).

**Signals ahead of time.** The service's kernel is the authority for every agent passing it
(``kernel.authoritative``): a signal (admin API, ``kernel.send_signal``) to an agent the
service has not heard from yet creates its process here, so a SIGSTOP holds and a SIGKILL drops
its very first message instead of being sent on the bus to a kernel that may not exist.

Example::

    kernel = KernelSpace(policy=Policy.from_yaml("policy.yaml"))
    service = ControlPlaneService(AMB("nats", url, agent_id="control-plane"), kernel, iatp=iatp)
    await service.start()
    # an agent:  AMB("nats", url, agent_id="worker", middleware=[iatp_mw, ReplyViaService()])

Run it as a process: ``agent-os serve control-plane --help`` (or ``python -m
services.control_plane_service``). Several instances (one queue group) share replay protection
with ``--nonce-store redis://host:6379/0`` (see :mod:`agent_os.services._process`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click

from agent_os.amb import AMB, MessageRejected, Metadata, Subscription, get_serializer
from agent_os.amb.deadletter import DLQ_ATTEMPTS, DLQ_ERROR, DLQ_ORIGINAL_ID, DLQ_REASON, DLQ_SUBJECT
from agent_os.amb.envelope import Envelope, new_id
from agent_os.amb.middleware import Middleware, PublishNext
from agent_os.control_plane import ControlPlaneError, FlightRecorder, KernelSpace, Mediator, Policy
from agent_os.control_plane.mediation.control import CONTROL_PREFIX
from agent_os.control_plane.mediation.replies import PendingRequests
from agent_os.control_plane.policy.loader import load_policy as load_policy_file
from agent_os.control_plane.policy.policy_set import PolicySet
from agent_os.iatp import IATP, IATPMiddleware
from agent_os.services._identity import require_verification
from agent_os.services._process import (
    broker_backend,
    run,
    serving,
    stop_signals,
    verification_from_options,
    verification_options,
)

log = logging.getLogger("agent_os.services.control_plane")

INGRESS: Final = "ingress"
DELIVERY: Final = "deliver"
REPLIES: Final = "replies"
INBOX: Final = "_INBOX"
QUEUE_GROUP: Final = "control-plane"


def ingress_subject(topic: str, prefix: str = INGRESS) -> str:
    """Where an agent publishes a message meant for ``topic`` in mediated mode."""
    return f"{prefix}.{topic}"


def delivery_subject(topic: str, prefix: str = DELIVERY) -> str:
    """Where agents subscribe to receive ``topic`` in mediated mode."""
    return f"{prefix}.{topic}"


def agent_inbox(agent_id: str, prefix: str = INBOX) -> str:
    """The inbox prefix of ``agent_id`` in mediated mode: its requests' ``reply_to`` must be
    under ``<this>.``. Raises ValueError for an agent id that is not one subject token
    (``.``, ``*``, ``>`` or whitespace would let one agent's inboxes cover another's)."""
    if not agent_id or any(c in agent_id for c in ".*>") or any(c.isspace() for c in agent_id):
        raise ValueError(f"an agent id in mediated mode must be one subject token, got {agent_id!r}")
    return f"{prefix}.{agent_id}"


def reply_subject(reply_to: str, prefix: str = REPLIES) -> str:
    """Where an agent publishes a reply meant for the inbox ``reply_to`` in mediated mode."""
    return f"{prefix}.{reply_to}"


class ReplyViaService(Middleware):
    """Agent-side middleware for mediated mode: a reply to an inbox goes through the service.

    Put it after IATP in the agent client's middleware (so the rerouted topic is what gets
    signed): ``AMB(..., middleware=[iatp.middleware(), ReplyViaService()])``. Replies by
    ``client.reply``, the bus's error replies and signal acknowledgements all pass through it.
    """

    def __init__(self, reply_prefix: str = REPLIES, inbox_prefix: str = INBOX) -> None:
        self.reply_prefix = reply_prefix
        self.inbox = inbox_prefix + "."

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        if envelope.correlation_id and not envelope.reply_to and envelope.topic.startswith(self.inbox):
            envelope = dataclasses.replace(envelope, topic=reply_subject(envelope.topic, self.reply_prefix))
        await call_next(envelope)


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service instance (denied messages are in ``client.stats.rejected``;
    held messages that failed or were dropped in ``mediator.release_failures`` and
    ``mediator.held_dropped``). ``released_dead_lettered``: held messages dead-lettered after
    their delivery was settled; ``dead_letter_failures``: those that could not be."""

    forwarded: int = 0
    replies_forwarded: int = 0
    forward_failures: int = 0
    released_dead_lettered: int = 0
    dead_letter_failures: int = 0


class ControlPlaneService:
    """One instance of the mediated control plane (see the module docstring).

    ``client`` is the service's own bus client (not yet connected, with no middleware of its
    own: the service adds IATP's, then the mediator); ``kernel`` holds the policy and the
    flight recorder; ``iatp`` verifies every message (its middleware is the wire side, first)
    and forces the policy's ``require_verified_sender`` on; ``trust_bus=True`` instead takes
    claimed senders (only behind broker ACLs that authenticate them); ``pending`` bounds the
    table of requests awaiting replies. Raises VerificationRequired for neither or both of
    ``iatp`` and ``trust_bus``, amb StateError when ``client`` is already connected.
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
    ) -> None:
        require_verification(iatp is not None, trust_bus, "control-plane service")
        self.client = client
        self.iatp = iatp
        self.trust_bus = trust_bus
        self.kernel = kernel
        self.ingress_prefix = ingress_prefix
        self.delivery_prefix = delivery_prefix
        self.reply_prefix = reply_prefix
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
        )
        self._encode = get_serializer("msgpack").encode
        self._subs: list[Subscription] = []

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

    async def _forward(self, message: Any, metadata: Metadata) -> None:
        # Reached only when the mediator allowed the message (a deny was dead-lettered before),
        # checked that the envelope's topic is this subject and, for a request, that its
        # reply_to is the verified requester's own inbox, noted in self.pending.
        topic = metadata.subject[len(self.ingress_prefix) + 1 :]
        await self._send(delivery_subject(topic, self.delivery_prefix), metadata)
        self.stats.forwarded += 1

    async def _forward_reply(self, message: Any, metadata: Metadata) -> None:
        # Reached only on the instance holding the request, when the mediator allowed the reply.
        await self._send(metadata.subject[len(self.reply_prefix) + 1 :], metadata)
        self.stats.replies_forwarded += 1

    async def _release_failed(self, envelope: Envelope, metadata: Metadata, error: Exception) -> None:
        # A held message that did not go through after its handler returned (see the module
        # docstring): dead-letter it as the bus does, with the reason; counted either way.
        reason = error.reason if isinstance(error, MessageRejected) else "handler_error"
        subject = metadata.subject
        dead = Envelope(
            new_id(),
            f"{self.client.dead_letter_prefix}.{subject}",
            self.client.agent_id,
            self._encode(envelope),
            timestamp=time.time_ns(),
            headers={
                DLQ_REASON: reason,
                DLQ_ERROR: f"{type(error).__name__}: {error}"[:1024],
                DLQ_SUBJECT: subject,
                DLQ_ATTEMPTS: str(metadata.attempt),
                DLQ_ORIGINAL_ID: envelope.id,
            },
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

    async def _send(self, subject: str, metadata: Metadata) -> None:
        try:
            await self.client.broker.publish(subject, self._encode(metadata.envelope), key=metadata.sender)
        except Exception:
            self.stats.forward_failures += 1
            raise  # the bus retries or dead-letters it


def require_verified_sender(policy: Policy | PolicySet) -> None:
    """Turn ``require_verified_sender`` on in ``policy`` (every policy of a set)."""
    for each in policy.policies if isinstance(policy, PolicySet) else (policy,):
        each.require_verified_sender = True


# -- broker permissions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsUser:
    user: str
    password: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def nats_users(
    agents: Iterable[str],
    service_user: str = "control-plane",
    *,
    ingress_prefix: str = INGRESS,
    delivery_prefix: str = DELIVERY,
    reply_prefix: str = REPLIES,
    dead_letter_prefix: str = "_DLQ",
    passwords: Mapping[str, str] | None = None,
) -> list[NatsUser]:
    """The NATS users of a mediated deployment: one per agent (user name = agent id) and the
    service. Agents publish only to ingress, replies (through the service) and dead letters;
    they receive delivery subjects, their own inboxes (``_INBOX.<agent>.>``, see
    :func:`agent_inbox`) and their own control subject. Only the service publishes to delivery
    subjects, inboxes and control subjects. Passwords are generated unless given. Raises
    ValueError for an agent id that is not one subject token."""
    given = dict(passwords or {})
    users = [
        NatsUser(
            agent,
            given.get(agent) or secrets.token_urlsafe(24),
            (f"{ingress_prefix}.>", f"{reply_prefix}.>", f"{dead_letter_prefix}.>"),
            (f"{delivery_prefix}.>", f"{agent_inbox(agent)}.>", f"{CONTROL_PREFIX}.{agent}"),
        )
        for agent in agents
    ]
    users.append(
        NatsUser(
            service_user,
            given.get(service_user) or secrets.token_urlsafe(24),
            (f"{delivery_prefix}.>", f"{INBOX}.>", f"{dead_letter_prefix}.>", f"{CONTROL_PREFIX}.>"),
            (f"{ingress_prefix}.>", f"{reply_prefix}.>", f"{INBOX}.>", f"{CONTROL_PREFIX}.{service_user}"),
        )
    )
    return users


def nats_authorization(users: Iterable[NatsUser]) -> str:
    """The ``authorization { users = [...] }`` block of a nats-server configuration."""

    def quoted(values: Iterable[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    lines = ["authorization {", "  users = ["]
    lines.extend(
        f'    {{user: "{u.user}", password: "{u.password}", permissions: {{'
        f"publish: {{allow: {quoted(u.publish)}}}, subscribe: {{allow: {quoted(u.subscribe)}}}}}}}"
        for u in users
    )
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


# -- the process -------------------------------------------------------------------------------


def recorder_from_spec(
    spec: str, *, retention_days: float | None = 90, encryption_key: bytes | None = None
) -> FlightRecorder:
    """A flight recorder from ``memory``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``
    (or a plain path) or a ``postgresql://`` DSN. Raises RecorderConfigError for a bad
    combination."""
    options: dict[str, Any] = {"retention_days": retention_days, "encryption_key": encryption_key}
    if spec == "memory":
        return FlightRecorder("memory", **options)
    if spec.startswith(("postgresql://", "postgres://")):
        return FlightRecorder("postgresql", spec, **options)
    for prefix in ("sqlite:///", "sqlite:"):
        if spec.startswith(prefix):
            return FlightRecorder("sqlite", spec[len(prefix) :], **options)
    return FlightRecorder("sqlite", spec, **options)


def load_policy(source: str) -> Policy:
    """A policy from a YAML file (any name), or a built-in name (strict, permissive, audit).
    Raises PolicyLoadError (the line and field) or PolicyError."""
    path = Path(source)
    return load_policy_file(path) if path.is_file() else Policy.builtin(source)


def read_key_file(path: str) -> bytes:
    """A 32-byte key from a file holding it raw or as 64 hex characters."""
    data = Path(path).read_bytes()
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    if len(data) != 32:
        raise ValueError(f"{path}: a key file holds 32 raw bytes or 64 hex characters")
    return data


async def serve(
    *,
    broker: str,
    policy: Policy,
    recorder: FlightRecorder,
    admin_token: str,
    iatp: IATP | None = None,
    trust_bus: bool = False,
    admin_host: str = "127.0.0.1",
    admin_port: int = 8787,
    agent_id: str = "control-plane",
    queue: str = QUEUE_GROUP,
    ingress_prefix: str = INGRESS,
    delivery_prefix: str = DELIVERY,
    reply_prefix: str = REPLIES,
    stop: asyncio.Event | None = None,
) -> ControlPlaneService:
    """Run one service instance with its admin API until ``stop`` is set (or SIGINT/SIGTERM),
    then finish in-flight messages, stop the admin API and close the recorder (its last batch
    written). With ``iatp`` (holding the service's signing key ``agent_id`` and the agents'
    public identities) every message is verified; without it ``trust_bus`` must be true.
    Prints ``ready admin=http://host:port`` on stdout once it takes messages; returns the
    service (its ``stats``). Raises VerificationRequired (neither or both of ``iatp`` and
    ``trust_bus``), PolicyLoadError, RecorderError, ValueError or a bus error when it cannot
    start."""
    from agent_os.control_plane.admin import AdminAPI

    kernel = KernelSpace(policy=policy, flight_recorder=recorder)
    client = AMB(broker_backend(broker), broker, agent_id=agent_id)
    service = ControlPlaneService(
        client,
        kernel,
        ingress_prefix=ingress_prefix,
        delivery_prefix=delivery_prefix,
        reply_prefix=reply_prefix,
        queue=queue,
        iatp=iatp,
        trust_bus=trust_bus,
    )
    stats = service.stats
    admin = AdminAPI(
        kernel,
        admin_token,
        require_verified_sender=iatp is not None,
        extra_metrics={
            "agentos_service_forwarded": lambda: stats.forwarded,
            "agentos_service_replies_forwarded": lambda: stats.replies_forwarded,
            "agentos_service_forward_failures": lambda: stats.forward_failures,
            "agentos_service_held_dropped": lambda: service.mediator.held_dropped,
            "agentos_service_release_failures": lambda: service.mediator.release_failures,
            "agentos_service_released_dead_lettered": lambda: stats.released_dead_lettered,
            "agentos_service_dead_letter_failures": lambda: stats.dead_letter_failures,
            "agentos_service_rejected": lambda: client.stats.rejected,
            "agentos_service_unverified": lambda: service.unverified,
            "agentos_service_pending_requests": lambda: len(service.pending),
            "agentos_service_unmatched_replies": lambda: service.pending.unmatched,
        },
    )
    async with stop_signals(stop) as stopping:
        try:
            await kernel.recorder.open()
            await service.start()
            port = await admin.start(admin_host, admin_port)
            log.info(
                "control-plane service %s on %s; admin API on %s:%d; senders %s",
                agent_id,
                broker,
                admin_host,
                port,
                "taken from the trusted bus" if trust_bus else "verified by IATP",
            )
            await serving(
                stopping, f"ready admin=http://{admin_host}:{port}", log, "finishing in-flight messages"
            )
        finally:
            await admin.stop()
            await service.stop()
            await kernel.close()
    return service


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", required=True, help="Broker URL: memory://name, nats://host:4222, redis://, kafka://."
)
@verification_options
@click.option("--policy", default="strict", show_default=True, help="A policy YAML file or a built-in name.")
@click.option(
    "--recorder",
    default="sqlite:///flight_recorder.db",
    show_default=True,
    help="memory, sqlite:///relative.db, sqlite:////abs.db or a postgresql:// DSN.",
)
@click.option("--retention-days", type=float, default=90.0, show_default=True, help="0: keep everything.")
@click.option(
    "--encryption-key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Encrypt recorder data at rest with this 32-byte key (raw or hex).",
)
@click.option("--admin-host", default="127.0.0.1", show_default=True)
@click.option("--admin-port", type=int, default=8787, show_default=True, help="0: any free port.")
@click.option("--admin-token", envvar="AGENTOS_ADMIN_TOKEN", required=True, help="Or AGENTOS_ADMIN_TOKEN.")
@click.option("--agent-id", default="control-plane", show_default=True)
@click.option("--queue", default=QUEUE_GROUP, show_default=True, help="Queue group shared by instances.")
@click.option("--ingress-prefix", default=INGRESS, show_default=True)
@click.option("--delivery-prefix", default=DELIVERY, show_default=True)
@click.option("--reply-prefix", default=REPLIES, show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
def main(
    broker: str,
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None,
    nonce_prefix: str,
    policy: str,
    recorder: str,
    retention_days: float,
    encryption_key_file: str | None,
    admin_host: str,
    admin_port: int,
    admin_token: str,
    agent_id: str,
    queue: str,
    ingress_prefix: str,
    delivery_prefix: str,
    reply_prefix: str,
    log_level: str,
) -> None:
    """Run the control-plane service (mediated mode) with its admin API until SIGINT/SIGTERM."""
    verification = verification_from_options(identities, trust_bus, nonce_store, nonce_prefix)

    async def serve_process() -> None:
        key = read_key_file(encryption_key_file) if encryption_key_file else None
        flight_recorder = recorder_from_spec(
            recorder, retention_days=retention_days or None, encryption_key=key
        )
        async with verification.opened(agent_id) as iatp:
            await serve(
                broker=broker,
                policy=load_policy(policy),
                recorder=flight_recorder,
                admin_token=admin_token,
                iatp=iatp,
                trust_bus=verification.trust_bus,
                admin_host=admin_host,
                admin_port=admin_port,
                agent_id=agent_id,
                queue=queue,
                ingress_prefix=ingress_prefix,
                delivery_prefix=delivery_prefix,
                reply_prefix=reply_prefix,
            )

    run(serve_process, log_level=log_level, errors=(ControlPlaneError,))


__all__ = [
    "DELIVERY",
    "INBOX",
    "INGRESS",
    "QUEUE_GROUP",
    "REPLIES",
    "ControlPlaneService",
    "NatsUser",
    "ReplyViaService",
    "ServiceStats",
    "agent_inbox",
    "broker_backend",
    "delivery_subject",
    "ingress_subject",
    "load_policy",
    "main",
    "nats_authorization",
    "nats_users",
    "read_key_file",
    "recorder_from_spec",
    "reply_subject",
    "require_verified_sender",
    "serve",
]


if __name__ == "__main__":
    main()
