"""Shared replay protection: a nonce store several processes consult (Redis), for queue groups.

One ``SET NX PX`` per message, the claims made while a round trip is out sent together in the
next one; it fails closed (``docs/trust.md``, "Shared replay protection").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent_os.iatp.errors import IATPConfigError, NonceStoreUnavailable
from agent_os.iatp.noncebatch import ClaimBatcher

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
    """A :class:`SharedNonceStore` in Redis: one ``SET NX PX`` per message, coalesced.

    Claims made while a round trip to Redis is out are sent together in the next one (one
    pipelined write, one reply per nonce); each claim still gets its own answer.

    Args:
        url: a ``redis://`` or ``rediss://`` URL (ignored when ``client`` is given).
        prefix: put before every key; give each deployment its own.
        timeout: seconds for each round trip (connecting included); beyond it every claim in
            it is rejected (``nonce_store_unavailable``), never accepted unchecked.
        client: an existing ``redis.asyncio.Redis`` to send the batches through (not closed by
            :meth:`close`); without it the store opens its own from ``url``.
        max_batch: the most claims in one round trip (default 1024).

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
        max_batch: int = 1024,
    ) -> None:
        if timeout <= 0:
            raise IATPConfigError("timeout must be positive")
        if max_batch < 1:
            raise IATPConfigError("max_batch must be at least 1")
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.failures = 0
        self._client: Any = client
        self._own_client = client is None
        self._batcher = ClaimBatcher(self._send, timeout=timeout, max_batch=max_batch)

    def _redis(self) -> Any:
        if self._client is None:
            try:
                import redis.asyncio as aioredis
            except ImportError as exc:
                hint = "RedisNonceStore needs redis-py: pip install 'agent-os[redis]'"
                raise IATPConfigError(hint) from exc
            # One round trip is out at a time (the batcher): one connection is enough.
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                single_connection_client=True,
            )
        return self._client

    def __repr__(self) -> str:
        return f"RedisNonceStore(prefix={self.prefix!r}, failures={self.failures})"

    @property
    def round_trips(self) -> int:
        """Round trips to Redis so far (each carries one or more claims)."""
        return self._batcher.batches

    @property
    def waiting(self) -> int:
        """Claims waiting for the next round trip (those in the one out not counted)."""
        return self._batcher.waiting

    async def _send(self, keys: Sequence[bytes], ttls_ms: Sequence[int]) -> Sequence[bool]:
        pipe = self._redis().pipeline(transaction=False)
        for key, ttl in zip(keys, ttls_ms, strict=True):
            pipe.set(key, b"1", nx=True, px=ttl)
        answers = await pipe.execute()
        for answer in answers:
            if answer is not None and answer is not True:
                raise NonceStoreUnavailable(f"the nonce store answered {answer!r} to SET NX")
        return [answer is True for answer in answers]

    async def claim(self, scope: str, nonce: bytes, ttl_ms: int) -> bool:
        """See :meth:`SharedNonceStore.claim`. The key is ``prefix + scope + ":" + nonce.hex()``
        (the nonce's fixed length at the end keeps keys of different scopes apart). Waits for
        the round trip out, if any, then its own (each up to ``timeout``)."""
        key = f"{self.prefix}{scope}:{nonce.hex()}".encode()
        try:
            return await self._batcher.claim(key, max(1, ttl_ms))
        except Exception as exc:  # fail closed on anything the round trip did
            self.failures += 1
            if isinstance(exc, NonceStoreUnavailable):
                raise
            raise NonceStoreUnavailable(
                f"the nonce store did not answer: {type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Fail the claims not answered yet and close the store's own connection."""
        await self._batcher.aclose()
        if self._own_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
