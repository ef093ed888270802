"""The control-plane service: mediated mode, where no message reaches an agent unchecked.

Agents publish to *ingress* subjects (``ingress.<topic>``) and receive on *delivery* subjects
(``deliver.<topic>``). The service subscribes to ``ingress.>`` in the queue group
``control-plane`` (run several instances to share the load); for each message its mediator
(IATP first, when given) verifies the sender, applies signals and policy as operation
``publish`` on ``<topic>`` for the *sender*, and records the decision; an allowed message is
forwarded, envelope unchanged (so its signature still verifies at the receiver), to
``deliver.<topic>``; a denied one is dead-lettered by the service with the reason and counted.

Broker permissions make this the only way through: :func:`nats_authorization` generates the
NATS server's ``authorization`` block in which agents may publish only to ingress subjects (and
reply inboxes and dead letters) and subscribe only to delivery subjects, their inbox and their
own control subject, while only the service may publish to delivery and control subjects. A
message an agent sends straight to a delivery subject is refused by the server.

**Replies are mediated too.** A forwarded request keeps its ``reply_to`` (an inbox
``_INBOX.…`` of the requester; any other ``reply_to`` is denied), and the service notes it in
its table of pending requests (:mod:`control_plane.replies`). The responder's client carries
:class:`ReplyViaService`, which sends a reply meant for ``_INBOX.x`` to ``replies._INBOX.x``
instead. Every service instance receives replies (no queue group: the instance that forwarded
the request holds its entry); the one holding the entry checks the reply as operation
``reply`` on the request's topic, from the replier to the requester (plus: the correlation id
must be the request's, a request addressed to one agent is answered by that agent, one reply
per request, not after it expired), records exactly one decision, and forwards it unchanged to
the inbox. Instances without the entry drop the reply and count it
(``pending.unmatched``): a forged reply nobody waits for is dropped by all and recorded by
none, since no instance owns that decision. Agents may not publish to ``_INBOX.>`` under the
generated NATS permissions, so a reply around the service is refused by the server. The
service's own requests (remote signals) are noted the same way, so their replies also pass.

Example::

    kernel = KernelSpace(policy=Policy.from_yaml("policy.yaml"))
    service = ControlPlaneService(AMB("nats", url, agent_id="control-plane"), kernel)
    await service.start()
    # an agent:  AMB("nats", url, agent_id="worker", middleware=[iatp_mw, ReplyViaService()])

Run it as a process: ``python -m services.control_plane_service --help``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click

from amb import AMB, Metadata, Subscription, get_serializer
from amb.envelope import Envelope
from amb.errors import BusError
from amb.middleware import Middleware, PublishNext
from control_plane import ControlPlaneError, FlightRecorder, KernelSpace, Mediator, Policy
from control_plane.replies import PendingRequests
from control_plane.signals import CONTROL_PREFIX

log = logging.getLogger("services.control_plane")

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
    """Counters of one service instance (denied messages are in ``client.stats.rejected``)."""

    forwarded: int = 0
    replies_forwarded: int = 0
    forward_failures: int = 0


class ControlPlaneService:
    """One instance of the mediated control plane (see the module docstring).

    ``client`` is the service's own bus client (not yet connected); ``kernel`` holds the policy
    and the flight recorder; ``pending`` bounds the table of requests awaiting replies.
    Raises amb StateError when ``client`` is already connected.
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
    ) -> None:
        self.client = client
        self.kernel = kernel
        self.ingress_prefix = ingress_prefix
        self.delivery_prefix = delivery_prefix
        self.reply_prefix = reply_prefix
        self.queue = queue
        self.stats = ServiceStats()
        self.pending = pending or PendingRequests()
        self.mediator: Mediator = kernel.attach(
            client,
            inbound_prefix=ingress_prefix,
            reply_prefix=reply_prefix,
            pending=self.pending,
            inbox_prefix=INBOX,
        )
        self._encode = get_serializer("msgpack").encode
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        """Connect and start taking ingress messages (as a queue group) and replies (all)."""
        self._subs = [
            await self.client.subscribe(f"{self.ingress_prefix}.>", self._forward, queue=self.queue),
            await self.client.subscribe(f"{self.reply_prefix}.>", self._forward_reply),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish in-flight messages, then close the client."""
        await self.client.close(timeout)

    async def _forward(self, message: Any, metadata: Metadata) -> None:
        # Reached only when the mediator allowed the message (a deny was dead-lettered before),
        # and the mediator checked that the envelope's topic is this subject.
        topic = metadata.subject[len(self.ingress_prefix) + 1 :]
        env = metadata.envelope
        if env.reply_to:
            requester = metadata.context.get("control_plane_sender") or env.sender
            self.pending.add(env.reply_to, env.id, requester, topic, env.recipient, env.expires_at)
        await self._send(delivery_subject(topic, self.delivery_prefix), metadata)
        self.stats.forwarded += 1

    async def _forward_reply(self, message: Any, metadata: Metadata) -> None:
        # Reached only on the instance holding the request, when the mediator allowed the reply.
        await self._send(metadata.subject[len(self.reply_prefix) + 1 :], metadata)
        self.stats.replies_forwarded += 1

    async def _send(self, subject: str, metadata: Metadata) -> None:
        try:
            await self.client.broker.publish(subject, self._encode(metadata.envelope), key=metadata.sender)
        except Exception:
            self.stats.forward_failures += 1
            raise  # the bus retries or dead-letters it


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
    they receive delivery subjects, inboxes and their own control subject. Only the service
    publishes to delivery subjects, inboxes and control subjects. Passwords are generated
    unless given."""
    given = dict(passwords or {})
    users = [
        NatsUser(
            agent,
            given.get(agent) or secrets.token_urlsafe(24),
            (f"{ingress_prefix}.>", f"{reply_prefix}.>", f"{dead_letter_prefix}.>"),
            (f"{delivery_prefix}.>", f"{INBOX}.>", f"{CONTROL_PREFIX}.{agent}"),
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

_BACKENDS: Final = {"memory": "memory", "nats": "nats", "tls": "nats", "redis": "redis", "rediss": "redis"}
_BACKENDS_KAFKA: Final = {"kafka": "kafka"}


def broker_backend(url: str) -> str:
    """The bus backend for a broker URL (``memory://``, ``nats://``, ``tls://``, ``redis://``,
    ``rediss://``, ``kafka://``). Raises ValueError for another scheme."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    backend = {**_BACKENDS, **_BACKENDS_KAFKA}.get(scheme)
    if backend is None:
        raise ValueError(f"unsupported broker URL {url!r}: use memory://, nats://, redis:// or kafka://")
    return backend


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
    """A policy from a YAML file, or a built-in name (strict, permissive, audit). Raises
    PolicyLoadError (the line and field) or PolicyError."""
    return Policy.from_yaml(source) if Path(source).is_file() else Policy.builtin(source)


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
    admin_host: str = "127.0.0.1",
    admin_port: int = 8787,
    agent_id: str = "control-plane",
    queue: str = QUEUE_GROUP,
    ingress_prefix: str = INGRESS,
    delivery_prefix: str = DELIVERY,
    reply_prefix: str = REPLIES,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one service instance with its admin API until ``stop`` is set (or SIGINT/SIGTERM),
    then finish in-flight messages, stop the admin API and close the recorder (its last batch
    written). Prints ``ready admin=http://host:port`` on stdout once it takes messages.
    Raises PolicyLoadError, RecorderError, ValueError or a bus error when it cannot start."""
    from control_plane.admin import AdminAPI

    stop = stop or asyncio.Event()
    kernel = KernelSpace(policy=policy, flight_recorder=recorder)
    client = AMB(broker_backend(broker), broker, agent_id=agent_id)
    service = ControlPlaneService(
        client,
        kernel,
        ingress_prefix=ingress_prefix,
        delivery_prefix=delivery_prefix,
        reply_prefix=reply_prefix,
        queue=queue,
    )
    stats = service.stats
    admin = AdminAPI(
        kernel,
        admin_token,
        extra_metrics={
            "agentos_service_forwarded": lambda: stats.forwarded,
            "agentos_service_replies_forwarded": lambda: stats.replies_forwarded,
            "agentos_service_forward_failures": lambda: stats.forward_failures,
            "agentos_service_rejected": lambda: client.stats.rejected,
            "agentos_service_pending_requests": lambda: len(service.pending),
            "agentos_service_unmatched_replies": lambda: service.pending.unmatched,
        },
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await kernel.recorder.open()
        await service.start()
        port = await admin.start(admin_host, admin_port)
        print(f"ready admin=http://{admin_host}:{port}", flush=True)
        log.info("control-plane service %s on %s; admin API on %s:%d", agent_id, broker, admin_host, port)
        await stop.wait()
        log.info("stopping: finishing in-flight messages")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await admin.stop()
        await service.stop()
        await kernel.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", required=True, help="Broker URL: memory://name, nats://host:4222, redis://, kafka://.")
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
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        key = read_key_file(encryption_key_file) if encryption_key_file else None
        retention = retention_days or None
        flight_recorder = recorder_from_spec(recorder, retention_days=retention, encryption_key=key)
        asyncio.run(
            serve(
                broker=broker,
                policy=load_policy(policy),
                recorder=flight_recorder,
                admin_token=admin_token,
                admin_host=admin_host,
                admin_port=admin_port,
                agent_id=agent_id,
                queue=queue,
                ingress_prefix=ingress_prefix,
                delivery_prefix=delivery_prefix,
                reply_prefix=reply_prefix,
            )
        )
    except (ControlPlaneError, BusError, ValueError, OSError, ImportError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    main()
