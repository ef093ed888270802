"""Redis subscriptions: pub/sub (fed by the client's one reader) and stream-group members."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, cast

from redis import exceptions as rexc

from agent_os.amb.broker import DeliveryHandler
from agent_os.amb.dispatch import Dispatcher, LocalDelivery, stop_task
from agent_os.amb.errors import ConfigError
from agent_os.amb.subjects import compile_pattern, validate_subject
from agent_os.bus_adapters.redis._errors import translated

if TYPE_CHECKING:
    from agent_os.bus_adapters.redis._broker import RedisBroker

log = logging.getLogger("agent_os.bus_adapters.redis")

_Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry as redis-py returns it (bytes mode)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MalformedEntry(ValueError):
    """A stream entry this adapter did not write and cannot deliver (its reason is the message)."""


# Fields of a dead-letter entry besides the original entry's own (renamed ``orig:<name>`` when
# an original field has one of these names).
_DEAD_META: Final = frozenset({b"id", b"deliveries", b"group", b"reason"})


class StreamDelivery:
    """A stream entry handed to a group member; ``extra["stream_id"]`` is its id."""

    __slots__ = ("_sub", "attempt", "data", "extra", "stream_id", "subject")

    def __init__(
        self, subject: str, data: bytes, attempt: int, sub: StreamSubscription, stream_id: str
    ) -> None:
        self.subject = subject
        self.data = data
        self.attempt = attempt
        self._sub = sub
        self.stream_id = stream_id
        self.extra: Mapping[str, Any] = {"stream_id": stream_id}

    async def ack(self) -> None:
        await self._sub.ack(self.stream_id)

    async def nack(self, delay: float | None = None) -> None:
        self._sub.redeliver(self, delay or 0.0)


class PubSubSubscription:
    """A plain subscription, fed by the client's pub/sub reader; nack redelivers locally."""

    def __init__(
        self, broker: RedisBroker, pattern: str, handler: DeliveryHandler, queue: str | None, max_pending: int
    ) -> None:
        self.broker = broker
        self.pattern = pattern
        self.queue = queue
        self.dispatcher: Dispatcher[Any] = Dispatcher(
            handler, max_pending=max_pending, name=f"redis broker {pattern!r}"
        )

    @property
    def handler_errors(self) -> int:
        return self.dispatcher.handler_errors

    async def put(self, subject: str, data: bytes) -> None:
        """Hand a pub/sub message over, waiting while the queue is full (pauses the reader)."""
        d = self.dispatcher
        delivery = LocalDelivery(subject, data, 1, d.handle)
        if not d.offer(delivery):
            await d.put(delivery)

    async def unsubscribe(self) -> None:
        await self.broker._detach(self)
        await self._stop(None, drop=True)

    async def drain(self, timeout: float | None = None) -> None:
        await self.broker._detach(self)
        await self._stop(timeout, drop=False)

    async def _stop(self, timeout: float | None, drop: bool) -> None:
        await self.dispatcher.stop(timeout, drop=drop)


class StreamSubscription(PubSubSubscription):
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
        self._match = compile_pattern(pattern)
        self._reader: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()

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
        with translated("ack a stream entry"):
            # XACK then XDEL (one group per stream: an acked entry is done), in one command.
            ack = self.broker._connected(self.broker._ack_script)  # StateError before connect()
            await ack(keys=[self.key], args=[self.group, stream_id])

    def redeliver(self, delivery: StreamDelivery, delay: float) -> None:
        # The entry stays pending on this consumer; after `delay` it is claimed again (which
        # bumps Redis's delivery count) and handed back to this subscription.
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.broker._spawn(self._reclaim_one(delivery))

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    async def _reclaim_one(self, delivery: StreamDelivery) -> None:
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
                # Checked when first delivered; a redelivery carries the same fields.
                again = StreamDelivery(
                    delivery.subject, delivery.data, delivery.attempt + 1, self, text(stream_id)
                )
                self.dispatcher.requeue(again)

    def _delivery(
        self, stream_id: bytes | str, fields: Mapping[bytes, bytes], attempt: int
    ) -> StreamDelivery:
        """The delivery of a stream entry; raises MalformedEntry for an entry without a valid
        subject (``s``: UTF-8, matched by this group's pattern) and data (``d``)."""
        raw_subject = fields.get(b"s")
        data = fields.get(b"d")
        if raw_subject is None or data is None:
            raise MalformedEntry("the entry has no 's' (subject) or no 'd' (data) field")
        try:
            subject = validate_subject(raw_subject.decode())
        except UnicodeDecodeError:
            raise MalformedEntry("the subject is not UTF-8") from None
        except ConfigError as exc:
            raise MalformedEntry(str(exc)) from None
        if not self._match(subject):
            raise MalformedEntry(f"subject {subject!r} is not matched by {self.pattern!r}")
        return StreamDelivery(subject, data, attempt, self, text(stream_id))

    async def _hand_over(self, stream_id: bytes, fields: Mapping[bytes, bytes], attempt: int) -> None:
        """Queue one entry for the handler, or dead-letter it when malformed.

        Any other exception than a Redis/connection error is logged and counted
        (``reader_errors``) and the entry left pending: it is claimed again after
        ``claim_min_idle`` and dead-lettered after ``max_deliveries``. The reader goes on.
        """
        try:
            try:
                delivery = self._delivery(stream_id, fields, attempt)
            except MalformedEntry as exc:
                self.broker.malformed += 1
                await self._dead_letter(text(stream_id), fields, attempt, f"malformed: {exc}")
                return
            await self.dispatcher.put(delivery)
        except (rexc.RedisError, OSError):
            raise
        except Exception:
            self.broker.reader_errors += 1
            log.exception("redis broker: entry %r on %s could not be handed over", stream_id, self.key)

    async def _read_loop(self) -> None:
        broker = self.broker
        r = broker.redis
        d = self.dispatcher
        claim_every = max(0.05, broker.claim_min_idle / 2)
        next_claim = 0.0
        failures = 0
        while not d.stopping:
            try:
                now = time.monotonic()
                if now >= next_claim:
                    await self._claim()
                    next_claim = time.monotonic() + claim_every
                block = min(broker.block, max(0.001, next_claim - time.monotonic()))
                # At least one entry, then put() waits for room: a full queue pauses the reads.
                count = max(1, min(broker.read_batch, d.max_pending - len(d)))
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
                        await self._hand_over(stream_id, fields, 1)
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
            except Exception as exc:
                # Not expected (entries are checked one by one): counted and logged, and the
                # reader goes on rather than leave the subscription dead.
                broker.reader_errors += 1
                log.exception("redis broker: the stream reader of %s failed", self.key)
                await self._retry_after(failures, "reader failed", exc)
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
        while not self.dispatcher.stopping:
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
                counts = {text(p["message_id"]): int(p["times_delivered"]) for p in pending}
                for stream_id, fields in entries:
                    attempt = counts.get(text(stream_id), 2)
                    if attempt > broker.max_deliveries:
                        await self._dead_letter(text(stream_id), fields, attempt, "max_deliveries")
                    else:
                        await self._hand_over(stream_id, fields, attempt)
            if text(start) == "0-0":
                return

    async def _dead_letter(
        self, stream_id: str, fields: Mapping[bytes, bytes], attempt: int, reason: str
    ) -> None:
        """Move an entry to ``<prefix>dead:<stream key>`` (its own fields, plus ``id``,
        ``deliveries``, ``group`` and ``reason``), then ack and delete it, in one transaction."""
        broker = self.broker
        log.error("redis broker: %s on %s moved to the dead-letter stream: %s", stream_id, self.key, reason)
        dead: dict[bytes, bytes | str | int] = {
            (b"orig:" + name if name in _DEAD_META else name): value for name, value in fields.items()
        }
        dead.update({b"id": stream_id, b"deliveries": attempt, b"group": self.group, b"reason": reason})
        async with broker.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                f"{broker.key_prefix}dead:{self.key}",
                dead,  # type: ignore[arg-type]
                maxlen=broker.stream_maxlen,
                approximate=True,
            )
            pipe.xack(self.key, self.group, stream_id)
            pipe.xdel(self.key, stream_id)
            await pipe.execute()
        broker.dead_lettered += 1

    async def _stop(self, timeout: float | None, drop: bool) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            # Entries read but not yet handed over stay pending and are claimed later.
            await stop_task(reader)
        await super()._stop(timeout, drop)
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
