"""Several control-plane service instances in one queue group on NATS, each with its own kernel
and flight recorder, and the agents' clients: what the queue-group integration test and the
platform soak test share. Every name carries a tag unique to the test."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent_os.amb import AMB, Metadata, get_serializer
from agent_os.amb.envelope import Envelope, new_id
from agent_os.amb.middleware import Middleware
from agent_os.control_plane import DECISION_EVENTS, Pattern, Policy
from agent_os.control_plane.recorder import Record
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
)
from tests.support import Collector
from tests.support.servers import NATS_URL

INSTANCES = 3
SENTINEL = "sentinel"


def queue_group_policy() -> Policy:
    policy = Policy("mediated", default_action="deny")
    policy.add_rule("deny", Pattern("publish", "tasks.secret"), reason="secret")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    policy.add_rule("allow", Pattern("request", "tasks.ask"))
    policy.add_rule("allow", Pattern("reply", "tasks.ask"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


@dataclass
class Group:
    """``INSTANCES`` service instances in one queue group, each with its own kernel (and so its
    own flight recorder), and the agents' clients of the test; every name carries ``tag``."""

    tag: str
    services: list[ControlPlaneService] = field(default_factory=list)
    clients: list[AMB] = field(default_factory=list)

    @property
    def ingress_prefix(self) -> str:
        return f"in_{self.tag}"

    @property
    def delivery_prefix(self) -> str:
        return f"out_{self.tag}"

    @property
    def reply_prefix(self) -> str:
        return f"re_{self.tag}"

    def to(self, topic: str) -> str:
        """Where an agent publishes a message for ``topic``."""
        return ingress_subject(topic, self.ingress_prefix)

    def delivered(self, topic: str, agent: str) -> str:
        """Where ``agent`` receives a message for ``topic``."""
        return delivery_subject(topic, self.delivery_prefix, agent=agent)

    @property
    def every_delivery(self) -> str:
        """What matches every delivery subject of the group (a wiretap's subscription; under
        the generated NATS permissions no agent may subscribe to it)."""
        return f"{self.delivery_prefix}.>"

    def agent_id(self, name: str) -> str:
        """The id of the test's agent ``name``."""
        return f"{name}-{self.tag}"

    def agent(self, name: str, *, requests: bool = False, middleware: list[Middleware] | None = None) -> AMB:
        """A connected-on-use client of agent ``<name>-<tag>``; ``requests``: its reply inbox is
        under its own prefix, as mediated mode requires of a requester."""
        agent_id = self.agent_id(name)
        client = AMB(
            "nats",
            NATS_URL,
            agent_id=agent_id,
            inbox_prefix=agent_inbox(agent_id) if requests else None,
            middleware=middleware or [],
        )
        self.clients.append(client)
        return client

    async def records(self, **filters: Any) -> list[list[Record]]:
        """Each instance's ``policy_decision`` records matching ``filters`` (``data.<field>``)."""
        return [
            await s.kernel.recorder.query(event_type=DECISION_EVENTS, filters=filters) for s in self.services
        ]

    async def sentinels(self, subjects: list[str]) -> None:
        """Each instance publishes a sentinel to each of ``subjects`` on its own connection,
        behind everything it forwarded or dead-lettered so far: NATS keeps the order from one
        connection to a subscriber, so once a subscriber has an instance's sentinel it has
        everything that instance sent it before."""
        encode = get_serializer("msgpack").encode
        for service in self.services:
            sender = service.client.agent_id
            assert sender is not None
            for subject in subjects:
                env = Envelope(new_id(), subject, sender, SENTINEL, timestamp=time.time_ns())
                await service.client.broker.publish(subject, encode(env), key=sender)

    async def close(self) -> None:
        """Close the agents' clients, then stop every instance and close its kernel, each even
        when closing another failed (the first failure is raised)."""
        errors: list[BaseException] = []
        for close in [c.close for c in self.clients] + [
            step for s in self.services for step in (s.stop, s.kernel.close)
        ]:
            try:
                await close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def real(collector: Collector) -> list[Metadata]:
    """What ``collector`` received apart from the instances' sentinels."""
    return [m for m, p in zip(collector.metadata, collector.messages, strict=True) if p != SENTINEL]
