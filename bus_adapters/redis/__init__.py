"""The Redis broker adapter: pub/sub for ephemeral delivery, Streams for queue groups and durables.

``RedisBroker("redis://HOST:PORT/DB", **options)``; needs ``agent-os[redis]`` and Redis 6.2+,
standalone or Sentinel. Routing, guarantees and options are in ``docs/bus.md`` ("redis").
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401  (fail at import, with the hint, not at connect)
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the redis broker needs redis-py: pip install 'agent-os[redis]'") from exc

from agent_os.bus_adapters.redis._broker import DEFAULT_URL, RedisBroker, glob_for
from agent_os.bus_adapters.redis._subscriptions import StreamDelivery

__all__ = ["DEFAULT_URL", "RedisBroker", "StreamDelivery", "glob_for"]
