"""Token buckets: rate limits per agent and per rule.

A :class:`RateLimit` of ``limit`` per ``per`` seconds refills continuously; taking a token is
one short critical section, safe across tasks and threads. Several processes (a queue group)
share their buckets through a :class:`SharedRateLimits` store (``docs/control-plane.md``, Rate
limits).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Protocol

from agent_os.amb.numbers import seconds as checked_seconds
from agent_os.amb.numbers import shown, whole
from agent_os.control_plane.errors import PolicyError

_UNITS: Final = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
MOST_ACTIONS = 10**12
"""The largest rate limit: a bucket's tokens are floats, and beyond this a limit limits nothing."""
MOST_WINDOW = 1e10
"""The longest rate-limit window, in seconds (about 317 years)."""
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)?\s*(s|sec|m|min|h|d)\s*$")


def parse_window(window: str | float) -> float:
    """``"1m"`` -> 60.0, ``"30s"`` -> 30.0, ``"h"`` -> 3600.0; a number is seconds.

    Raises PolicyError for anything else or a non-positive window.
    """
    if isinstance(window, int | float) and not isinstance(window, bool):
        seconds = checked_seconds(window, "a rate-limit window", most=MOST_WINDOW, error=PolicyError)
    elif isinstance(window, str) and (m := _WINDOW.match(window)):
        seconds = float(m.group(1) or 1) * _UNITS[m.group(2)]
    else:
        raise PolicyError(f"invalid rate-limit window {window!r}: use e.g. '30s', '1m', '1h'")
    return checked_seconds(seconds, "a rate-limit window", most=MOST_WINDOW, error=PolicyError)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` actions per ``per`` seconds (a bucket of ``limit`` tokens)."""

    limit: int
    per: float = 60.0

    def __post_init__(self) -> None:
        limit = whole(self.limit, "a rate limit", error=PolicyError)
        object.__setattr__(self, "limit", limit)  # a plain int (NumPy's are taken by value)
        if limit > MOST_ACTIONS:
            raise PolicyError(f"a rate limit must be at most {MOST_ACTIONS:,} actions, got {shown(limit)}")
        checked_seconds(self.per, "a rate-limit window", most=MOST_WINDOW, error=PolicyError)

    @classmethod
    def parse(cls, spec: RateLimit | int | str) -> RateLimit:
        """``100`` (per minute, as in ``docs/api-reference.md``), ``"100/1m"``, ``"5/s"`` or a RateLimit."""
        if isinstance(spec, RateLimit):
            return spec
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            return cls(int(spec), 60.0)
        if isinstance(spec, str) and "/" in spec:
            count, _, window = spec.partition("/")
            count = count.strip()
            if count.isascii() and count.isdigit() and len(count) <= 13:  # ASCII digits, at most 10**13
                return cls(int(count), parse_window(window))
        raise PolicyError(f"invalid rate limit {spec!r}: use 100 (per minute) or '100/1m'")


class TokenBucket:
    """One bucket; :meth:`take` is atomic."""

    __slots__ = ("_lock", "_rate", "capacity", "stamp", "tokens")

    def __init__(self, limit: RateLimit) -> None:
        self.capacity = float(limit.limit)
        self._rate = limit.limit / limit.per
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, now: float | None = None) -> bool:
        """Take one token if there is one; return whether it was taken."""
        with self._lock:
            t = time.monotonic() if now is None else now
            tokens = min(self.capacity, self.tokens + (t - self.stamp) * self._rate)
            self.stamp = t
            if tokens >= 1.0:
                self.tokens = tokens - 1.0
                return True
            self.tokens = tokens
            return False

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self._rate >= self.capacity


class RateLimiter:
    """Buckets of one :class:`RateLimit`, one per key (an agent id, a (rule, agent) pair).

    Memory stays bounded without weakening the limit: past ``max_keys`` buckets, the ones that
    have refilled completely are dropped (a full bucket is exactly what a new one would be).
    """

    def __init__(self, limit: RateLimit, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> bool:
        """Take a token from ``key``'s bucket; False when it is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            with self._lock:
                bucket = self._buckets.get(key)
                if bucket is None:
                    if len(self._buckets) >= self.max_keys:
                        self._evict_full()
                    bucket = self._buckets[key] = TokenBucket(self.limit)
        return bucket.take()

    def _evict_full(self) -> None:
        now = time.monotonic()
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class SharedRateLimits(Protocol):
    """Token buckets kept outside the process, shared by every process using the same store
    (the instances of a queue group): with one, a policy's rule limits hold across them all.

    :meth:`take` takes one token from the bucket ``key`` of ``limit`` atomically and returns
    whether it did; it raises when the store cannot answer (the caller denies: fail closed).
    """

    async def take(self, key: str, limit: RateLimit) -> bool: ...


def shared_key(policy: str, rule: str, limit: RateLimit, agent: str) -> str:
    """The name of the shared bucket of ``rule`` of ``policy`` for ``agent``: the same in
    every process for the same rule and limit, distinct for any other (a digest, so no
    name can be crafted to collide)."""
    ident = json.dumps([policy, rule, limit.limit, limit.per, agent], ensure_ascii=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:40]
