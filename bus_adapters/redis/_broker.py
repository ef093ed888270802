"""The Redis broker client: connection, the pub/sub reader, publishing and group registration."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Coroutine
from typing import Any, Final, cast
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from agent_os.amb.broker import BrokerSubscription, Capabilities, DeliveryHandler, Lifecycle, LifecycleState
from agent_os.amb.dispatch import check_group_names, drain_all, stop_task
from agent_os.amb.errors import BrokerUnavailable, ConfigError, TransportError
from agent_os.amb.numbers import seconds, whole
from agent_os.amb.subjects import INBOX_ROOT, is_wildcard, matches, validate_pattern, validate_subject
from agent_os.bus_adapters.redis import _lua
from agent_os.bus_adapters.redis._errors import translate, translated
from agent_os.bus_adapters.redis._subscriptions import PubSubSubscription, StreamSubscription, text

log = logging.getLogger("agent_os.bus_adapters.redis")

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_PENDING: Final = 4096
_GLOB_SPECIAL: Final = frozenset("?*[]\\")


def glob_for(pattern: str) -> str:
    """The Redis glob that matches a superset of the subjects ``pattern`` matches."""
    tokens = []
    for tok in pattern.split("."):
        if tok in ("*", ">"):
            tokens.append("*")
        else:
            tokens.append("".join("\\" + c if c in _GLOB_SPECIAL else c for c in tok))
    return ".".join(tokens)


_client_ids = itertools.count(1)


class RedisBroker(Lifecycle):
    """A client of a Redis server. ``RedisBroker("redis://127.0.0.1:6379/0")``.

    Options (``max_pending``, ``stream_maxlen``, ``claim_min_idle``, ``max_deliveries``,
    ``durable_ttl``, ``queue_lease``, ``read_batch``, ``block``, ``reconnect_attempts``,
    ``key_prefix``, ``max_connections``; anything else goes to redis-py's connection pool) are
    described in ``docs/bus.md``, "redis". Raises ConfigError for a bad URL or option.

    Counters: ``dead_lettered`` (stream entries moved to the dead-letter stream),
    ``malformed`` (stream entries and pub/sub messages this adapter could not read: entries
    are dead-lettered with reason ``malformed: ...``, pub/sub messages dropped),
    ``reader_errors`` (unexpected errors of a reader, which logs them and goes on).
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
        max_connections: int = 100,
        **redis_options: Any,
    ) -> None:
        self.url = connection_string or DEFAULT_URL
        if urlparse(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis broker URL must look like redis://HOST:PORT/DB, got {self.url!r}")
        whole(max_pending, "max_pending")
        whole(stream_maxlen, "stream_maxlen")
        whole(max_deliveries, "max_deliveries")
        whole(read_batch, "read_batch")
        whole(reconnect_attempts, "reconnect_attempts", minimum=0)
        whole(max_connections, "max_connections", minimum=2)  # pub/sub's and one for commands
        seconds(claim_min_idle, "claim_min_idle")
        seconds(queue_lease, "queue_lease")
        seconds(block, "block")
        if durable_ttl is not None:
            seconds(durable_ttl, "durable_ttl", zero=True)
        self.max_pending = max_pending
        self.stream_maxlen = stream_maxlen
        self.claim_min_idle = claim_min_idle
        self.max_deliveries = max_deliveries
        self.durable_ttl = durable_ttl
        self.queue_lease = queue_lease
        self.read_batch = read_batch
        self.block = block
        self.key_prefix = key_prefix
        self.max_connections = max_connections
        self.registry_key = f"{key_prefix}groups"
        self.dead_lettered = 0
        self.malformed = 0
        self.reader_errors = 0
        self.client_id = f"{os.getpid():x}{next(_client_ids):x}{os.urandom(4).hex()}"
        self._inbox = f"{INBOX_ROOT}{self.client_id}"
        self._redis_options: dict[str, Any] = {
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), reconnect_attempts),
            "socket_keepalive": True,
            **redis_options,
        }
        self._redis: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pubsub_down = False  # the pub/sub reader lost its connection and is retrying
        self._heartbeat: asyncio.Task[None] | None = None
        self._subs: set[PubSubSubscription] = set()
        self._exact: dict[str, list[PubSubSubscription]] = {}
        self._globs: dict[str, list[PubSubSubscription]] = {}
        self._confirms: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._sub_ids = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()
        self._publish_script: Any = None
        self._ack_script: Any = None  # StreamSubscription.ack: XACK and XDEL in one command
        self._register_script: Any = None
        self._wildcard_index = self.registry_key_for(_lua.WILDCARD_INDEX)

    @property
    def redis(self) -> aioredis.Redis:
        """The redis-py client. Raises StateError before connect()."""
        return self._connected(self._redis)

    def registry_key_for(self, subject_or_pattern: str) -> str:
        """The registry index a pattern's groups are listed in (see :mod:`._lua`)."""
        return f"{self.registry_key}:{_lua.index_token(subject_or_pattern)}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and open the pub/sub connection; raises BrokerUnavailable."""
        if not self._begin_connect():
            return
        # redis-py's default pool raises MaxConnectionsError when every connection is in use
        # (100 by default): a client with more commands in flight (concurrent publishes,
        # requests, acks) would fail them as BrokerUnavailable. A blocking pool makes them wait.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=self.max_connections, timeout=None, **self._redis_options
        )
        client = aioredis.Redis.from_pool(pool)
        try:
            with translated("connect"):
                await client.ping()
                pubsub = client.pubsub()
                await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        self._pubsub = pubsub
        self._publish_script = client.register_script(_lua.PUBLISH)
        self._register_script = client.register_script(_lua.REGISTER)
        self._ack_script = client.register_script(_lua.ACK)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_pubsub(), name="redis-pubsub")
        self._heartbeat = loop.create_task(self._renew_leases(), name="redis-leases")
        self._state = LifecycleState.OPEN

    async def close(self, timeout: float = 5.0) -> None:
        """Drain every subscription (up to ``timeout``), then close the connections."""
        if not self._begin_close():
            return
        await drain_all(list(self._subs), timeout)
        for task in (self._reader, self._heartbeat, *self._background):
            if task is not None:
                await stop_task(task)
        with contextlib.suppress(rexc.RedisError, OSError):
            if self._pubsub is not None:
                await self._pubsub.aclose()
            await self.redis.aclose()
        self._state = LifecycleState.CLOSED

    # -- publish ------------------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        """PUBLISH, and XADD to the stream of every live matching group, atomically (one script).

        Reply subjects (``_INBOX.…``) are a plain PUBLISH: replies reach pub/sub subscriptions
        only. Raises ConfigError (bad subject), BrokerUnavailable or TransportError.
        """
        if self._state is not LifecycleState.OPEN:
            self._require_open()
        validate_subject(subject)
        try:
            if subject.startswith(INBOX_ROOT):
                await self.redis.publish(subject, data)
            else:
                await self._publish_script(
                    keys=[self.registry_key_for(subject), self._wildcard_index],
                    args=[subject, data, self.stream_maxlen],
                )
        except Exception as exc:
            raise (translate(exc, f"publish to {subject!r}") or exc) from exc

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
        """Pub/sub for a plain subscription; a stream consumer group for ``queue`` / ``durable``.

        Raises ConfigError for bad names, BrokerUnavailable / TransportError from Redis.
        """
        self._require_open()
        validate_pattern(pattern)
        check_group_names(queue, durable)
        for what, value in (("queue group", queue), ("durable", durable)):
            if value is not None and any(c.isspace() for c in value):
                raise ConfigError(f"{what} name must not contain whitespace, got {value!r}")
        bound = max_pending or self.max_pending
        if durable is None and queue is None:
            sub = PubSubSubscription(self, pattern, handler, None, bound)
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
        stream_sub = StreamSubscription(
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

    @property
    def connected(self) -> bool:
        """True while open with the pub/sub reader running and not reconnecting."""
        reader = self._reader
        return (
            self._state is LifecycleState.OPEN
            and reader is not None
            and not reader.done()
            and not self._pubsub_down
        )

    def inbox_prefix(self) -> str:
        return self._inbox

    async def _register(self, sub: StreamSubscription) -> None:
        with translated(f"create the group {sub.group!r} on {sub.key!r}"):
            await self._register_script(
                keys=[self.registry_key_for(sub.pattern), sub.key], args=[sub.member, sub.group, sub.lease_ms]
            )

    async def _renew_leases(self) -> None:
        """Keep the leases of this client's groups alive while it has members in them."""
        every = min(self.queue_lease, self.durable_ttl or self.queue_lease) / 3
        while True:
            await asyncio.sleep(every)
            for sub in [s for s in self._subs if isinstance(s, StreamSubscription) and s.lease_ms]:
                try:
                    await self._register(sub)
                except TransportError as exc:
                    log.warning("redis broker: could not renew the lease of %s: %r", sub.key, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- pub/sub ------------------------------------------------------------------------------

    async def _listen(self, sub: PubSubSubscription) -> None:
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
        with translated(f"{kind} to {name!r}"):
            if kind == "psubscribe":
                await pubsub.psubscribe(name)
            else:
                await pubsub.subscribe(name)
        try:
            await asyncio.wait_for(fut, 10.0)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"redis did not confirm {kind} to {name!r}") from exc

    async def _detach(self, sub: PubSubSubscription) -> None:
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        if isinstance(sub, StreamSubscription):
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
                self._pubsub_down = False
            except (rexc.RedisError, OSError) as exc:
                # redis-py already retried with backoff; keep trying while the client is open.
                self._pubsub_down = True
                if failures == 0:
                    log.warning("redis broker: pub/sub connection lost (%r); reconnecting", exc)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                failures += 1
                continue
            if message is None:
                continue
            try:
                await self._route_pubsub(message)
            except UnicodeDecodeError:
                self.malformed += 1
                log.warning("redis broker: dropped a pub/sub message on a channel that is not UTF-8")
            except ConfigError as exc:
                self.malformed += 1
                log.warning("redis broker: dropped a pub/sub message: %s", exc)
            except Exception:
                # One message must not end the reader every pub/sub subscription of this
                # client (its reply inbox included) depends on.
                self.reader_errors += 1
                log.exception("redis broker: could not route a pub/sub message")

    async def _route_pubsub(self, message: dict[str, Any]) -> None:
        """Hand one pub/sub message to the subscriptions it is for (or settle a confirmation).

        Raises UnicodeDecodeError / ConfigError for a channel that is no valid subject."""
        kind = text(message["type"])
        if kind == "message":
            subject = text(message["channel"])
            targets = self._exact.get(subject, ())
        elif kind == "pmessage":
            # A glob matches more than subjects (any bytes): check before delivering.
            subject = validate_subject(text(message["channel"]))
            targets = [
                s for s in self._globs.get(text(message["pattern"]), ()) if matches(s.pattern, subject)
            ]
        else:
            if kind in ("subscribe", "psubscribe"):
                for fut in self._confirms.pop((kind, text(message["channel"])), ()):
                    if not fut.done():
                        fut.set_result(None)
            return
        data = cast(bytes, message["data"])
        for sub in list(targets):
            await sub.put(subject, data)
