"""The NATS users and permissions of a mediated deployment (``docs/services.md``, "NATS
permissions"): agents can reach each other only through the control-plane service, and read
only what is addressed to them."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from agent_os.control_plane.mediation.control import CONTROL_PREFIX
from agent_os.services.control_plane_service._subjects import (
    AGENT_DEAD_LETTERS,
    DELIVERY,
    INBOX,
    INGRESS,
    REPLIES,
    agent_inbox,
    check_agent_dead_letter_prefix,
    check_agent_id,
    check_prefix,
)

MAX_PASSWORD: Final = 256


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
    agent_dead_letter_prefix: str = AGENT_DEAD_LETTERS,
    passwords: Mapping[str, str] | None = None,
) -> list[NatsUser]:
    """The NATS users of a mediated deployment: one per agent (user name = agent id) and the
    service. An agent publishes only to ingress and reply subjects; it subscribes only to its
    own delivery subjects (``<delivery>.<agent>.>``), its own inboxes (``_INBOX.<agent>.>``),
    its own dead letters (``<agent_dead_letter_prefix>.<agent>.>``, see
    :func:`dead_letter_subject`) and its own control subject. Only the service publishes to
    delivery subjects, inboxes, control subjects and dead letters (the operator's and the
    agents'). Passwords are generated unless given.

    Raises ValueError for an agent id or service user :func:`check_agent_id` refuses, one
    given twice (an agent named like the service user too), a prefix that is not subject
    tokens, an agent dead-letter prefix that overlaps another prefix (``_DLQ`` itself would let
    an agent named ``ingress`` read the operator's dead letters), or a given password with
    control characters or over 256 characters."""
    service_user = check_agent_id(service_user)
    for what, prefix in (
        ("ingress prefix", ingress_prefix),
        ("delivery prefix", delivery_prefix),
        ("reply prefix", reply_prefix),
        ("dead-letter prefix", dead_letter_prefix),
        ("agent dead-letter prefix", agent_dead_letter_prefix),
    ):
        check_prefix(prefix, what)
    others = (ingress_prefix, delivery_prefix, reply_prefix, dead_letter_prefix, INBOX, CONTROL_PREFIX)
    check_agent_dead_letter_prefix(agent_dead_letter_prefix, others)
    names = [check_agent_id(agent) for agent in agents]
    seen: set[str] = set()
    for name in [*names, service_user]:
        if name in seen:
            raise ValueError(f"user {name!r} given twice (an agent id must differ from the service user's)")
        seen.add(name)
    given = dict(passwords or {})
    for name, password in given.items():
        _check_password(name, password)

    def password_of(name: str) -> str:
        return given.get(name) or secrets.token_urlsafe(24)

    users = [
        NatsUser(
            agent,
            password_of(agent),
            (f"{ingress_prefix}.>", f"{reply_prefix}.>"),
            (
                f"{delivery_prefix}.{agent}.>",
                f"{agent_inbox(agent)}.>",
                f"{agent_dead_letter_prefix}.{agent}.>",
                f"{CONTROL_PREFIX}.{agent}",
            ),
        )
        for agent in names
    ]
    users.append(
        NatsUser(
            service_user,
            password_of(service_user),
            (
                f"{delivery_prefix}.>",
                f"{INBOX}.>",
                f"{dead_letter_prefix}.>",
                f"{agent_dead_letter_prefix}.>",
                f"{CONTROL_PREFIX}.>",
            ),
            (f"{ingress_prefix}.>", f"{reply_prefix}.>", f"{INBOX}.>", f"{CONTROL_PREFIX}.{service_user}"),
        )
    )
    return users


def _check_password(name: str, password: str) -> None:
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
        raise ValueError(f"the password of {name!r} must be 1 to {MAX_PASSWORD} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise ValueError(f"the password of {name!r} has a control character")


def _quote(value: str) -> str:
    """``value`` as a double-quoted nats-server configuration string: backslashes and quotes
    escaped, control characters refused (nothing in it can end the string)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"cannot write a control character into the configuration: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nats_authorization(users: Iterable[NatsUser]) -> str:
    """The ``authorization { users = [...] }`` block of a nats-server configuration. Every
    value is quoted and escaped. Raises ValueError for a user name :func:`check_agent_id`
    refuses, a user given twice, or a value with a control character."""

    def quoted(values: Iterable[str]) -> str:
        return "[" + ", ".join(_quote(v) for v in values) + "]"

    lines = ["authorization {", "  users = ["]
    seen: set[str] = set()
    for u in users:
        check_agent_id(u.user)
        if u.user in seen:
            raise ValueError(f"user {u.user!r} given twice")
        seen.add(u.user)
        lines.append(
            f"    {{user: {_quote(u.user)}, password: {_quote(u.password)}, permissions: {{"
            f"publish: {{allow: {quoted(u.publish)}}}, subscribe: {{allow: {quoted(u.subscribe)}}}}}}}"
        )
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"
