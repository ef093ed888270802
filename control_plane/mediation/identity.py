"""Who an inbound message comes from, for the mediator: IATP's sender-identity rule, on the hot path.

The rule is explained once, in ``docs/trust.md`` ("Who sent it"), with what the mediator adds
in ``docs/control-plane.md`` ("Who sent a message"); :func:`agent_os.iatp.sender_identity`
implements it. :func:`message_sender` applies it and adds
what the mediator needs beside the name: whether the sender was *verified*, its trust level, and
the reason to refuse, without raising on the common path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_os.amb.metadata import Metadata
from agent_os.iatp import RESULT, Unauthenticated, VerificationResult, sender_identity

__all__ = ["Unauthenticated", "message_sender", "sender_identity"]


def message_sender(metadata: Metadata, trust_bus: bool) -> tuple[str | None, bool, float, str | None]:
    """``(sender, verified, trust_level, refusal)`` of an inbound message (docs/control-plane.md).

    ``refusal`` is the reason to refuse the message outright (an IATP result that is present
    and not valid), else None; ``sender`` is None when no sender is established. Never raises.
    """
    result = metadata.context.get(RESULT)
    if result is None:  # sender_identity's rule without a result, inline on the hot path
        claimed = metadata.sender if trust_bus else None
        return (claimed or None), False, 0.0, None
    if type(result) is VerificationResult:  # IATP's own result: the same rule, by attribute
        sender = result.sender
        if result.valid is True and type(sender) is str and sender:
            return sender, True, float(result.trust_level), None
        return None, False, 0.0, _invalid(result.reason)
    try:
        sender = sender_identity(metadata, trust_bus=trust_bus)
    except Unauthenticated:
        return None, False, 0.0, _invalid(_field(result, "reason"))
    trust = _field(result, "trust_level")
    try:
        level = float(trust) if trust is not None else 0.0
    except (TypeError, ValueError):
        level = 0.0
    return sender, True, level, None


def _invalid(reason: Any) -> str:
    return f"the message's IATP verification is not valid ({reason or 'invalid'})"


def _field(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(name)
    return getattr(result, name, None)
