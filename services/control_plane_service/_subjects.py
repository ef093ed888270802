"""The subject names of mediated mode: ingress, delivery, reply, inbox and per-agent dead-letter
subjects, and the agent ids and prefixes they are built from (checked, since they also go into
the broker's permissions)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from agent_os.amb.deadletter import dead_letter_subject as bounded_dead_letter_subject

INGRESS: Final = "ingress"
DELIVERY: Final = "deliver"
REPLIES: Final = "replies"
INBOX: Final = "_INBOX"
AGENT_DEAD_LETTERS: Final = "_DLQ_AGENT"
"""The prefix of the agents' own copies of dead letters. Not under the operator's ``_DLQ``: an
agent named like the first token of a dead-lettered subject (``ingress``, ``replies``) would
otherwise read the operator's dead letters of everyone."""
QUEUE_GROUP: Final = "control-plane"

AGENT_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_AGENT_ID: Final = re.compile(AGENT_ID_PATTERN)
_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]{1,64}(?:\.[A-Za-z0-9_-]{1,64}){0,7}")


def check_agent_id(agent_id: str) -> str:
    """``agent_id`` when it can be an agent in mediated mode: 1 to 64 ASCII letters, digits,
    ``_`` and ``-``, starting with a letter or digit (one subject token, safe in a broker
    configuration). Raises ValueError naming the id otherwise."""
    if not isinstance(agent_id, str) or _AGENT_ID.fullmatch(agent_id) is None:
        raise ValueError(f"an agent id in mediated mode must match {AGENT_ID_PATTERN}, got {agent_id!r}")
    return agent_id


def check_prefix(prefix: str, what: str = "prefix") -> str:
    """``prefix`` when it is a usable subject prefix: dot-separated tokens of ASCII letters,
    digits, ``_`` and ``-`` (at most 8 tokens of 64). Raises ValueError otherwise."""
    if not isinstance(prefix, str) or _PREFIX.fullmatch(prefix) is None:
        raise ValueError(f"a {what} must be dot-separated tokens of [A-Za-z0-9_-], got {prefix!r}")
    return prefix


def ingress_subject(topic: str, prefix: str = INGRESS) -> str:
    """Where an agent publishes a message meant for ``topic`` in mediated mode."""
    return f"{prefix}.{topic}"


def delivery_subject(topic: str, prefix: str = DELIVERY, *, agent: str) -> str:
    """Where ``agent`` receives ``topic`` in mediated mode: ``<prefix>.<agent>.<topic>``, a
    subject only that agent may read (``topic`` may be a pattern, to subscribe). Raises
    ValueError for an agent id :func:`check_agent_id` refuses."""
    return f"{prefix}.{check_agent_id(agent)}.{topic}"


def dead_letter_subject(subject: str, prefix: str = AGENT_DEAD_LETTERS, *, agent: str) -> str:
    """Where ``agent`` reads the copy of a dead letter of its own message refused on
    ``subject``: ``<prefix>.<agent>.<subject>``, bounded as every dead letter is
    (:func:`agent_os.amb.deadletter.dead_letter_subject`: the hashed form
    ``<prefix>.<agent>.<readable>.<digest>`` when the whole would not be a valid subject), so
    always under ``<prefix>.<agent>.``, a subject only that agent may read. ``subject`` may be
    a pattern (``>``, ``ingress.tasks.*``), to subscribe. Raises ValueError for an agent id
    :func:`check_agent_id` refuses."""
    own = f"{prefix}.{check_agent_id(agent)}"
    if any(token in ("*", ">") for token in subject.split(".")):
        return f"{own}.{subject}"
    return bounded_dead_letter_subject(own, subject)


def prefixes_overlap(a: str, b: str) -> bool:
    """Whether one of the prefixes ``a`` and ``b`` covers subjects of the other (they are
    equal, or one is the other followed by more tokens)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def check_agent_dead_letter_prefix(prefix: str, others: Iterable[str]) -> str:
    """``prefix`` when no prefix of ``others`` covers its subjects or is covered by it (an
    agent allowed ``<prefix>.<agent>.>`` would read what goes there). Raises ValueError."""
    for other in others:
        if prefixes_overlap(prefix, other):
            raise ValueError(f"the agent dead-letter prefix {prefix!r} overlaps the prefix {other!r}")
    return prefix


def agent_inbox(agent_id: str, prefix: str = INBOX) -> str:
    """The inbox prefix of ``agent_id`` in mediated mode: its requests' ``reply_to`` must be
    under ``<this>.``. Raises ValueError for an agent id :func:`check_agent_id` refuses (a
    ``.``, ``*`` or ``>`` would let one agent's inboxes cover another's)."""
    return f"{prefix}.{check_agent_id(agent_id)}"


def reply_subject(reply_to: str, prefix: str = REPLIES) -> str:
    """Where an agent publishes a reply meant for the inbox ``reply_to`` in mediated mode."""
    return f"{prefix}.{reply_to}"
