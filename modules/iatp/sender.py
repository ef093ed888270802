"""Who sent a delivered message: :func:`sender_identity`, the one fail-closed answer for every
consumer (``docs/trust.md``, "Who sent it").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_os.iatp.errors import Unauthenticated
from agent_os.iatp.middleware import RESULT


def sender_identity(metadata: Any, *, trust_bus: bool = False) -> str:
    """The agent a delivered message acts for (see ``docs/trust.md``).

    ``metadata`` is the delivery's :class:`agent_os.amb.Metadata` (anything with ``context`` and
    ``sender``). The IATP result may be a :class:`~agent_os.iatp.VerificationResult` or a mapping with
    ``valid`` and ``sender``; it counts only when ``valid is True`` and the sender is a
    non-empty string.

    Raises Unauthenticated when the result is present but not valid (or names no sender), when
    there is no result and ``trust_bus`` is false, or when a trusted envelope names no sender.
    Never raises anything else, and never returns the claimed sender unless ``trust_bus``.
    """
    context = getattr(metadata, "context", None)
    result = context.get(RESULT) if isinstance(context, Mapping) else None
    if result is not None:
        sender = _field(result, "sender")
        if _field(result, "valid") is not True or not isinstance(sender, str) or not sender:
            raise Unauthenticated("the message's IATP verification is not valid")
        return sender
    if not trust_bus:
        raise Unauthenticated("the message was not verified by IATP (and the bus is not trusted)")
    sender = getattr(metadata, "sender", None)
    if not isinstance(sender, str) or not sender:
        raise Unauthenticated("the message has no sender")
    return sender


def _field(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(name)
    return getattr(result, name, None)
