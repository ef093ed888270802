"""The counters every AMB client keeps (``amb.stats``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Final

MAX_DEAD_LETTER_REASONS: Final = 32
"""The most distinct dead-letter reasons one client counts apart; later new ones count as
:data:`OTHER_REASON`, so the reason stays a bounded metric label."""
OTHER_REASON: Final = "other"
PATTERNS_MAX: Final = 64
"""The most subject patterns (published, subscribed) one client's metrics count apart; later
ones count as :data:`OTHER_REASON`, so the pattern stays a bounded label."""
_REASON: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(slots=True)
class BusStats:
    """Counters of one client. Every message that is not handed to a handler is in one of them.

    ``dead_letter_reasons`` counts the dead letters published by reason (``dlq-reason``); a
    reason that is not a short lower-case word, or beyond the first
    :data:`MAX_DEAD_LETTER_REASONS` distinct ones, counts as ``other``."""

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
    dead_letter_reasons: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def count_dead_letter(self, reason: str) -> None:
        """Count one dead letter published with ``reason`` (in ``dead_lettered`` and by reason)."""
        self.dead_lettered += 1
        reasons = self.dead_letter_reasons
        if reason not in reasons and (
            len(reasons) >= MAX_DEAD_LETTER_REASONS or _REASON.fullmatch(reason) is None
        ):
            reason = OTHER_REASON
        reasons[reason] = reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, int]:
        """The counters by name (without ``dead_letter_reasons``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dead_letter_reasons"}


class LabelCounts(dict[tuple[str, ...], int]):
    """Counts by a tuple of label values (a dict), with at most ``limit`` distinct tuples:
    a new tuple beyond them is counted under ``("other", ...)``, so that the values stay a
    bounded label set whatever the callers pass. ``width``: the length of the tuples."""

    __slots__ = ("limit", "overflow")

    def __init__(self, width: int, limit: int = 256) -> None:
        super().__init__()
        self.limit = limit
        self.overflow = (OTHER_REASON,) * width

    def add(self, key: tuple[str, ...], n: int = 1) -> None:
        """Count ``n`` under ``key`` (or the overflow tuple when ``limit`` tuples are taken)."""
        count = self.get(key)
        if count is not None:
            self[key] = count + n
        elif len(self) < self.limit:
            self[key] = n
        else:
            self[self.overflow] = self.get(self.overflow, 0) + n
