"""Who a message comes from: the one place the control plane and the services decide a sender.

The rule, applied by the mediator to every inbound message and by every service to every
request (``services._identity`` re-exports this module):

- a **valid** IATP result in ``metadata.context["iatp"]`` (put there by IATP's middleware after
  the signature, key, time window, nonce and trust checks) names the sender: *verified*;
- a result that is present but **not valid** (an unsigned message a subscription let through
  with ``ACCEPT_UNSIGNED``, say) is refused, whatever the envelope claims and whatever the bus;
- with **no result**, the envelope's claimed ``sender`` counts only where the process trusts
  the bus (``trust_bus``): an in-process broker, or a broker whose ACLs already stop clients
  from publishing under another's name. It is then *established* but not *verified*
  (``verified`` stays False and the trust level 0, so ``require_verified_sender`` still denies
  it). Otherwise there is no sender: the claim is only a claim.

It never falls back to the claimed sender when verification failed: that fallback let a client
publishing with ``sender_id="supervisor"`` signal another agent, and one publishing with
``sender_id="alice"`` read alice's memories.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amb.metadata import Metadata
from iatp.middleware import RESULT

__all__ = [
    "Unauthenticated",
    "VerificationRequired",
    "message_sender",
    "require_verification",
    "sender_identity",
]


class Unauthenticated(Exception):
    """A message whose sender is not established: no valid IATP result where verification is
    required, an invalid result anywhere, or no sender at all."""


class VerificationRequired(ValueError):
    """A service asked to run with neither IATP verification nor an explicit ``trust_bus``."""


def message_sender(
    context: Mapping[str, Any], claimed: str | None, trust_bus: bool
) -> tuple[str | None, bool, float, str | None]:
    """``(sender, verified, trust_level, refusal)`` of a message (see the module docstring).

    ``refusal`` is the reason to refuse the message outright (an IATP result that is present
    and not valid), else None; ``sender`` is None when no sender is established. Never raises.
    """
    result = context.get(RESULT)
    if result is not None:
        valid = getattr(result, "valid", None)
        if valid is None and isinstance(result, Mapping):
            valid, sender, trust, reason = (
                result.get("valid"),
                result.get("sender"),
                result.get("trust_level"),
                result.get("reason"),
            )
        else:
            sender = getattr(result, "sender", None)
            trust = getattr(result, "trust_level", None)
            reason = getattr(result, "reason", None)
        if valid is True and isinstance(sender, str) and sender:
            try:
                level = float(trust) if trust is not None else 0.0
            except (TypeError, ValueError):
                level = 0.0
            return sender, True, level, None
        return None, False, 0.0, f"the message's IATP verification is not valid ({reason or 'invalid'})"
    if trust_bus and isinstance(claimed, str) and claimed:
        return claimed, False, 0.0, None
    return None, False, 0.0, None


def sender_identity(metadata: Metadata, *, trust_bus: bool = False) -> str:
    """The agent ``metadata``'s message acts for (see the module docstring).

    Raises Unauthenticated when the IATP result is present but not valid (or names no sender),
    when there is no result and ``trust_bus`` is false, or when the trusted envelope names no
    sender. Never raises anything else.
    """
    sender, _, _, refusal = message_sender(metadata.context, metadata.sender, trust_bus)
    if refusal is not None:
        raise Unauthenticated(refusal)
    if sender is None:
        if not trust_bus:
            raise Unauthenticated("the message was not verified by IATP (the service does not trust the bus)")
        raise Unauthenticated("the message has no sender")
    return sender


def require_verification(verifies: bool, trust_bus: bool, service: str) -> None:
    """Refuse a service set up to take claimed senders without being told to.

    Raises VerificationRequired when neither ``verifies`` (IATP checks the service's messages)
    nor ``trust_bus`` is true, or when both are (they contradict each other)."""
    if verifies and trust_bus:
        raise VerificationRequired(f"the {service} verifies senders with IATP; trust_bus contradicts it")
    if not verifies and not trust_bus:
        raise VerificationRequired(
            f"refusing to run the {service} without sender verification: give it IATP identities, "
            "or trust_bus=True when the broker's ACLs already authenticate senders"
        )
