"""Who a message acts for: the services decide a sender's identity here and nowhere else, with
IATP's fail-closed :func:`agent_os.iatp.sender_identity` (the rule: ``docs/trust.md``,
"Who sent it"), and refuse to run without verification unless told to trust the bus.
"""

from __future__ import annotations

from typing import Final

from agent_os.iatp import Unauthenticated, sender_identity

PASSPHRASE_ENV: Final = "AGENTOS_KEY_PASSPHRASE"
"""The environment variable holding the passphrase of a service's ``--identities`` key store."""

__all__ = [
    "PASSPHRASE_ENV",
    "Unauthenticated",
    "VerificationRequired",
    "require_verification",
    "sender_identity",
]


class VerificationRequired(ValueError):
    """A service asked to run with neither IATP verification nor an explicit ``trust_bus``."""


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
