"""The Redis broker: pub/sub for ephemeral delivery, Streams for queue groups and durables.

``RedisBroker("redis://HOST:PORT/DB", **options)`` (default ``redis://127.0.0.1:6379/0``).
Needs Redis 6.2 or later (``XAUTOCLAIM``) and the ``redis`` extra
(``pip install 'agent-os[redis]'``). Standalone Redis (or Sentinel) only: publishing runs a
Lua script that touches stream keys it does not declare, which Redis Cluster refuses.

How messages travel:

- **Plain subscriptions** use Redis pub/sub: one pub/sub connection per client. A pattern
  without wildcards is a ``SUBSCRIBE``; a wildcard pattern becomes a ``PSUBSCRIBE`` glob
  (``*`` and ``>`` become ``*``, glob metacharacters in literal tokens are escaped). Redis
  globs are looser than our subjects (``*`` crosses dots), so each message is filtered with
  :func:`amb.subjects.matches` before it reaches a subscription.
- **Queue groups and durable subscriptions** use one Redis stream and one consumer group per
  group (key ``<prefix>queue:<queue>:<pattern>`` or ``<prefix>durable:<name>:<pattern>``);
  every member is a consumer of that group (``XREADGROUP ... BLOCK``, no polling), so each
  message goes to exactly one member across all clients. Members of one durable name share
  its messages the same way; a ``queue`` given with ``durable`` is ignored.
- **Routing** happens inside Redis. Groups are registered in a sorted set
  (``<prefix>groups``, member ``"<pattern> <stream key>"``, score = lease expiry in server
  milliseconds). ``publish`` runs one Lua script that ``PUBLISH``es the message and
  ``XADD``s it to the stream of every live group whose pattern matches the subject. We chose
  this over a publisher-side cache of the registry: the script always sees the current
  registry, so a message published after ``subscribe()`` returned reaches the new group even
  when it was created by another client, at the cost of scanning the registry (one entry per
  live group) on each publish.

Guarantees:

- **Pub/sub is at most once.** A message reaches the subscriptions connected when Redis
  handles the ``PUBLISH``; messages published while a client is disconnected are lost to it,
  and Redis drops a client whose output buffer overflows (``client-output-buffer-limit``).
- **Streams are at least once.** A message is acked (``XACK`` then ``XDEL``) only after the
  handler acks it; entries pending for longer than ``claim_min_idle`` seconds on a consumer
  that died are claimed by a live member (``XAUTOCLAIM``), ``attempt`` being Redis's delivery
  count. An entry delivered more than ``max_deliveries`` times is moved to the dead-letter
  stream ``<prefix>dead:<stream key>`` (and counted in ``dead_lettered``). A stream keeps at
  most about ``stream_maxlen`` entries (``MAXLEN ~``): a backlog beyond that loses its oldest
  messages. A durable group lives ``durable_ttl`` seconds after its last member left (None:
  forever); a queue group lives ``queue_lease`` seconds after its last member left.
- **Ordering**: each subscription hands messages to its handler one at a time, in the order it
  received them; pub/sub delivers in publish order per publisher. Reclaimed and nacked stream
  messages come back out of order. No per-key ordering.
- **Redelivery**: ``nack(delay)`` on a pub/sub delivery re-invokes the same subscription after
  ``delay`` with ``attempt + 1`` (locally; the message is lost if the client closes first). On
  a stream delivery the entry stays pending and is claimed again (``XCLAIM``) after ``delay``.
- **Backpressure**: each subscription has a bounded queue (``max_pending``); a full queue
  pauses reading from Redis (the pub/sub reader for the whole client, or the stream reader).
- **Reconnection**: commands retry with exponential backoff (redis-py ``Retry``) while the
  server is away; the pub/sub connection re-subscribes once it is back, and the stream readers
  resume. A publish that cannot reach Redis raises :class:`~amb.errors.BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Final, cast
from urllib.parse import urlparse

try:
    import redis.asyncio as aioredis
    from redis import exceptions as rexc
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the redis broker needs redis-py: pip install 'agent-os[redis]'") from exc

from amb.broker import BrokerSubscription, Capabilities, DeliveryHandler, Lifecycle, LifecycleState
from amb.errors import BrokerUnavailable, ConfigError, StateError, TransportError
from amb.subjects import is_wildcard, matches, validate_pattern, validate_subject

log = logging.getLogger(__name__)

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_PENDING: Final = 4096
_GLOB_SPECIAL: Final = frozenset("?*[]\\")
_Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry as redis-py returns it (bytes mode)

# Lua: does `subject` match `pattern` (amb.subjects syntax)? Shared by the scripts below.
_LUA_MATCHES: Final = """
local function split(text)
  local out = {}
  for tok in string.gmatch(text, "[^.]+") do out[#out + 1] = tok end
  return out
end
local function matches(pattern, s)
  local p = split(pattern)
  for i = 1, #p do
    if p[i] == ">" then return #s >= i end
    if i > #s or (p[i] ~= "*" and p[i] ~= s[i]) then return false end
  end
  return #p == #s
end
local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS[1] registry; ARGV: subject, data, stream maxlen. PUBLISH, then XADD to each live group.
_LUA_PUBLISH: Final = (
    _LUA_MATCHES
    + """
local subject = split(ARGV[1])
local added = 0
for _, entry in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], now_ms(), "+inf")) do
  local sp = string.find(entry, " ", 1, true)
  if matches(string.sub(entry, 1, sp - 1), subject) then
    redis.call("XADD", string.sub(entry, sp + 1), "MAXLEN", "~", ARGV[3], "*", "s", ARGV[1], "d", ARGV[2])
    added = added + 1
  end
end
redis.call("PUBLISH", ARGV[1], ARGV[2])
return added
"""
)

# KEYS[1] registry, KEYS[2] stream; ARGV: registry member, group, lease ms (0 = forever).
# Creates the group at "$" before registering it, so no message is added before the group sees it.
_LUA_REGISTER: Final = (
    _LUA_MATCHES
    + """
local made = redis.pcall("XGROUP", "CREATE", KEYS[2], ARGV[2], "$", "MKSTREAM")
if type(made) == "table" and made.err and not string.find(made.err, "BUSYGROUP", 1, true) then
  return made
end
local now = now_ms()
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", "(" .. now)
local lease = tonumber(ARGV[3])
if lease > 0 then
  redis.call("ZADD", KEYS[1], "GT", now + lease, ARGV[1])
  if redis.call("PTTL", KEYS[2]) < lease + 60000 then redis.call("PEXPIRE", KEYS[2], lease + 60000) end
else
  redis.call("ZADD", KEYS[1], "+inf", ARGV[1])
  redis.call("PERSIST", KEYS[2])
end
return 1
"""
)


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Translate redis-py errors into the bus's: most specific first, the original chained."""
    try:
        yield
    except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
        raise TransportError(f"redis refused to {action}: {exc}") from exc
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:
        raise BrokerUnavailable(f"redis unavailable, could not {action}: {exc}") from exc
    except rexc.RedisError as exc:
        raise TransportError(f"redis failed to {action}: {exc}") from exc
    except OSError as exc:
        raise BrokerUnavailable(f"redis unavailable, could not {action}: {exc}") from exc


def glob_for(pattern: str) -> str:
    """The Redis glob that matches a superset of the subjects ``pattern`` matches."""
    tokens = []
    for tok in pattern.split("."):
        if tok in ("*", ">"):
            tokens.append("*")
        else:
            tokens.append("".join("\\" + c if c in _GLOB_SPECIAL else c for c in tok))
    return ".".join(tokens)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisDelivery:
    """A message handed to a Redis subscription; ``extra["stream_id"]`` for stream deliveries."""

    __slots__ = ("_sub", "attempt", "data", "extra", "stream_id", "subject")

    def __init__(
        self, subject: str, data: bytes, attempt: int, sub: _Subscription, stream_id: str | None = None
    ) -> None:
        self.subject = subject
        self.data = data
        self.attempt = attempt
        self._sub = sub
        self.stream_id = stream_id
        self.extra: Mapping[str, Any] = {} if stream_id is None else {"stream_id": stream_id}

    async def ack(self) -> None:
        if self.stream_id is not None:
            await self._sub.ack(self.stream_id)

    async def nack(self, delay: float | None = None) -> None:
        self._sub.redeliver(self, delay or 0.0)


class _Subscription:
    """One subscription: a bounded queue and the single task that feeds its handler.

    Fed by the client's pub/sub reader; :class:`_StreamSubscription` feeds itself from a stream.
    """

    def __init__(
        self, broker: RedisBroker, pattern: str, handler: DeliveryHandler, queue: str | None, max_pending: int
    ) -> None:
        self.broker = broker
        self.pattern = pattern
        self.handler = handler
        self.queue = queue
        self.max_pending = max_pending
        self.handler_errors = 0
        self._items: deque[RedisDelivery] = deque()
        self._has_items = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False
        self._timers: set[asyncio.TimerHandle] = set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"redis-sub:{pattern}")

    async def put(self, delivery: RedisDelivery) -> None:
        """Enqueue, waiting while the queue is full (backpressure on the reader)."""
        while len(self._items) >= self.max_pending and not self._stopping:
            self._room.clear()
            await self._room.wait()
        if not self._stopping:
            self._items.append(delivery)
            self._has_items.set()

    def requeue(self, delivery: RedisDelivery) -> None:
        """Put a redelivered message back, beyond the bound: it was already counted against it."""
        if not self._task.done():
            self._items.append(delivery)
            self._has_items.set()

    def redeliver(self, delivery: RedisDelivery, delay: float) -> None:
        again = RedisDelivery(delivery.subject, delivery.data, delivery.attempt + 1, self)
        self._later(delay, self.requeue, again)

    def _later(self, delay: float, callback: Any, *args: Any) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    async def ack(self, stream_id: str) -> None:
        return None

    async def _run(self) -> None:
        items = self._items
        while True:
            while items:
                delivery = items.popleft()
                self._room.set()
                try:
                    await self.handler(delivery)
                except Exception:
                    # The handler is the bus's and should never raise; the subscription survives.
                    self.handler_errors += 1
                    log.exception("redis broker: handler for %r raised", self.pattern)
            if self._stopping:
                return
            self._has_items.clear()
            await self._has_items.wait()

    # -- BrokerSubscription -------------------------------------------------------------------

    async def unsubscribe(self) -> None:
        await self._detach()
        self._items.clear()
        await self._stop(timeout=None)

    async def drain(self, timeout: float | None = None) -> None:
        await self._detach()
        await self._stop(timeout)

    async def _detach(self) -> None:
        await self.broker._detach(self)

    async def _stop(self, timeout: float | None) -> None:
        self._stopping = True
        self._has_items.set()
        self._room.set()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._task is asyncio.current_task():
            return  # stopping from inside its own handler: the loop ends after this message
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _StreamSubscription(_Subscription):
    """A member of a stream consumer group: a queue group or a durable subscription."""

    def __init__(
        self,
        broker: RedisBroker,
        pattern: str,
        handler: DeliveryHandler,
        queue: str | None,
        max_pending: int,
        *,
        key: str,
        group: str,
        lease_ms: int,
    ) -> None:
        super().__init__(broker, pattern, handler, queue, max_pending)
        self.key = key
        self.group = group
        self.lease_ms = lease_ms
        self.consumer = f"{broker.client_id}-{next(broker._sub_ids)}"
        self._reader: asyncio.Task[None] | None = None

    @property
    def member(self) -> str:
        return f"{self.pattern} {self.key}"

    async def register(self) -> None:
        await self.broker._register(self)

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"redis-stream:{self.key}"
        )

    async def ack(self, stream_id: str) -> None:
        r = self.broker.redis
        with _translated("ack a stream entry"):
            async with r.pipeline(transaction=False) as pipe:
                pipe.xack(self.key, self.group, stream_id)
                pipe.xdel(self.key, stream_id)  # one group per stream: an acked entry is done
                await pipe.execute()

    def redeliver(self, delivery: RedisDelivery, delay: float) -> None:
        # The entry stays pending on this consumer; after `delay` it is claimed again (which
        # bumps Redis's delivery count) and handed back to this subscription.
        self._later(delay, self._spawn_reclaim, delivery)

    def _spawn_reclaim(self, delivery: RedisDelivery) -> None:
        task = asyncio.get_running_loop().create_task(self._reclaim_one(delivery))
        self.broker._background.add(task)
        task.add_done_callback(self.broker._background.discard)

    async def _reclaim_one(self, delivery: RedisDelivery) -> None:
        assert delivery.stream_id is not None
        try:
            claimed = cast(
                list[_Entry],
                await self.broker.redis.xclaim(self.key, self.group, self.consumer, 0, [delivery.stream_id]),
            )
        except rexc.RedisError as exc:
            # Still pending: a live member (or this one) reclaims it after claim_min_idle.
            log.warning("redis broker: could not redeliver %s on %s: %r", delivery.stream_id, self.key, exc)
            return
        for stream_id, fields in claimed:
            if fields:
                self.requeue(self._delivery(stream_id, fields, delivery.attempt + 1))

    def _delivery(self, stream_id: bytes | str, fields: Mapping[bytes, bytes], attempt: int) -> RedisDelivery:
        return RedisDelivery(_text(fields[b"s"]), fields[b"d"], attempt, self, _text(stream_id))

    async def _read_loop(self) -> None:
        broker = self.broker
        r = broker.redis
        claim_every = max(0.05, broker.claim_min_idle / 2)
        next_claim = 0.0
        failures = 0
        while not self._stopping:
            try:
                now = time.monotonic()
                if now >= next_claim:
                    await self._claim()
                    next_claim = time.monotonic() + claim_every
                if len(self._items) >= self.max_pending:
                    self._room.clear()
                    await self._room.wait()
                    continue
                block = min(broker.block, max(0.001, next_claim - time.monotonic()))
                count = min(broker.read_batch, self.max_pending - len(self._items))
                got = cast(
                    list[tuple[bytes, list[_Entry]]] | None,
                    await r.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.key: ">"},
                        count=count,
                        block=max(1, int(block * 1000)),
                    ),
                )
                failures = 0
                for _key, entries in got or ():
                    for stream_id, fields in entries:
                        await self.put(self._delivery(stream_id, fields, 1))
            except rexc.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream or its group vanished (expired, or a server that lost its
                    # data set): create and register them again.
                    await self._retry_after(failures, "group missing", exc)
                    failures += 1
                    with contextlib.suppress(rexc.RedisError):
                        await self.register()
                    continue
                await self._retry_after(failures, "read failed", exc)
                failures += 1
            except (rexc.RedisError, OSError) as exc:
                await self._retry_after(failures, "connection lost", exc)
                failures += 1

    async def _retry_after(self, failures: int, what: str, exc: BaseException) -> None:
        if failures == 0:
            log.warning("redis broker: %s on %s (%r); retrying", what, self.key, exc)
        await asyncio.sleep(min(2.0, 0.05 * 2**failures))

    async def _claim(self) -> None:
        """Take over entries idle for claim_min_idle on any consumer (including a dead one)."""
        broker = self.broker
        r = broker.redis
        start: bytes | str = "0-0"
        while not self._stopping:
            reply: list[Any] = await r.xautoclaim(
                self.key,
                self.group,
                self.consumer,
                int(broker.claim_min_idle * 1000),
                start_id=start,
                count=broker.read_batch,
            )
            start = cast(bytes, reply[0])
            entries = [(i, f) for i, f in cast(list[_Entry], reply[1]) if f]
            if entries:
                pending: list[dict[str, Any]] = await r.xpending_range(
                    self.key,
                    self.group,
                    min=entries[0][0],
                    max=entries[-1][0],
                    count=len(entries) * 2 + 16,
                    consumername=self.consumer,
                )
                counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
                for stream_id, fields in entries:
                    attempt = counts.get(_text(stream_id), 2)
                    if attempt > broker.max_deliveries:
                        await self._dead_letter(_text(stream_id), fields, attempt)
                    else:
                        await self.put(self._delivery(stream_id, fields, attempt))
            if _text(start) == "0-0":
                return

    async def _dead_letter(self, stream_id: str, fields: Mapping[bytes, bytes], attempt: int) -> None:
        broker = self.broker
        log.error(
            "redis broker: %s on %s delivered %d times; moved to the dead-letter stream",
            stream_id,
            self.key,
            attempt,
        )
        async with broker.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                f"{broker.key_prefix}dead:{self.key}",
                {
                    b"s": fields[b"s"],
                    b"d": fields[b"d"],
                    b"id": stream_id,
                    b"deliveries": attempt,
                    b"group": self.group,
                },
                maxlen=broker.stream_maxlen,
                approximate=True,
            )
            pipe.xack(self.key, self.group, stream_id)
            pipe.xdel(self.key, stream_id)
            await pipe.execute()
        broker.dead_lettered += 1

    async def _stop(self, timeout: float | None) -> None:
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            # Entries read but not yet handed over stay pending and are claimed later.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await super()._stop(timeout)
        await self._leave()

    async def _leave(self) -> None:
        """Remove this consumer from its group when nothing is pending on it (else: claimable)."""
        r = self.broker.redis
        with contextlib.suppress(rexc.RedisError, OSError):
            pending = await r.xpending_range(
                self.key, self.group, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await r.xgroup_delconsumer(self.key, self.group, self.consumer)


_client_ids = itertools.count(1)


class RedisBroker(Lifecycle):
    """A client of a Redis server. ``RedisBroker("redis://127.0.0.1:6379/0")``.

    Options: ``max_pending`` (per-subscription queue bound), ``stream_maxlen`` (approximate
    bound of each group's stream), ``claim_min_idle`` (seconds an entry stays pending on a
    consumer before another may claim it), ``max_deliveries`` (deliveries of a stream entry
    before it is dead-lettered), ``durable_ttl`` (seconds a durable group outlives its last
    member, None for ever), ``queue_lease`` (the same for queue groups), ``read_batch``,
    ``block`` (longest ``XREADGROUP`` wait, seconds), ``reconnect_attempts``, ``key_prefix``;
    anything else goes to ``redis.asyncio.Redis.from_url``.
    """

    name = "redis"
    capabilities = Capabilities(
        durable=True,
        redelivery=True,
        queue_groups=True,
        wildcards=True,
        ordered_per_key=False,
        native_request_reply=False,
        max_payload=None,
    )
    _what = "redis broker"

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        stream_maxlen: int = 100_000,
        claim_min_idle: float = 30.0,
        max_deliveries: int = 16,
        durable_ttl: float | None = 24 * 3600.0,
        queue_lease: float = 30.0,
        read_batch: int = 64,
        block: float = 2.0,
        reconnect_attempts: int = 20,
        key_prefix: str = "amb:",
        **redis_options: Any,
    ) -> None:
        self.url = connection_string or DEFAULT_URL
        if urlparse(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis broker URL must look like redis://HOST:PORT/DB, got {self.url!r}")
        if max_pending < 1 or stream_maxlen < 1 or max_deliveries < 1 or read_batch < 1:
            raise ConfigError("max_pending, stream_maxlen, max_deliveries and read_batch must be >= 1")
        if min(claim_min_idle, queue_lease, block, durable_ttl or 1.0) <= 0:
            raise ConfigError("claim_min_idle, queue_lease, block and durable_ttl must be positive")
        self.max_pending = max_pending
        self.stream_maxlen = stream_maxlen
        self.claim_min_idle = claim_min_idle
        self.max_deliveries = max_deliveries
        self.durable_ttl = durable_ttl
        self.queue_lease = queue_lease
        self.read_batch = read_batch
        self.block = block
        self.key_prefix = key_prefix
        self.registry_key = f"{key_prefix}groups"
        self.dead_lettered = 0
        self.client_id = f"{os.getpid():x}{next(_client_ids):x}{os.urandom(4).hex()}"
        self._inbox = f"_INBOX.{self.client_id}"
        self._redis_options: dict[str, Any] = {
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), reconnect_attempts),
            "socket_keepalive": True,
            **redis_options,
        }
        self._redis: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._subs: set[_Subscription] = set()
        self._exact: dict[str, list[_Subscription]] = {}
        self._globs: dict[str, list[_Subscription]] = {}
        self._confirms: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._sub_ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._publish_script: Any = None
        self._register_script: Any = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise StateError("redis broker is not connected: call connect() first")
        return self._redis

    # -- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._state is LifecycleState.OPEN:
            return
        if self._state is not LifecycleState.UNOPENED:
            raise StateError(f"redis broker is {self._state.value}; create a new one")
        client = aioredis.Redis.from_url(self.url, **self._redis_options)
        try:
            with _translated("connect"):
                await client.ping()
                pubsub = client.pubsub()
                await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        self._pubsub = pubsub
        self._publish_script = client.register_script(_LUA_PUBLISH)
        self._register_script = client.register_script(_LUA_REGISTER)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_pubsub(), name="redis-pubsub")
        self._heartbeat = loop.create_task(self._renew_leases(), name="redis-leases")
        self._state = LifecycleState.OPEN

    async def close(self, timeout: float = 5.0) -> None:
        if self._state in (LifecycleState.CLOSING, LifecycleState.CLOSED):
            return
        if self._state is LifecycleState.UNOPENED:
            self._state = LifecycleState.CLOSED
            return
        self._state = LifecycleState.CLOSING
        subs = list(self._subs)
        if subs:
            await asyncio.gather(*(sub.drain(timeout) for sub in subs))
        for task in (self._reader, self._heartbeat, *self._background):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(rexc.RedisError, OSError):
            if self._pubsub is not None:
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            await self.redis.aclose()
        self._state = LifecycleState.CLOSED

    # -- publish ------------------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        if self._state is not LifecycleState.OPEN:
            self._require_open()
        validate_subject(subject)
        with _translated(f"publish to {subject!r}"):
            await self._publish_script(keys=[self.registry_key], args=[subject, data, self.stream_maxlen])

    # -- subscribe ----------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
        max_pending: int | None = None,
    ) -> BrokerSubscription:
        self._require_open()
        validate_pattern(pattern)
        for what, value in (("queue group", queue), ("durable", durable)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ConfigError(f"{what} name must be non-empty without whitespace, got {value!r}")
        bound = max_pending or self.max_pending
        if durable is None and queue is None:
            sub = _Subscription(self, pattern, handler, None, bound)
            self._subs.add(sub)
            try:
                await self._listen(sub)
            except BaseException:
                await sub.unsubscribe()
                raise
            return sub
        if durable is not None:
            key, group = f"{self.key_prefix}durable:{durable}:{pattern}", durable
            lease = 0 if self.durable_ttl is None else int(self.durable_ttl * 1000)
        else:
            assert queue is not None
            key, group = f"{self.key_prefix}queue:{queue}:{pattern}", queue
            lease = int(self.queue_lease * 1000)
        stream_sub = _StreamSubscription(
            self, pattern, handler, queue, bound, key=key, group=group, lease_ms=lease
        )
        self._subs.add(stream_sub)
        try:
            await stream_sub.register()
        except BaseException:
            await stream_sub.unsubscribe()
            raise
        stream_sub.start()
        return stream_sub

    def inbox_prefix(self) -> str:
        return self._inbox

    async def _register(self, sub: _StreamSubscription) -> None:
        with _translated(f"create the group {sub.group!r} on {sub.key!r}"):
            await self._register_script(
                keys=[self.registry_key, sub.key], args=[sub.member, sub.group, sub.lease_ms]
            )

    async def _renew_leases(self) -> None:
        """Keep the leases of this client's groups alive while it has members in them."""
        every = min(self.queue_lease, self.durable_ttl or self.queue_lease) / 3
        while True:
            await asyncio.sleep(every)
            for sub in [s for s in self._subs if isinstance(s, _StreamSubscription) and s.lease_ms]:
                try:
                    await self._register(sub)
                except TransportError as exc:
                    log.warning("redis broker: could not renew the lease of %s: %r", sub.key, exc)

    async def _listen(self, sub: _Subscription) -> None:
        """Add a pub/sub subscription; returns once Redis confirmed the (P)SUBSCRIBE."""
        pubsub = self._pubsub
        assert pubsub is not None
        if is_wildcard(sub.pattern):
            kind, name, table = "psubscribe", glob_for(sub.pattern), self._globs
        else:
            kind, name, table = "subscribe", sub.pattern, self._exact
        members = table.setdefault(name, [])
        members.append(sub)
        if len(members) > 1:
            return  # already subscribed in Redis (and confirmed, or being confirmed)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms.setdefault((kind, name), []).append(fut)
        with _translated(f"{kind} to {name!r}"):
            if kind == "psubscribe":
                await pubsub.psubscribe(name)
            else:
                await pubsub.subscribe(name)
        try:
            await asyncio.wait_for(fut, 10.0)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"redis did not confirm {kind} to {name!r}") from exc

    async def _detach(self, sub: _Subscription) -> None:
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        if isinstance(sub, _StreamSubscription):
            return
        wildcard = is_wildcard(sub.pattern)
        table = self._globs if wildcard else self._exact
        name = glob_for(sub.pattern) if wildcard else sub.pattern
        members = table.get(name, [])
        with contextlib.suppress(ValueError):
            members.remove(sub)
        if members or self._pubsub is None:
            return
        table.pop(name, None)
        with contextlib.suppress(rexc.RedisError, OSError):
            if wildcard:
                await self._pubsub.punsubscribe(name)
            else:
                await self._pubsub.unsubscribe(name)

    async def _read_pubsub(self) -> None:
        """The client's one pub/sub reader: dispatches each message to the matching subscriptions."""
        pubsub = self._pubsub
        assert pubsub is not None
        failures = 0
        while True:
            try:
                message = await pubsub.get_message(timeout=None)
                failures = 0
            except (rexc.RedisError, OSError) as exc:
                # redis-py already retried with backoff; keep trying while the client is open.
                if failures == 0:
                    log.warning("redis broker: pub/sub connection lost (%r); reconnecting", exc)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                failures += 1
                continue
            if message is None:
                continue
            kind = _text(message["type"])
            if kind == "message":
                subject = _text(message["channel"])
                targets = self._exact.get(subject, ())
            elif kind == "pmessage":
                subject = _text(message["channel"])
                targets = [
                    s for s in self._globs.get(_text(message["pattern"]), ()) if matches(s.pattern, subject)
                ]
            else:
                if kind in ("subscribe", "psubscribe"):
                    for fut in self._confirms.pop((kind, _text(message["channel"])), ()):
                        if not fut.done():
                            fut.set_result(None)
                continue
            data = cast(bytes, message["data"])
            for sub in list(targets):
                await sub.put(RedisDelivery(subject, data, 1, sub))
