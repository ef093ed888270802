"""What a handler learns about a message besides its payload."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from agent_os.amb.envelope import Envelope, Signature
from agent_os.amb.serializers.schema import WireFields, envelope_from_wire


class Metadata:
    """Facts about one delivered message, handed to handlers as their second argument.

    Envelope fields (``id``, ``topic``, ``sender``, ``recipient``, ``reply_to``,
    ``correlation_id``, ``timestamp`` in ns, ``expires_at``, ``priority``, ``headers``,
    ``signature``) are read from the envelope; ``subject`` is the subject the broker delivered
    on, ``attempt`` counts deliveries from 1, and ``extra`` holds broker facts (partition,
    offset, stream id). ``context`` is a dict middleware fills in (IATP puts its verification
    result there) for the handler to read; it starts with ``"subscription"`` (the receiving
    :class:`~agent_os.amb.Subscription`) and the subscription's ``context`` option.
    """

    __slots__ = ("_context", "_envelope", "_seed", "_wire", "attempt", "extra", "subject")

    def __init__(
        self,
        envelope: Envelope,
        subject: str,
        attempt: int,
        extra: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self._envelope: Envelope | None = envelope
        self._wire: Any = None  # the checked wire fields, when the envelope is built on demand
        self.subject = subject
        self.attempt = attempt
        self.extra = extra
        # ``context`` seeds metadata.context; the dict is built on first use, so a message
        # nobody asks the context of costs no copy.
        self._seed = context
        self._context: dict[str, Any] | None = None

    @property
    def envelope(self) -> Envelope:
        """The delivered envelope (built on first use when the bus delivered wire fields)."""
        env = self._envelope
        if env is None:
            env = self._envelope = envelope_from_wire(self._wire)
        return env

    @envelope.setter
    def envelope(self, value: Envelope) -> None:
        self._envelope = value

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

    # Envelope fields are read from the wire fields while no Envelope was asked for.

    @property
    def id(self) -> str:
        env = self._envelope
        return self._wire[1] if env is None else env.id

    @property
    def topic(self) -> str:
        env = self._envelope
        return self._wire[2] if env is None else env.topic

    @property
    def sender(self) -> str:
        env = self._envelope
        return self._wire[3] if env is None else env.sender

    @property
    def recipient(self) -> str | None:
        env = self._envelope
        return self._wire[4] if env is None else env.recipient

    @property
    def reply_to(self) -> str | None:
        env = self._envelope
        return self._wire[5] if env is None else env.reply_to

    @property
    def correlation_id(self) -> str | None:
        env = self._envelope
        return self._wire[6] if env is None else env.correlation_id

    @property
    def timestamp(self) -> int:
        """When the message was created, in nanoseconds since the Unix epoch."""
        env = self._envelope
        return self._wire[7] if env is None else env.timestamp

    @property
    def time(self) -> datetime:
        """``timestamp`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp / 1e9, tz=UTC)

    @property
    def expires_at(self) -> int | None:
        env = self._envelope
        return self._wire[8] if env is None else env.expires_at

    @property
    def priority(self) -> int:
        env = self._envelope
        return self._wire[9] if env is None else env.priority

    @property
    def headers(self) -> Mapping[str, str]:
        env = self._envelope
        return self._wire[10] if env is None else env.headers

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


_new = object.__new__


def metadata_from_wire(
    fields: WireFields,
    subject: str,
    attempt: int,
    extra: Mapping[str, Any],
    context: Mapping[str, Any] | None,
) -> Metadata:
    """The bus's constructor on the receive path: metadata over checked wire fields, whose
    Envelope is built only if someone asks for it. Sets every slot, as ``__init__`` would."""
    meta: Metadata = _new(Metadata)
    meta._envelope = None
    meta._wire = fields
    meta.subject = subject
    meta.attempt = attempt
    meta.extra = extra
    meta._seed = context
    meta._context = None
    return meta
