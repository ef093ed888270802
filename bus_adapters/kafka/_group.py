"""Kafka consumer groups: one aiokafka consumer per (bootstrap, group) in this process, shared by
the subscriptions that join that group; it fetches, dispatches with key affinity, and commits
contiguous acked offsets (``docs/bus.md``, "kafka").

Over 400 lines: :class:`GroupConsumer` is one class whose fetch, dispatch and commits share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent_os.amb.broker import DeliveryHandler, LifecycleState
from agent_os.amb.dispatch import Dispatcher, stop_task
from agent_os.amb.errors import BrokerUnavailable, ConfigError, StateError
from agent_os.amb.subjects import is_wildcard, matches, validate_subject
from agent_os.bus_adapters.kafka._config import (
    DEAD_HEADER_PREFIX,
    PUBLISHED_HEADER,
    SUBJECT_HEADER,
    aiokafka_module,
    dead_letter_topic,
    inbox_topic,
    topic_for,
    topic_regex,
)
from agent_os.bus_adapters.kafka._errors import translated

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

    from agent_os.bus_adapters.kafka._broker import KafkaBroker

log = logging.getLogger("agent_os.bus_adapters.kafka")

# Deliveries of one key handed to one member in a row before the key may move to another
# member (once that member has acked them all): spreads a hot key's work over the group.
_KEY_RUN = 16


def _stamped(
    tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
) -> Iterator[tuple[int, TopicPartition, ConsumerRecord[bytes, bytes]]]:
    # A function, not a nested generator expression: each partition's records keep their own
    # ``tp`` (a nested genexp would see the loop variable's last value once merge() reads it).
    for r in records:
        yield _published_ns(r), tp, r


def _published_ns(record: ConsumerRecord[bytes, bytes]) -> int:
    # The merge key: never raises (a record another producer wrote may have anything here).
    for name, value in record.headers or ():
        if name == PUBLISHED_HEADER and value is not None:
            with contextlib.suppress(ValueError):
                return int(value)
    with contextlib.suppress(TypeError, ValueError):
        return int(record.timestamp) * 1_000_000
    return 0


class MalformedRecord(ValueError):
    """A record this adapter cannot deliver (written by another producer); the message says why."""


def _subject_of(record: ConsumerRecord[bytes, bytes]) -> str:
    """The subject of a record: its ``amb-subject`` header (a null value counts as absent), else
    its topic. Raises MalformedRecord for a header that is not UTF-8 or not a valid subject."""
    for name, value in record.headers or ():
        if name == SUBJECT_HEADER and value is not None:
            try:
                return validate_subject(value.decode())
            except UnicodeDecodeError:
                raise MalformedRecord(f"the {SUBJECT_HEADER} header is not UTF-8") from None
            except ConfigError as exc:
                raise MalformedRecord(f"the {SUBJECT_HEADER} header: {exc}") from None
    topic: str = record.topic
    return topic


class KafkaDelivery:
    """A record handed to a Kafka subscription; ``extra`` has its ``topic``, ``partition``,
    ``offset`` and ``headers`` (the record's, as ``(name, value)`` pairs)."""

    __slots__ = ("_sub", "attempt", "data", "extra", "key", "subject", "tp")

    def __init__(
        self,
        sub: KafkaSubscription,
        subject: str,
        data: bytes,
        key: bytes | None,
        tp: TopicPartition,
        offset: int,
        attempt: int = 1,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> None:
        self._sub = sub
        self.subject = subject
        self.data = data
        self.key = key
        self.tp = tp
        self.attempt = attempt
        self.extra: Mapping[str, Any] = {
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": offset,
            "headers": headers,
        }

    @property
    def offset(self) -> int:
        return int(self.extra["offset"])

    async def ack(self) -> None:
        self._sub.group.acked(self)

    async def nack(self, delay: float | None = None) -> None:
        again = KafkaDelivery(
            self._sub,
            self.subject,
            self.data,
            self.key,
            self.tp,
            self.offset,
            self.attempt + 1,
            self.extra["headers"],
        )
        self._sub.dispatcher.requeue(again, delay)


class KafkaSubscription:
    """One subscription: a dispatcher fed by its group consumer."""

    def __init__(
        self,
        broker: KafkaBroker,
        group: GroupConsumer,
        pattern: str,
        handler: DeliveryHandler,
        queue: str | None,
    ) -> None:
        self.broker = broker
        self.group = group
        self.pattern = pattern
        self.queue = queue
        # The group consumer bounds what it hands over (max_pending per member), so the
        # dispatcher's own bound only matters for push() callers that check has_room().
        self.dispatcher: Dispatcher[KafkaDelivery] = Dispatcher(
            handler,
            max_pending=group.config.max_pending,
            name=f"kafka broker {pattern!r}",
            on_handled=group.handled,
        )

    @property
    def handler_errors(self) -> int:
        return self.dispatcher.handler_errors

    @property
    def pending(self) -> int:
        return len(self.dispatcher)

    async def unsubscribe(self) -> None:
        await self._stop(None, drop=True)

    async def drain(self, timeout: float | None = None) -> None:
        await self._stop(timeout, drop=False)

    async def _stop(self, timeout: float | None, drop: bool) -> None:
        self.group.detach(self)
        self.broker._subs.discard(self)
        await self.dispatcher.stop(timeout, drop=drop)
        await self.group.release()


class GroupConsumer:
    """One aiokafka consumer (one member of one Kafka group) shared by this process's subscriptions
    of that group: fetches, dispatches with key affinity, and commits contiguous acked offsets."""

    def __init__(self, broker: KafkaBroker, group_id: str, pattern: str, *, durable: bool) -> None:
        self.broker = broker
        self.bootstrap = broker.bootstrap
        self.config = broker.config
        self.group_id = group_id
        self.pattern = pattern
        self.durable = durable
        self.members: list[KafkaSubscription] = []
        self.refs = 0
        self._rr = itertools.count()
        # key -> (member handling it, its deliveries not yet acked, deliveries in this run)
        self._key_owner: dict[bytes, tuple[KafkaSubscription, int, int]] = {}
        self._pending: dict[TopicPartition, deque[int]] = {}
        self._acked: dict[TopicPartition, set[int]] = {}
        self._commit_to: dict[TopicPartition, int] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._dirty = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._started = asyncio.Lock()
        self._closed = False

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._started:
            if self._consumer is not None:
                return
            # Topic work first: a failure here leaves no consumer object behind.
            topic = inbox_topic(self.pattern)
            reply = topic is not None
            regex = None
            if topic is None and is_wildcard(self.pattern):
                regex = topic_regex(self.pattern)
                existing = await self.broker._matching_topics(regex)
            else:
                topic = topic or topic_for(self.pattern)
                await self.broker._ensure_topic(topic)
                existing = {topic}
            aiokafka = aiokafka_module()
            cfg = self.config
            consumer = aiokafka.AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=f"{self.broker.client_id}-consumer",
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=cfg.session_timeout_ms,
                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                metadata_max_age_ms=cfg.metadata_max_age_ms,
                request_timeout_ms=cfg.request_timeout_ms,
                max_partition_fetch_bytes=max(cfg.max_payload * 2, 1024 * 1024),
                fetch_max_wait_ms=cfg.reply_fetch_max_wait_ms if reply else cfg.fetch_max_wait_ms,
            )
            if regex is not None:
                consumer.subscribe(pattern=regex, listener=listener(self))
            else:
                consumer.subscribe(topics=[topic], listener=listener(self))
            with translated(f"subscribe to {self.pattern!r}"):
                await consumer.start()
                try:
                    await self._position(consumer, existing)
                except BaseException:
                    await consumer.stop()
                    raise
            self._consumer = consumer
            loop = asyncio.get_running_loop()
            self._fetch_task = loop.create_task(self._fetch(), name=f"kafka-fetch:{self.group_id}")
            self._commit_task = loop.create_task(self._commits(), name=f"kafka-commit:{self.group_id}")

    async def _position(self, consumer: AIOKafkaConsumer, existing: set[str]) -> None:
        """Wait until the partitions of the topics that exist now are assigned, and (for a
        non-durable group without committed offsets) move to their end: subscribe() returns only
        when a later message is sure to be delivered."""
        if not existing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.subscribe_timeout
        while not {tp.topic for tp in consumer.assignment()} >= existing:
            if loop.time() > deadline:
                raise BrokerUnavailable(f"kafka: no partition assignment for group {self.group_id!r}")
            await asyncio.sleep(0.01)
        for tp in consumer.assignment():
            if tp.topic in existing and not self.durable and await consumer.committed(tp) is None:
                await consumer.seek_to_end(tp)
            await consumer.position(tp)  # resolves the position now, not at the first fetch

    # -- fetching and dispatch -------------------------------------------------------------------

    async def _fetch(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        aiokafka = aiokafka_module()
        while not self._closed:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
            except aiokafka.errors.KafkaError as exc:
                log.warning("kafka broker: fetch for group %r failed: %s", self.group_id, exc)
                await asyncio.sleep(0.1)
                continue
            except Exception:
                # Not expected from aiokafka: counted and logged; the group goes on fetching.
                self.broker.reader_errors += 1
                log.exception("kafka broker: fetch for group %r failed", self.group_id)
                await asyncio.sleep(0.1)
                continue
            # One record's failure is that record's: it is dead-lettered (see _reject) and the
            # fetch goes on with the next one.
            if len(batches) == 1:
                ((tp, records),) = batches.items()
                for record in records:
                    try:
                        await self._dispatch(tp, record)
                    except Exception as exc:
                        await self._reject(tp, record, exc)
                continue
            # Records of different partitions (or topics, for a wildcard) fetched together are
            # handed over in publish order, as far as the publishers' clocks tell; each
            # partition's own order is kept (a merge, not a sort).
            merged = heapq.merge(
                *(_stamped(tp, records) for tp, records in batches.items()), key=lambda item: item[0]
            )
            for _, tp, record in merged:
                try:
                    await self._dispatch(tp, record)
                except Exception as exc:
                    await self._reject(tp, record, exc)

    async def _dispatch(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        """Hand ``record`` to a member (waiting for room); a record of a subject this group's
        pattern does not match is skipped. Raises MalformedRecord for a record without a valid
        subject."""
        subject = _subject_of(record)
        self._pending.setdefault(tp, deque()).append(record.offset)
        while True:
            member = self._pick(record.key)
            if member is not None and (member.pending < self.config.max_pending or self._closed):
                break
            self._room.clear()
            await self._room.wait()
            if self._closed or not self.members:
                return
        delivery = KafkaDelivery(
            member, subject, record.value or b"", record.key, tp, record.offset, 1, record.headers
        )
        if not (subject == self.pattern or (is_wildcard(self.pattern) and matches(self.pattern, subject))):
            self.acked(delivery)  # another subject mapped to this topic: not ours, skip it
            return
        if record.key is not None:
            _, count, run = self._key_owner.get(record.key, (member, 0, 0))
            self._key_owner[record.key] = (member, count + 1, run + 1)
        member.dispatcher.push(delivery)

    def _pick(self, key: bytes | None) -> KafkaSubscription | None:
        if not self.members:
            return None
        owned = self._key_owner.get(key) if key is not None else None
        if owned is not None:
            owner, _, run = owned
            if run < _KEY_RUN or len(self.members) == 1:
                return owner
            # A long run of one key: let its owner finish what it has of that key, then the
            # key may move to another member (order kept: never two members on one key).
            return None
        members = self.members
        start = next(self._rr) % len(members)
        ring = (members[(start + i) % len(members)] for i in range(len(members)))
        return min(ring, key=lambda m: m.pending)  # least loaded, round-robin among equals

    def handled(self) -> None:
        self._room.set()

    def acked(self, delivery: KafkaDelivery) -> None:
        key = delivery.key
        if key is not None and key in self._key_owner:
            owner, count, run = self._key_owner[key]
            if count <= 1:
                del self._key_owner[key]
                # The fetch may be waiting for this key's run to be acked (see _pick). Acks can
                # come after the dispatcher reported the deliveries handled (a subscription
                # with concurrency > 1 acks from its handler tasks), so wake it here too.
                self._room.set()
            else:
                self._key_owner[key] = (owner, count - 1, run)
        self._ack_offset(delivery.tp, delivery.offset)

    def _ack_offset(self, tp: TopicPartition, offset: int) -> None:
        pending = self._pending.get(tp)
        if pending is None:
            return  # the partition was revoked meanwhile
        acked = self._acked.setdefault(tp, set())
        acked.add(offset)
        advanced = None
        while pending and pending[0] in acked:
            advanced = pending.popleft()
            acked.discard(advanced)
        if advanced is not None:
            self._commit_to[tp] = advanced + 1
            self._dirty.set()

    # -- records that cannot be delivered ----------------------------------------------------------

    async def _reject(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], exc: Exception) -> None:
        """Settle a record whose dispatch raised: count it, move it to the dead-letter topic
        with the reason, and ack its offset so it is committed past and never comes again.

        If the dead letter cannot be written the offset stays pending (commits of its
        partition stop before it), so the record is fetched again after a restart or a
        rebalance: at least once, like every other record.
        """
        broker = self.broker
        if isinstance(exc, MalformedRecord):
            broker.malformed += 1
            reason = f"malformed: {exc}"
            log.warning("kafka broker: %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        else:
            broker.reader_errors += 1
            reason = f"dispatch_error: {type(exc).__name__}: {exc}"
            log.error(
                "kafka broker: could not dispatch %s[%d]@%d",
                record.topic,
                record.partition,
                record.offset,
                exc_info=exc,
            )
        pending = self._pending.setdefault(tp, deque())
        if not pending or pending[-1] < record.offset:
            pending.append(record.offset)
        if await self._dead_letter(record, reason[:1024]):
            self._ack_offset(tp, record.offset)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], reason: str) -> bool:
        """Write ``record`` (value, key, headers) to its dead-letter topic, with headers
        ``amb-dead-reason``, ``-topic``, ``-partition``, ``-offset``, ``-group`` and ``-subject``
        (the original ``amb-subject``, which the dead record does not carry). False on failure."""
        broker = self.broker
        topic = dead_letter_topic(record.topic)
        headers: list[tuple[str, bytes | None]] = [
            (f"{DEAD_HEADER_PREFIX}reason", reason.encode()),
            (f"{DEAD_HEADER_PREFIX}topic", record.topic.encode()),
            (f"{DEAD_HEADER_PREFIX}partition", str(record.partition).encode()),
            (f"{DEAD_HEADER_PREFIX}offset", str(record.offset).encode()),
            (f"{DEAD_HEADER_PREFIX}group", self.group_id.encode()),
        ]
        for name, value in record.headers or ():
            headers.append(
                (f"{DEAD_HEADER_PREFIX}subject", value) if name == SUBJECT_HEADER else (name, value)
            )
        try:
            producer = broker._producer
            if producer is None or broker.state is not LifecycleState.OPEN:
                raise StateError(f"kafka broker is {broker.state.value}")
            await broker._ensure_topic(topic)
            await producer.send_and_wait(topic, record.value, key=record.key, headers=headers)
        except Exception as exc:
            broker.dead_letter_failures += 1
            log.error(
                "kafka broker: could not dead-letter %s[%d]@%d (%s): %r",
                record.topic,
                record.partition,
                record.offset,
                reason,
                exc,
            )
            return False
        broker.dead_lettered += 1
        return True

    # -- commits -----------------------------------------------------------------------------------

    async def _commits(self) -> None:
        while not self._closed:
            await self._dirty.wait()
            self._dirty.clear()
            await self.commit()
            await asyncio.sleep(0.05)  # coalesce bursts of acks into one OffsetCommit

    async def commit(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._commit_to:
            return
        assigned = consumer.assignment()
        offsets = {tp: off for tp, off in self._commit_to.items() if tp in assigned}
        self._commit_to.clear()
        if not offsets:
            return
        aiokafka = aiokafka_module()
        try:
            await consumer.commit(offsets)
        except aiokafka.errors.KafkaError as exc:
            # At least once: the uncommitted messages are delivered again after a rebalance.
            log.warning("kafka broker: commit for group %r failed: %s", self.group_id, exc)

    def revoked(self, partitions: Any) -> None:
        for tp in partitions:
            self._pending.pop(tp, None)
            self._acked.pop(tp, None)

    # -- membership ----------------------------------------------------------------------------

    def attach(self, member: KafkaSubscription) -> None:
        self.members.append(member)
        self._room.set()

    def detach(self, member: KafkaSubscription) -> None:
        if member in self.members:
            self.members.remove(member)
            for key, (owner, _, _) in list(self._key_owner.items()):
                if owner is member:
                    del self._key_owner[key]
            self._room.set()

    async def release(self) -> None:
        """Called when a member stops: the last one commits and closes the consumer."""
        self.refs -= 1
        if self.refs > 0:
            return
        self.broker._groups.pop((self.bootstrap, self.group_id), None)
        self._closed = True
        self._room.set()
        for task in (self._fetch_task, self._commit_task):
            if task is not None:
                await stop_task(task)
        if self._consumer is not None:
            await self.commit()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None


def listener(group: GroupConsumer) -> Any:
    """A rebalance listener (aiokafka's base class is imported lazily): commit acked offsets
    before partitions move, and forget the revoked partitions' bookkeeping."""
    from aiokafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            await group.commit()
            group.revoked(revoked)

        async def on_partitions_assigned(self, assigned: Any) -> None:
            return None

    return Listener()
