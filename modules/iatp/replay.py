"""Replay protection: a bounded cache of the nonces seen within the acceptance window, keyed by
``(scope, nonce)``, with a floor that refuses what it can no longer check (``docs/trust.md``,
"Replay protection").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Final

from agent_os.amb.numbers import whole

OK: Final = 0
REPLAYED: Final = 1
BELOW_FLOOR: Final = 2


class NonceCache:
    """Remembers ``(scope, nonce)`` pairs through their ``timestamp + max_age_ns``; at most
    ``max_entries`` of them."""

    __slots__ = ("_entries", "_floor", "_order", "max_age_ns", "max_entries")

    def __init__(self, max_age_ns: int, max_entries: int = 1_000_000) -> None:
        whole(max_age_ns, "max_age_ns", error=ValueError)
        whole(max_entries, "max_entries", error=ValueError)
        self.max_age_ns = max_age_ns
        self.max_entries = max_entries
        self._entries: dict[Hashable, int] = {}
        self._order: deque[tuple[int, Hashable]] = deque()
        self._floor = -(2**63)  # expiry at or below which messages are refused

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def floor_ns(self) -> int | None:
        """The timestamp at or below which messages are refused, once the cache has forgotten
        any entry (overflow, or the window passing it)."""
        return None if self._floor == -(2**63) else self._floor - self.max_age_ns

    def seen(self, key: Hashable) -> bool:
        return key in self._entries

    def check_and_add(self, key: Hashable, timestamp_ns: int, now_ns: int) -> int:
        """Record ``key`` for a message stamped ``timestamp_ns``; return OK, REPLAYED or BELOW_FLOOR.

        Call only after the timestamp passed the window check and the signature verified, so a
        forger cannot fill the cache.
        """
        entries = self._entries
        order = self._order
        while order and order[0][0] < now_ns:  # expiry == now: still inside the window
            expiry, old = order.popleft()
            if entries.get(old) == expiry:
                del entries[old]
                if expiry > self._floor:  # forgotten: refused from now on, whatever the clock
                    self._floor = expiry
        expiry = timestamp_ns + self.max_age_ns
        if expiry <= self._floor:
            return BELOW_FLOOR
        if key in entries:
            return REPLAYED
        while len(entries) >= self.max_entries:
            evicted_expiry, old = order.popleft()
            if entries.get(old) == evicted_expiry:
                del entries[old]
                if evicted_expiry > self._floor:
                    self._floor = evicted_expiry
        if expiry <= self._floor:
            return BELOW_FLOOR
        entries[key] = expiry
        order.append((expiry, key))
        return OK
