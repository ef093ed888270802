"""What verification returns: valid or not, who, when, how trusted, and if not, why."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any, Final, NamedTuple

from agent_os.iatp.keys import iso


class Reason(StrEnum):
    """Why a message did not verify. The value is what the bus puts in ``dlq-reason``."""

    UNSIGNED = "unsigned"
    MALFORMED_SIGNATURE = "malformed_signature"
    MALFORMED_ENVELOPE = "malformed_envelope"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    UNKNOWN_SENDER = "unknown_sender"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    RETIRED_KEY = "retired_key"
    UNKNOWN_SESSION = "unknown_session"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    TOO_OLD = "too_old"
    CLOCK_SKEW = "clock_skew"
    REPLAYED = "replayed_nonce"
    REPLAY_WINDOW = "replay_window"
    UNTRUSTED = "untrusted"
    CRYPTO_UNAVAILABLE = "crypto_unavailable"
    KEY_STORE_UNAVAILABLE = "key_store_unavailable"
    NONCE_STORE_UNAVAILABLE = "nonce_store_unavailable"
    WRONG_SUBJECT = "wrong_subject"


_KEYS: Final = ("valid", "sender", "timestamp", "trust_level", "reason")
_KEY_SET: Final = frozenset(_KEYS)


class _Fields(NamedTuple):
    valid: bool
    sender: str
    timestamp_ns: int | None
    trust_level: float = 0.0
    reason: str | None = None
    key_id: str | None = None
    detail: str | None = None


class VerificationResult(_Fields, Mapping[str, Any]):
    """The outcome of verifying one message. Immutable.

    Attributes: ``valid``; ``sender`` (the *claimed* sender: authenticated only when ``valid``);
    ``timestamp`` (the message's time as ISO-8601 UTC, ``"2024-01-15T10:30:00.123456Z"``, or
    None when there is none; formatted only when read); ``timestamp_ns``; ``trust_level``
    (from the trust model, 0.0 when invalid; never from anything the sender wrote); ``reason``
    (a :class:`Reason` value when invalid, None when valid); ``key_id`` (the key or session that
    signed); ``detail`` (text).

    It is also a read-only mapping with the shape of ``docs/api-reference.md``, ``{"valid", "sender",
    "timestamp", "trust_level", "reason"}`` (see :meth:`to_dict`), and it compares equal to a
    dict with those items. ``bool(result)`` is ``result.valid``, so ``if result:`` fails closed.

    (It is stored as a tuple, which makes it cheap to build on the verification hot path and
    immutable; iterating, indexing, ``len`` and ``==`` are the mapping's, not the tuple's.)
    """

    __slots__ = ()

    @property
    def timestamp(self) -> str | None:
        ns = self.timestamp_ns
        if ns is None:
            return None
        try:
            return iso(ns)
        except (OverflowError, ValueError, OSError):  # beyond what datetime can show
            return None

    def to_dict(self) -> dict[str, Any]:
        """``{"valid", "sender", "timestamp", "trust_level", "reason"}``, as in ``docs/api-reference.md``."""
        return {k: getattr(self, k) for k in _KEYS}

    def __getitem__(self, key: str) -> Any:  # type: ignore[override]
        if type(key) is not str or key not in _KEY_SET:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)

    def __contains__(self, key: object) -> bool:
        return key in _KEY_SET

    __eq__ = Mapping.__eq__

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return self.valid

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(tuple.__iter__(self))

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(self._fields, tuple.__iter__(self), strict=True))

    def _replace(self, **changes: Any) -> VerificationResult:
        return type(self)(**{**self._asdict(), **changes})

    def __repr__(self) -> str:
        extra = f", reason={self.reason!r}" if self.reason else ""
        return (
            f"VerificationResult(valid={self.valid}, sender={self.sender!r}, "
            f"timestamp={self.timestamp!r}, trust_level={self.trust_level}{extra})"
        )


_new = tuple.__new__


def valid_result(sender: str, timestamp_ns: int, trust_level: float, key_id: str) -> VerificationResult:
    """A valid result (the verifier's hot path: no argument parsing)."""
    result: VerificationResult = _new(
        VerificationResult, (True, sender, timestamp_ns, trust_level, None, key_id, None)
    )
    return result


def invalid(
    reason: Reason, sender: Any, timestamp_ns: Any, key_id: Any = None, detail: str | None = None
) -> VerificationResult:
    """An invalid result; tolerates hostile field types (it never raises)."""
    return VerificationResult(
        valid=False,
        sender=sender if isinstance(sender, str) else repr(sender)[:200],
        timestamp_ns=timestamp_ns if type(timestamp_ns) is int and -(2**62) < timestamp_ns < 2**62 else None,
        trust_level=0.0,
        reason=reason.value,
        key_id=key_id if isinstance(key_id, str) else None,
        detail=detail,
    )
