"""Who a message acts for: the one place the services decide a sender's identity.

Every service answers for an agent: the memory service shows an agent its own memories, the
verifier records who asked, the control-plane service notes who is waiting for a reply. That
agent is :func:`sender_identity` of the message: IATP's one fail-closed helper
(:func:`agent_os.iatp.sender_identity`, re-exported here; the control plane's mediator applies the same
rule through :mod:`agent_os.control_plane.mediation.identity`):

- a valid IATP result in ``metadata.context["iatp"]`` (put there by the IATP middleware after
  the signature, key, time window, nonce and trust checks) names the sender;
- a result that is present but not valid (an unsigned message a subscription let through,
  say) is refused, whatever the envelope claims;
- with no result, the envelope's claimed ``sender`` is used only when the service was told to
  trust the bus (``trust_bus=True``: a broker whose ACLs already stop agents from publishing
  under another's name); otherwise the message is refused.

It never falls back to the claimed sender when verification is configured: that fallback is
what let a client publishing with ``sender_id="alice"`` read alice's memories.
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
