"""Rule rate limits shared by the instances of a queue group, in Redis (``--rate-limit-store``,
``docs/services.md``, "Shared rate limits")."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from agent_os.amb.numbers import seconds
from agent_os.control_plane.policy.policy_set import PolicySet
from agent_os.control_plane.policy.ratelimit import RateLimit, SharedRateLimits

# One token bucket per key, a hash of tokens ("t") and the time they were counted at ("s",
# microseconds of the Redis server's clock: one clock for every instance). Atomic: Redis runs
# a script alone. The key expires once the bucket would be full again (a missing key is a
# full bucket).
_TAKE: Final = """
local capacity = tonumber(ARGV[1])
local per_us = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
if now > stamp then
  tokens = math.min(capacity, tokens + (now - stamp) * capacity / per_us)
  stamp = now
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(per_us / 1000) + 1000)
return taken
"""


class RedisRateLimits(SharedRateLimits):
    """A :class:`~agent_os.control_plane.policy.ratelimit.SharedRateLimits` store in Redis:
    one token bucket per rule and agent, taken by a Lua script (atomic, on the server's clock).

    ``url``: a ``redis://`` or ``rediss://`` URL; ``prefix``: put before every key (give each
    deployment its own); ``timeout``: seconds for connecting and for each take, beyond which
    :meth:`take` raises (the gate then denies: fail closed). ``failures`` counts the takes that
    raised. Needs redis-py (``pip install 'agent-os[redis]'``): ImportError naming it.
    """

    def __init__(self, url: str, *, prefix: str = "agentos:ratelimit:", timeout: float = 0.5) -> None:
        seconds(timeout, "timeout", error=ValueError)
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.failures = 0
        self.taken = 0
        self.refused = 0
        self._client: Any = None
        self._script: Any = None

    def __repr__(self) -> str:
        return f"RedisRateLimits(prefix={self.prefix!r}, failures={self.failures})"

    def _redis(self) -> Any:
        if self._client is None:
            try:
                import redis.asyncio as aioredis
            except ImportError as exc:
                raise ImportError("shared rate limits need redis-py: pip install 'agent-os[redis]'") from exc
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
            self._script = self._client.register_script(_TAKE)
        return self._client

    async def take(self, key: str, limit: RateLimit) -> bool:
        """Take one token of ``limit`` from the bucket ``prefix + key``; False when it is
        empty. Raises the client's error (or TimeoutError) when Redis does not answer in time."""
        self._redis()
        try:
            async with asyncio.timeout(self.timeout):
                taken = await self._script(
                    keys=[self.prefix + key], args=[limit.limit, limit.per * 1_000_000]
                )
        except Exception:
            self.failures += 1
            raise
        if taken:
            self.taken += 1
            return True
        self.refused += 1
        return False

    async def ping(self) -> None:
        """Check that Redis answers (for a service to fail at its start, not per message).
        Raises ConnectionError otherwise."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis().ping()
        except Exception as exc:
            raise ConnectionError(f"the rate-limit store (Redis) does not answer: {exc!r}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def share_rate_limits(policy: Any, store: SharedRateLimits | None) -> None:
    """Keep the rule rate limits of ``policy`` (every policy of a set) in ``store``."""
    for each in policy.policies if isinstance(policy, PolicySet) else (policy,):
        each.shared_limits = store
