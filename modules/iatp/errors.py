"""The errors of the Inter-Agent Trust Protocol: one tree under :class:`IATPError`.

Verification never raises on what a message contains (it returns a reason); these are for
misuse, configuration, key storage and the bus middleware, whose two rejections derive from
:class:`agent_os.amb.MessageRejected`. The tree is drawn in ``docs/trust.md``, "Errors".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_os.amb.errors import MessageRejected

if TYPE_CHECKING:
    from agent_os.iatp.result import VerificationResult


class IATPError(Exception):
    """Root of every error raised by IATP."""


class IATPConfigError(IATPError, ValueError):
    """An option is invalid, or names a key storage, algorithm or trust model not offered."""


class CryptoUnavailable(IATPError, ImportError):
    """PyNaCl cannot be imported: IATP refuses to sign, and verification reports invalid."""

    def __init__(self, cause: BaseException | None = None) -> None:
        super().__init__(
            "PyNaCl is not importable, so IATP can neither sign nor verify "
            f"(install it: pip install 'agent-os[iatp]'){f': {cause}' if cause else ''}"
        )


class UnknownAgent(IATPError, LookupError):
    """No identity (or, for signing, no private key) is held for the agent."""

    def __init__(self, agent_id: str, what: str = "identity") -> None:
        super().__init__(f"no {what} for agent {agent_id!r}")
        self.agent_id = agent_id


class AgentExists(IATPError, ValueError):
    """The agent id is already registered."""


class UnknownKey(IATPError, LookupError):
    """No key with that id is known."""


class KeyStoreError(IATPError):
    """Key storage failed."""


class WrongPassphrase(KeyStoreError):
    """The passphrase does not open the key store."""


class KeyStoreCorrupt(KeyStoreError):
    """A key store file is damaged, or its content does not match its name."""


class InsecureKeyStore(KeyStoreError):
    """A key store file or directory is accessible to other users; it is refused, not used."""


class TrustError(IATPError, ValueError):
    """A trust level, edge or certificate is invalid (bad value, bad signature, unknown signer)."""


class IdentityConflict(TrustError):
    """An imported identity would give an agent keys it has not proven are its own: new keys for
    a local agent (never accepted), new keys for a known remote agent without a rotation
    statement by one of its valid keys, or a key id that already belongs to another agent. The
    import is refused as a whole; nothing of it is merged."""


class NonceStoreUnavailable(IATPError):
    """The shared nonce store (Redis) cannot be reached or answered wrongly: the message it was
    asked about is rejected (reason ``nonce_store_unavailable``), never accepted unchecked."""


class Unauthenticated(IATPError):
    """:func:`agent_os.iatp.sender_identity` cannot name an authenticated sender: the IATP result is
    present but not valid, or absent where the bus is not trusted, or there is no sender."""


class SessionError(IATPError):
    """A session handshake failed, or a session is unknown, closed or expired."""


class SigningRejected(IATPError, MessageRejected):
    """Outbound: the message cannot be signed (no private key for its sender here)."""

    reason = "no_signing_key"


class SignatureRejected(IATPError, MessageRejected):
    """Inbound: the message failed verification; ``reason`` and ``result`` say why."""

    def __init__(self, result: VerificationResult) -> None:
        reason = result.reason or "invalid"
        detail = f": {result.detail}" if result.detail else ""
        super().__init__(f"message from {result.sender!r} rejected ({reason}){detail}", reason=reason)
        self.result = result
