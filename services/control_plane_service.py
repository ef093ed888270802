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

Replies to requests go to the requester's inbox directly (agents may publish to ``_INBOX.>``):
request/reply is mediated on the request leg only.

Example::

    kernel = KernelSpace(policy=Policy.from_yaml("policy.yaml"))
    service = ControlPlaneService(AMB("nats", url, agent_id="control-plane"), kernel)
    await service.start()
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from amb import AMB, Metadata, Subscription, get_serializer
from control_plane import KernelSpace, Mediator
from control_plane.signals import CONTROL_PREFIX

log = logging.getLogger("services.control_plane")

INGRESS: Final = "ingress"
DELIVERY: Final = "deliver"
QUEUE_GROUP: Final = "control-plane"


def ingress_subject(topic: str, prefix: str = INGRESS) -> str:
    """Where an agent publishes a message meant for ``topic`` in mediated mode."""
    return f"{prefix}.{topic}"


def delivery_subject(topic: str, prefix: str = DELIVERY) -> str:
    """Where agents subscribe to receive ``topic`` in mediated mode."""
    return f"{prefix}.{topic}"


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service instance (denied messages are in ``client.stats.rejected``)."""

    forwarded: int = 0
    forward_failures: int = 0


class ControlPlaneService:
    """One instance of the mediated control plane (see the module docstring).

    ``client`` is the service's own bus client (not yet connected); ``kernel`` holds the policy
    and the flight recorder. Raises amb StateError when ``client`` is already connected.
    """

    def __init__(
        self,
        client: AMB,
        kernel: KernelSpace,
        *,
        ingress_prefix: str = INGRESS,
        delivery_prefix: str = DELIVERY,
        queue: str = QUEUE_GROUP,
    ) -> None:
        self.client = client
        self.kernel = kernel
        self.ingress_prefix = ingress_prefix
        self.delivery_prefix = delivery_prefix
        self.queue = queue
        self.stats = ServiceStats()
        self.mediator: Mediator = kernel.attach(client, inbound_prefix=ingress_prefix)
        self._encode = get_serializer("msgpack").encode
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Connect and start taking ingress messages."""
        self._sub = await self.client.subscribe(f"{self.ingress_prefix}.>", self._forward, queue=self.queue)

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish in-flight messages, then close the client."""
        await self.client.close(timeout)

    async def _forward(self, message: Any, metadata: Metadata) -> None:
        # Reached only when the mediator allowed the message (a deny was dead-lettered before).
        topic = metadata.subject[len(self.ingress_prefix) + 1 :]
        subject = delivery_subject(topic, self.delivery_prefix)
        try:
            await self.client.broker.publish(subject, self._encode(metadata.envelope), key=metadata.sender)
        except Exception:
            self.stats.forward_failures += 1
            raise  # the bus retries or dead-letters it
        self.stats.forwarded += 1


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
    dead_letter_prefix: str = "_DLQ",
    passwords: Mapping[str, str] | None = None,
) -> list[NatsUser]:
    """The NATS users of a mediated deployment: one per agent (user name = agent id) and the
    service. Passwords are generated unless given."""
    given = dict(passwords or {})
    users = [
        NatsUser(
            agent,
            given.get(agent) or secrets.token_urlsafe(24),
            (f"{ingress_prefix}.>", "_INBOX.>", f"{dead_letter_prefix}.>"),
            (f"{delivery_prefix}.>", "_INBOX.>", f"{CONTROL_PREFIX}.{agent}"),
        )
        for agent in agents
    ]
    users.append(
        NatsUser(
            service_user,
            given.get(service_user) or secrets.token_urlsafe(24),
            (f"{delivery_prefix}.>", "_INBOX.>", f"{dead_letter_prefix}.>", f"{CONTROL_PREFIX}.>"),
            (f"{ingress_prefix}.>", "_INBOX.>", f"{CONTROL_PREFIX}.{service_user}"),
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
