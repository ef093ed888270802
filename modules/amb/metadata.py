"""What a handler learns about a message besides its payload."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from amb.envelope import Envelope, Signature


class Metadata:
    """Facts about one delivered message, handed to handlers as their second argument.

    Envelope fields (``id``, ``topic``, ``sender``, ``recipient``, ``reply_to``,
    ``correlation_id``, ``timestamp`` in ns, ``expires_at``, ``priority``, ``headers``,
    ``signature``) are read from the envelope; ``subject`` is the subject the broker delivered
    on, ``attempt`` counts deliveries from 1, and ``extra`` holds broker facts (partition,
    offset, stream id). ``context`` is a dict middleware fills in (IATP puts its verification
    result there) for the handler to read; it starts with ``"subscription"`` (the receiving
    :class:`~amb.Subscription`) and the subscription's ``context`` option.
    """

    __slots__ = ("_context", "_seed", "attempt", "envelope", "extra", "subject")

    def __init__(
        self,
        envelope: Envelope,
        subject: str,
        attempt: int,
        extra: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self.envelope = envelope
        self.subject = subject
        self.attempt = attempt
        self.extra = extra
        # ``context`` seeds metadata.context; the dict is built on first use, so a message
        # nobody asks the context of costs no copy.
        self._seed = context
        self._context: dict[str, Any] | None = None

    @property
    def context(self) -> dict[str, Any]:
        """Per-delivery values for middleware and the handler (a copy of the seed, built on
        first use; changes stay with this delivery)."""
        ctx = self._context
        if ctx is None:
            seed = self._seed
            ctx = self._context = dict(seed) if seed else {}
        return ctx

    @context.setter
    def context(self, value: dict[str, Any]) -> None:
        self._context = value

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def topic(self) -> str:
        return self.envelope.topic

    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipient(self) -> str | None:
        return self.envelope.recipient

    @property
    def reply_to(self) -> str | None:
        return self.envelope.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self.envelope.correlation_id

    @property
    def timestamp(self) -> int:
        """When the message was created, in nanoseconds since the Unix epoch."""
        return self.envelope.timestamp

    @property
    def time(self) -> datetime:
        """``timestamp`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.envelope.timestamp / 1e9, tz=UTC)

    @property
    def expires_at(self) -> int | None:
        return self.envelope.expires_at

    @property
    def priority(self) -> int:
        return self.envelope.priority

    @property
    def headers(self) -> Mapping[str, str]:
        return self.envelope.headers

    @property
    def signature(self) -> Signature | None:
        return self.envelope.sig

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    def __repr__(self) -> str:
        return (
            f"Metadata(id={self.id!r}, topic={self.topic!r}, sender={self.sender!r}, "
            f"reply_to={self.reply_to!r}, attempt={self.attempt})"
        )
