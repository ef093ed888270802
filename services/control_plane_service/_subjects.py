"""The subject names of mediated mode: ingress, delivery, reply and inbox subjects."""

from __future__ import annotations

from typing import Final

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
