"""The NATS users and permissions of a mediated deployment (``docs/services.md``, "Mediated
mode"): agents can reach each other only through the control-plane service."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent_os.control_plane.mediation.control import CONTROL_PREFIX
from agent_os.services.control_plane_service._subjects import DELIVERY, INBOX, INGRESS, REPLIES, agent_inbox


@dataclass(frozen=True, slots=True)
class NatsUser:
    """One user of the nats-server configuration: its name, password and allowed subjects."""

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
