"""Shared replay protection: a nonce store several processes consult (Redis), for queue groups.

One ``SET NX PX`` per message, the claims made while a round trip is out sent together in the
next one (one script call); it fails closed (``docs/trust.md``, "Shared replay protection").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from agent_os.amb.numbers import seconds, whole
from agent_os.iatp.errors import IATPConfigError, NonceStoreUnavailable
from agent_os.iatp.noncebatch import ClaimBatcher

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger("agent_os.iatp.noncestore")

CLAIM_SCRIPT: Final = """
local answers = {}
local i = 0
for ttl in string.gmatch(ARGV[1], '%d+') do
  i = i + 1
  answers[i] = redis.call('SET', KEYS[i], '1', 'NX', 'PX', ttl) and '1' or '0'
end
return table.concat(answers)
"""
"""One round trip's claims: ``SET key 1 NX PX ttl`` for each key, in order (``ARGV[1]``: the
TTLs in ms, comma-separated, one per key). Answers one character per key: ``1`` where the key
was set (the first claim), ``0`` where it existed (a replay). One string, not an array: the
client parses one reply per round trip, not one per claim."""


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

    Claims made while a round trip to Redis is out are sent together in the next one (one call
    of :data:`CLAIM_SCRIPT`, one answer per nonce); each claim still gets its own answer. The
    keys of one call must be on one server: a single Redis, not a cluster.

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
        seconds(timeout, "timeout", error=IATPConfigError)
        whole(max_batch, "max_batch", error=IATPConfigError)
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self._client: Any = client
        self._own_client = client is None
        self._script: Any = None
        self._releases: set[asyncio.Task[None]] = set()
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
    def failures(self) -> int:
        """Claims that failed so far (their round trip raised or timed out, or the store closed
        before answering): each rejected its message as ``nonce_store_unavailable``."""
        return self._batcher.failures

    @property
    def round_trips(self) -> int:
        """Round trips to Redis so far (each carries one or more claims)."""
        return self._batcher.batches

    @property
    def waiting(self) -> int:
        """Claims waiting for the next round trip (those in the one out not counted)."""
        return self._batcher.waiting

    async def _send(self, keys: Sequence[bytes], ttls_ms: Sequence[int]) -> Sequence[bool]:
        script = self._script
        if script is None:  # redis-py's Script: EVALSHA, loading the script when Redis lacks it
            script = self._script = self._redis().register_script(CLAIM_SCRIPT)
        answers = await script(keys=keys, args=[",".join(map(str, ttls_ms))])
        if isinstance(answers, str):  # a client given with decode_responses=True
            answers = answers.encode()
        if not isinstance(answers, bytes) or len(answers) != len(keys) or answers.strip(b"01"):
            answered = repr(answers)[:100]
            raise NonceStoreUnavailable(f"the nonce store answered {answered} to {len(keys)} claims")
        return [answer == 49 for answer in answers]  # b"1"

    async def claim(self, scope: str, nonce: bytes, ttl_ms: int) -> bool:
        """See :meth:`SharedNonceStore.claim`. The key is ``prefix + scope + ":" + nonce.hex()``
        (the nonce's fixed length at the end keeps keys of different scopes apart). Waits for
        the round trip out, if any, then its own (each up to ``timeout``)."""
        try:
            return await self.start_claim(scope, nonce, ttl_ms)
        except NonceStoreUnavailable:
            raise
        except Exception as exc:  # fail closed on anything the round trip did
            raise NonceStoreUnavailable(
                f"the nonce store did not answer: {type(exc).__name__}: {exc}"
            ) from exc

    def start_claim(self, scope: str, nonce: bytes, ttl_ms: int) -> asyncio.Future[bool]:
        """:meth:`claim` without waiting (the middleware's look-ahead): the claim goes in the
        next round trip and the future gets its answer, or the exception its round trip raised
        (any exception: the caller fails closed on it)."""
        return self._batcher.start(self._key(scope, nonce), max(1, ttl_ms))

    def _key(self, scope: str, nonce: bytes) -> bytes:
        return f"{self.prefix}{scope}:{nonce.hex()}".encode()

    def release(self, scope: str, nonce: bytes) -> None:
        """Give back a claim this store won for a message that was then dropped unhandled:
        ``DEL`` of its key, sent in the background (best effort, within ``timeout``; a failure
        leaves the key to expire with its window). Nothing once the store is closed."""
        if self._batcher.closed:
            return
        task = asyncio.get_running_loop().create_task(self._release(self._key(scope, nonce)))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, key: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._redis().delete(key)
        except Exception as exc:  # the key expires with its window anyway
            log.warning("nonce store: releasing a dropped message's claim failed: %r", exc)

    async def close(self) -> None:
        """Fail the claims not answered yet, finish the releases under way (each within
        ``timeout``) and close the store's own connection."""
        await self._batcher.aclose()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        if self._own_client and self._client is not None:
            self._script = None
            client, self._client = self._client, None
            await client.aclose()
