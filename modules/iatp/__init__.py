"""Inter-Agent Trust Protocol: ed25519 identities, signed envelopes, replay protection and trust.

Entry point: :class:`IATP`; the bus layer: :meth:`IATP.middleware`. The protocol is described in
``docs/trust.md``.
"""

from agent_os.iatp.canonical import UNSIGNED_HEADERS, envelope_bytes, key_id_for
from agent_os.iatp.errors import (
    AgentExists,
    CryptoUnavailable,
    IATPConfigError,
    IATPError,
    IdentityConflict,
    InsecureKeyStore,
    KeyStoreCorrupt,
    KeyStoreError,
    NonceStoreUnavailable,
    SessionError,
    SignatureRejected,
    SigningRejected,
    TrustError,
    Unauthenticated,
    UnknownAgent,
    UnknownKey,
    WrongPassphrase,
)
from agent_os.iatp.filestore import FileKeyStore
from agent_os.iatp.iatp import IATP
from agent_os.iatp.keys import Identity, KeyRecord
from agent_os.iatp.keystore import KeyStore, MemoryKeyStore, StoreContents, WatchedKeyStore
from agent_os.iatp.middleware import (
    ACCEPT_UNSIGNED,
    BIND_TOPIC,
    MIN_TRUST,
    REPLAY_SCOPE,
    RESULT,
    IATPMiddleware,
)
from agent_os.iatp.models import HierarchicalTrust, PkiTrust, TrustModel, WebOfTrust
from agent_os.iatp.noncestore import RedisNonceStore, SharedNonceStore
from agent_os.iatp.result import Reason, VerificationResult
from agent_os.iatp.sender import sender_identity
from agent_os.iatp.session import (
    SESSION_SCHEME,
    PendingSession,
    Session,
    SessionAnswer,
    SessionConfirmation,
    SessionOffer,
)
from agent_os.iatp.trust import Certificate, TrustEdge
from agent_os.iatp.verifier import ED25519

__all__ = [
    "ACCEPT_UNSIGNED",
    "BIND_TOPIC",
    "ED25519",
    "IATP",
    "MIN_TRUST",
    "REPLAY_SCOPE",
    "RESULT",
    "SESSION_SCHEME",
    "UNSIGNED_HEADERS",
    "AgentExists",
    "Certificate",
    "CryptoUnavailable",
    "FileKeyStore",
    "HierarchicalTrust",
    "IATPConfigError",
    "IATPError",
    "IATPMiddleware",
    "Identity",
    "IdentityConflict",
    "InsecureKeyStore",
    "KeyRecord",
    "KeyStore",
    "KeyStoreCorrupt",
    "KeyStoreError",
    "MemoryKeyStore",
    "NonceStoreUnavailable",
    "PendingSession",
    "PkiTrust",
    "Reason",
    "RedisNonceStore",
    "Session",
    "SessionAnswer",
    "SessionConfirmation",
    "SessionError",
    "SessionOffer",
    "SharedNonceStore",
    "SignatureRejected",
    "SigningRejected",
    "StoreContents",
    "TrustEdge",
    "TrustError",
    "TrustModel",
    "Unauthenticated",
    "UnknownAgent",
    "UnknownKey",
    "VerificationResult",
    "WatchedKeyStore",
    "WebOfTrust",
    "WrongPassphrase",
    "envelope_bytes",
    "key_id_for",
    "sender_identity",
]
