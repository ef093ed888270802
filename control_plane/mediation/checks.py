"""Mediated-mode checks: what an ingress message or a reply passing the service must satisfy.

Structural checks made before the policy is asked: the subject decides where the service
forwards a message, a request's ``reply_to`` must be its sender's own free inbox, a reply must
match the request it answers (``docs/control-plane.md``, Mediated mode).
"""

from __future__ import annotations

import re
from typing import Final

from agent_os.amb.envelope import Envelope
from agent_os.control_plane.mediation.replies import PendingRequest, PendingRequests

_TOKEN: Final = re.compile(r"[^.*>\s]+")  # an agent id usable as one subject token


def operation(env: Envelope) -> str:
    """An ingress message's operation: ``request`` (it has a ``reply_to``), ``reply`` (a
    ``correlation_id``), else ``publish``."""
    if env.reply_to:
        return "request"
    if env.correlation_id:
        return "reply"
    return "publish"


def mediated_check(
    env: Envelope,
    subject: str,
    route: PendingRequest | None,
    sender: str | None,
    inbound_prefix: str | None,
    inbox_prefix: str,
    pending: PendingRequests | None,
) -> tuple[str, str, str | None, str | None]:
    """Operation, resource, recipient and a structural reason to deny (or None) of an
    ingress message (on ``<inbound_prefix><topic>``; the prefixes end with a dot) or, with
    ``route`` (its pending request), a reply passing the service."""
    recipient: str | None
    if route is not None:
        op, resource, recipient = "reply", route.topic, route.requester
    else:
        assert inbound_prefix is not None
        op, resource, recipient = operation(env), subject[len(inbound_prefix) :], env.recipient
    why = None
    if env.topic != subject:
        why = f"the envelope's topic {env.topic!r} is not its subject {subject!r}"
    elif route is not None:
        if env.reply_to:
            why = "a reply cannot ask for a reply"
        elif env.correlation_id != route.request_id:
            why = "the reply's correlation id does not match the request"
        elif route.recipient is not None and sender != route.recipient:
            why = f"the request was addressed to {route.recipient}, not {sender}"
        elif route.answered:
            why = "the request was already answered"
        elif route.expired():
            why = "the request expired"
    elif op == "request" and pending is not None:
        why = inbox_refusal(env.reply_to, sender, inbox_prefix, pending)
    return op, resource, recipient, why


def inbox_refusal(
    reply_to: str | None, sender: str | None, inbox_prefix: str, pending: PendingRequests
) -> str | None:
    """Why a request's ``reply_to`` is refused (None: it is the sender's own free inbox,
    ``<inbox_prefix><sender>.…``, not waiting for another reply)."""
    if sender is None or _TOKEN.fullmatch(sender) is None:
        return f"reply_to needs a sender usable as an inbox token, not {sender!r}"
    own = f"{inbox_prefix}{sender}."
    if reply_to is None or not reply_to.startswith(own):
        return f"reply_to must be an inbox of the sender ({own}...)"
    if pending.waiting(reply_to):
        return "reply_to is already waiting for the reply to another request"
    return None
