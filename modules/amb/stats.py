"""The counters every AMB client keeps (``amb.stats``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class BusStats:
    """Counters of one client. Every message that is not handed to a handler is in one of them."""

    published: int = 0
    delivered: int = 0
    handled: int = 0
    handler_errors: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dead_letter_failures: int = 0
    malformed: int = 0
    invalid_subjects: int = 0
    rejected: int = 0
    expired: int = 0
    filtered: int = 0
    requests: int = 0
    request_timeouts: int = 0
    late_replies: int = 0
    mismatched_replies: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
