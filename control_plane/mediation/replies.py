"""Requests waiting for their reply, so the reply leg can be mediated too (mediated mode).

A bounded table, one entry per ``reply_to`` inbox, allowing one reply each; entries outlive
their request's expiry by ``grace`` (``docs/control-plane.md``, Mediated mode).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.errors import InboxBusy


@dataclass(slots=True)
class PendingRequest:
    """One request that may still be answered."""

    reply_to: str
    request_id: str
    requester: str
    topic: str
    recipient: str | None
    expires_ns: int
    answered: bool = False
    note: object = None
    """What the service keeps with the request until its reply (an action's decision)."""

    def expired(self, now_ns: int | None = None) -> bool:
        return (time.time_ns() if now_ns is None else now_ns) >= self.expires_ns


class PendingRequests:
    """The pending-request table of one service instance (docs/control-plane.md, Mediated mode)."""

    def __init__(self, max_pending: int = 100_000, default_ttl: float = 30.0, grace: float = 30.0) -> None:
        whole(max_pending, "max_pending", error=ValueError)
        seconds(default_ttl, "default_ttl", error=ValueError)
        seconds(grace, "grace", zero=True, error=ValueError)
        self.max_pending = max_pending
        self.default_ttl_ns = int(default_ttl * 1e9)
        self.grace_ns = int(grace * 1e9)
        self._entries: OrderedDict[str, PendingRequest] = OrderedDict()
        self.added = 0
        self.evicted = 0
        self.unmatched = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        reply_to: str,
        request_id: str,
        requester: str,
        topic: str,
        recipient: str | None = None,
        expires_at: int | None = None,
        note: object = None,
    ) -> PendingRequest:
        """Note a forwarded request. ``expires_at`` is the request's expiry (ns since the epoch);
        ``note`` is kept with the entry (:attr:`PendingRequest.note`).

        Raises InboxBusy when ``reply_to`` is still waiting for the reply to another request
        (an answered or expired entry is replaced)."""
        now = time.time_ns()
        self._sweep(now)
        if self.waiting(reply_to, now):
            raise InboxBusy(f"{reply_to!r} is still waiting for the reply to another request")
        entry = PendingRequest(
            reply_to,
            request_id,
            requester,
            topic,
            recipient,
            expires_at if expires_at is not None else now + self.default_ttl_ns,
            note=note,
        )
        self._entries.pop(reply_to, None)
        self._entries[reply_to] = entry
        self.added += 1
        while len(self._entries) > self.max_pending:
            self._entries.popitem(last=False)
            self.evicted += 1
        return entry

    def waiting(self, reply_to: str, now_ns: int | None = None) -> bool:
        """Whether ``reply_to`` has an entry that is neither answered nor expired."""
        entry = self._entries.get(reply_to)
        return entry is not None and not entry.answered and not entry.expired(now_ns)

    def get(self, reply_to: str) -> PendingRequest | None:
        """The entry for a reply to ``reply_to``, while it is within its expiry plus grace."""
        entry = self._entries.get(reply_to)
        if entry is None:
            return None
        if time.time_ns() >= entry.expires_ns + self.grace_ns:
            del self._entries[reply_to]
            return None
        return entry

    def _sweep(self, now: int) -> None:
        # Entries are in insertion order; expiries are nearly in that order too. Drop from the
        # front while the oldest is past its grace, so the table does not fill with dead entries.
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if now < first.expires_ns + self.grace_ns:
                return
            entries.popitem(last=False)
