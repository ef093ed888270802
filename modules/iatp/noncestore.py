"""Shared replay protection: a nonce store several processes consult (Redis), for queue groups.

One ``SET NX PX`` per message; it fails closed (``docs/trust.md``, "Replay protection").
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent_os.iatp.errors import IATPConfigError, NonceStoreUnavailable

if TYPE_CHECKING:
    import redis.asyncio


@runtime_checkable
class SharedNonceStore(Protocol):
    """A nonce store shared between processes (see ``docs/trust.md``)."""

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

    Needs redis-py (``pip install 'agent-os[redis]'``), imported on first use; raises
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
                hint = "RedisNonceStore needs redis-py: pip install 'agent-os[redis]'"
                raise IATPConfigError(hint) from exc
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
