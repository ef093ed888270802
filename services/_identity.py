"""Who a message acts for: the services' view of :mod:`control_plane.identity`.

Every service answers for an agent: the memory service shows an agent its own memories, the
verifier records who asked, the control-plane service notes who is waiting for a reply. That
agent is :func:`sender_identity` of the message, decided in one way for the whole platform (the
mediator applies the same rule): a valid IATP result names the sender; a present but invalid
result is refused; with no result the claimed sender counts only with ``trust_bus=True``. The
helper lives in ``control_plane`` so that the mediator (which may not import ``services``) and
the services share one implementation; this module re-exports it.
"""

from __future__ import annotations

from typing import Final

from control_plane.identity import (
    Unauthenticated,
    VerificationRequired,
    require_verification,
    sender_identity,
)

PASSPHRASE_ENV: Final = "AGENTOS_KEY_PASSPHRASE"
"""The environment variable holding the passphrase of a service's ``--identities`` key store."""

__all__ = [
    "PASSPHRASE_ENV",
    "Unauthenticated",
    "VerificationRequired",
    "require_verification",
    "sender_identity",
]
