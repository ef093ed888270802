"""Shared replay protection: a nonce store several processes consult (Redis).

The nonce cache of :mod:`agent_os.iatp.replay` lives in one process. That is enough for a subscriber
that is one process, but the services run as *queue groups*: several instances share a
subject and each message goes to one of them. An attacker who captured a signed request can
replay it within the acceptance window; the broker hands the replay to another instance, whose
own cache has never seen the nonce, and it would be accepted. Restarting an instance empties
its cache as well. A shared store closes both gaps.

**When to use it:** services and workers that consume in queue groups (several instances, one
logical consumer), or a single consumer that must refuse replays across its own restarts.
Plain subscriptions (each process receives every message) do not need it: each sees the
original too, and its local cache refuses the replay.

**How it works.** The bus middleware keeps the in-memory check exactly as before (the fast
path), and for a message it has accepted so far it then *claims* the nonce in the store::

    SET <prefix><scope>:<nonce hex> 1 NX PX <ms until the nonce's window ends>

Only the first claimant of a nonce gets ``OK``; any later one, in any process, is told it is a
replay (reason ``replayed_nonce``), except a broker redelivery (attempt > 1), which is let
through as it is locally. The key expires when the message's timestamp leaves the acceptance
window (``max_age`` plus ``clock_skew`` after it, as the local cache), so Redis holds at most one
window of nonces.

The *scope* names the logical consumer: ``"<queue group>@<subject pattern>"`` for a queue-group
subscription, or what the subscription's context gives under :data:`agent_os.iatp.REPLAY_SCOPE`
(needed for a plain subscription that should use the store). Subscriptions with neither use only
the local cache. Session-mode messages are not claimed: a session exists in one process only.

**Fail closed.** When the store cannot be reached, answers wrongly or takes longer than
``timeout``, :meth:`RedisNonceStore.claim` raises :class:`~agent_os.iatp.errors.NonceStoreUnavailable`
and the middleware rejects the message with reason ``nonce_store_unavailable`` (dead-lettered
and counted in ``middleware.rejected``, and in ``store.failures``). It never lets a message
through unchecked.

Usage::

    from agent_os.iatp import IATP, RedisNonceStore

    store = RedisNonceStore("redis://127.0.0.1:6379/0", prefix="iatp:nonce:memory-service:")
    iatp = IATP("file", key_path=..., passphrase=..., nonce_store=store)
    amb = AMB("nats", url, agent_id="memory-service", middleware=[iatp.middleware()])
    await amb.subscribe("emk.>", handle, queue="emk")   # replays refused across the group
    ...
    await store.close()
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent_os.iatp.errors import IATPConfigError, NonceStoreUnavailable

if TYPE_CHECKING:
    import redis.asyncio


@runtime_checkable
class SharedNonceStore(Protocol):
    """A nonce store shared between processes (see the module docstring)."""

    async def claim(self, scope: str, nonce: bytes, ttl_ms: int) -> bool:
        """Record ``nonce`` under ``scope`` for ``ttl_ms`` milliseconds. True if this call was
        the first to record it, False if it was recorded already (a replay). Raises
        NonceStoreUnavailable when the store cannot answer."""
        ...

    async def close(self) -> None:
        """Release the store's connections."""
        ...


class RedisNonceStore:
    """A :class:`SharedNonceStore` in Redis: one ``SET NX PX`` per message.

    Args:
        url: a ``redis://`` or ``rediss://`` URL (ignored when ``client`` is given).
        prefix: put before every key; give each deployment its own.
        timeout: seconds for connecting and for each claim (waiting for a free connection
            included); beyond it the message is rejected (``nonce_store_unavailable``), never
            accepted unchecked.
        client: an existing ``redis.asyncio.Redis`` to use (not closed by :meth:`close`).
        max_connections: connections to Redis the store opens at most (default 100, at
            least 1); claims beyond them wait for a free one, within ``timeout``. (redis-py's
            default pool raises once all are busy, which would reject valid messages under load.)

    Needs redis-py (``pip install agent-os[redis]``), imported on first use; raises
    IATPConfigError when it is missing or for a bad option.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "iatp:nonce:",
        timeout: float = 1.0,
        client: redis.asyncio.Redis | None = None,
        max_connections: int = 100,
    ) -> None:
        if timeout <= 0:
            raise IATPConfigError("timeout must be positive")
        if max_connections < 1:
            raise IATPConfigError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.failures = 0
        self._client: Any = client
        self._own_client = client is None

    def __repr__(self) -> str:
        return f"RedisNonceStore(prefix={self.prefix!r}, failures={self.failures})"

    def _redis(self) -> Any:
        if self._client is None:
            try:
                import redis.asyncio as aioredis
            except ImportError as exc:
                raise IATPConfigError("RedisNonceStore needs redis-py: pip install agent-os[redis]") from exc
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=None,  # the wait is bounded by claim()'s timeout
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
            self._client = aioredis.Redis.from_pool(pool)
        return self._client

    async def claim(self, scope: str, nonce: bytes, ttl_ms: int) -> bool:
        """See :meth:`SharedNonceStore.claim`. The key is ``prefix + scope + ":" + nonce.hex()``
        (the nonce's fixed length at the end keeps keys of different scopes apart)."""
        key = f"{self.prefix}{scope}:{nonce.hex()}"
        client = self._redis()
        import redis.exceptions

        try:
            async with asyncio.timeout(self.timeout):
                answer = await client.set(key, b"1", nx=True, px=max(1, ttl_ms))
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            raise NonceStoreUnavailable(
                f"the nonce store did not answer: {type(exc).__name__}: {exc}"
            ) from exc
        if answer is None:
            return False
        if answer is True:
            return True
        self.failures += 1
        raise NonceStoreUnavailable(f"the nonce store answered {answer!r} to SET NX")

    async def close(self) -> None:
        """Close the connection pool this store created."""
        client, self._client = self._client, None
        if client is not None and self._own_client:
            await client.aclose()
