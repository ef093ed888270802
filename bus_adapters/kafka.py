"""The Kafka broker adapter (aiokafka). ``KafkaBroker("kafka://host:9092,host2:9092")``.

Tuning options may be given as keyword arguments or in the URL's query string
(``kafka://127.0.0.1:9092?session_timeout_ms=6000``); see :class:`KafkaConfig`.

Mapping and guarantees:

- **Subjects -> topics.** A subject is its own topic name; characters Kafka does not allow in
  topic names (anything but ``[A-Za-z0-9._-]``) become ``_xHH_``. The exact subject travels in
  the ``amb-subject`` record header, so ``Delivery.subject`` is always the subject published
  to, and subscriptions check it (two subjects that map to one topic are not confused).
  Reply subjects ``_INBOX.<client>.<n>`` all map to ONE topic per client, ``_INBOX.<client>``.
  Topics are created on first publish/subscribe (admin CreateTopics, idempotent; where the
  cluster refuses CreateTopics the adapter relies on broker-side auto-creation).
- **Delivery**: at least once for queue groups and durable subscriptions: offsets are
  committed manually, per partition, up to the first offset not yet acked (contiguous acks
  only). A crash or a rebalance before the commit redelivers. Ephemeral fan-out subscriptions
  start at the end of the log when ``subscribe()`` returns (nothing published before is
  delivered; everything published after is).
- **Groups**: a fan-out subscription is its own consumer group, with a stable name
  (``amb.<client-id>.<n>.<pattern>``); ``queue="q"`` joins group ``amb.q.<pattern>``;
  ``durable="d"`` joins group ``d`` and resumes from its committed offsets (from the start of
  the log on its very first start).
- **One Kafka member per group per process.** Subscriptions of this process (of any
  ``KafkaBroker`` on the same bootstrap servers and event loop) that join the same group share
  one Kafka consumer; it spreads messages over them with *key affinity*: while a message with
  key K is being handled by a member, every later message with key K goes to that member, so
  messages of one key are handled in publish order, yet a single busy key does not pin the
  whole group's work on one member once it is idle. Across processes, Kafka's group protocol
  assigns partitions, and the partition key (``publish(key=...)``) keeps a key on one
  partition, hence in order.
- **Ordering**: per partition (so per key); a subscription's handler sees one delivery at a
  time, in fetch order. ``nack(delay)`` re-queues the message on the same subscription with
  ``attempt + 1`` after ``delay``, without committing past it.
- **Wildcards**: ``*`` -> ``[^.]+``, ``>`` -> ``.+`` as a topic regex; new matching topics are
  found on the next metadata refresh (``metadata_max_age_ms``) and then read from their start.
- **Drain**: ``close()`` stops fetching, lets queued messages reach the handlers (up to
  ``timeout``), commits the acked offsets, and leaves the groups.
- **Limits**: ``max_payload`` is 1 MiB by default (Kafka's ``message.max.bytes``).

What the librdkafka mock cluster (used by the tests) does not cover:

- CreateTopics is not offered (the adapter's fallback, auto-creation on Metadata/Produce, is
  what runs there; the mock creates 4 partitions per topic).
- A classic consumer group with two or more aiokafka members does not form: the mock answers a
  follower's SyncGroup that arrives after the leader's with INVALID_REQUEST, and aiokafka's
  leader always syncs first, so the group rebalances forever. The one-member-per-process design
  above means the test suite never needs two Kafka members in one group; multi-process groups
  are therefore not exercised by the tests.
- Session timeouts are enforced on a one-second tick, and a rebalance of a running group waits
  ``session_timeout_ms - 1000`` ms (hence the low timeouts of the test fixture, which a real
  broker's ``group.min.session.timeout.ms`` would refuse).
- No persistence across a broker restart, no replication, no ACLs, no transactions tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlparse

from amb.broker import BrokerSubscription, Capabilities, DeliveryHandler, Lifecycle, LifecycleState
from amb.errors import BrokerUnavailable, ConfigError, StateError, TransportError
from amb.subjects import is_wildcard, matches, validate_pattern, validate_subject

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

log = logging.getLogger(__name__)

SUBJECT_HEADER: Final = "amb-subject"
PUBLISHED_HEADER: Final = "amb-published-ns"
INBOX_ROOT: Final = "_INBOX"
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
_INSTALL_HINT: Final = "the kafka broker needs aiokafka: pip install 'agent-os[kafka]'"
_BAD_TOPIC_CHAR = re.compile(r"[^A-Za-z0-9._-]")
_MAX_TOPIC_LEN: Final = 249


def _aiokafka() -> Any:
    try:
        import aiokafka
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(_INSTALL_HINT) from exc
    return aiokafka


@contextlib.contextmanager
def _kafka_errors(what: str) -> Iterator[None]:
    """Translate aiokafka's errors into the bus's, most specific first, original chained."""
    from aiokafka import errors as kerr

    try:
        yield
    except (kerr.KafkaConnectionError, kerr.NodeNotReadyError, kerr.NoBrokersAvailable) as exc:
        raise BrokerUnavailable(f"kafka: {what}: {exc}") from exc
    except kerr.KafkaTimeoutError as exc:
        raise BrokerUnavailable(f"kafka: {what} timed out: {exc}") from exc
    except kerr.KafkaError as exc:
        raise TransportError(f"kafka: {what}: {exc}") from exc


def _published_ns(record: ConsumerRecord[bytes, bytes]) -> int:
    for name, value in record.headers or ():
        if name == PUBLISHED_HEADER:
            with contextlib.suppress(ValueError):
                return int(value)
    return int(record.timestamp) * 1_000_000


def topic_for(subject: str) -> str:
    """The topic a subject is published to (deterministic; reply subjects share one topic)."""
    tokens = subject.split(".")
    if tokens[0] == INBOX_ROOT and len(tokens) > 2:
        tokens = tokens[:2]
    topic = ".".join(_BAD_TOPIC_CHAR.sub(lambda m: f"_x{ord(m.group()):02x}_", t) for t in tokens)
    if len(topic) > _MAX_TOPIC_LEN:
        raise ConfigError(f"subject {subject!r} maps to a topic longer than {_MAX_TOPIC_LEN} characters")
    return topic


def _inbox_topic(pattern: str) -> str | None:
    """The reply topic a pattern under ``_INBOX.<client>.`` reads, or None for other patterns."""
    tokens = pattern.split(".")
    if tokens[0] == INBOX_ROOT and len(tokens) > 2 and not is_wildcard(tokens[1]):
        return topic_for(f"{tokens[0]}.{tokens[1]}")
    return None


def topic_regex(pattern: str) -> str:
    """The topic regex of a wildcard pattern: ``*`` -> ``[^.]+``, ``>`` -> ``.+``."""
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(topic_for(tok)))
    return "^" + r"\.".join(parts) + "$"


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """Options of :class:`KafkaBroker` (keyword arguments or URL query parameters)."""

    client_id: str | None = None
    partitions: int = 4
    replication_factor: int = 1
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    metadata_max_age_ms: int = 5_000
    request_timeout_ms: int = 30_000
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_pending: int = 1024
    subscribe_timeout: float = 30.0


def _parse(connection_string: str | None, options: Mapping[str, Any]) -> tuple[str, KafkaConfig]:
    url = urlparse(connection_string or "kafka://127.0.0.1:9092")
    if url.scheme not in ("kafka", ""):
        raise ConfigError(f"kafka broker URL must look like kafka://host:port, got {connection_string!r}")
    bootstrap = url.netloc if url.scheme else url.path
    if not bootstrap:
        raise ConfigError(f"no bootstrap servers in {connection_string!r}")
    types = {f.name: f.type for f in fields(KafkaConfig)}
    merged: dict[str, Any] = {}
    for key, value in [*parse_qsl(url.query), *options.items()]:
        if key not in types:
            raise ConfigError(f"unknown kafka broker option {key!r}")
        if isinstance(value, str) and types[key] in ("int", int):
            value = int(value)
        elif isinstance(value, str) and types[key] in ("float", float):
            value = float(value)
        merged[key] = value
    config = replace(KafkaConfig(), **merged)
    if config.partitions < 1 or config.max_pending < 1 or config.max_payload < 1:
        raise ConfigError("partitions, max_pending and max_payload must be positive")
    return bootstrap, config


class KafkaDelivery:
    """A record handed to a Kafka subscription."""

    __slots__ = ("_sub", "attempt", "data", "extra", "key", "subject", "tp")

    def __init__(
        self,
        sub: _KafkaSubscription,
        subject: str,
        data: bytes,
        key: bytes | None,
        tp: TopicPartition,
        offset: int,
        attempt: int = 1,
    ) -> None:
        self._sub = sub
        self.subject = subject
        self.data = data
        self.key = key
        self.tp = tp
        self.attempt = attempt
        self.extra: Mapping[str, Any] = {"topic": tp.topic, "partition": tp.partition, "offset": offset}

    @property
    def offset(self) -> int:
        return int(self.extra["offset"])

    async def ack(self) -> None:
        self._sub.group.acked(self)

    async def nack(self, delay: float | None = None) -> None:
        again = KafkaDelivery(
            self._sub, self.subject, self.data, self.key, self.tp, self.offset, self.attempt + 1
        )
        if delay:
            asyncio.get_running_loop().call_later(delay, self._sub.requeue, again)
        else:
            self._sub.requeue(again)


class _KafkaSubscription:
    """One subscription: a queue fed by its group consumer and the task that runs its handler."""

    def __init__(
        self,
        broker: KafkaBroker,
        group: _GroupConsumer,
        pattern: str,
        handler: DeliveryHandler,
        queue: str | None,
    ) -> None:
        self.broker = broker
        self.group = group
        self.pattern = pattern
        self.queue = queue
        self.handler = handler
        self.handler_errors = 0
        self._items: deque[KafkaDelivery] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kafka-sub:{pattern}")

    @property
    def pending(self) -> int:
        return len(self._items)

    def put(self, delivery: KafkaDelivery) -> None:
        self._items.append(delivery)
        self._wake.set()

    def requeue(self, delivery: KafkaDelivery) -> None:
        if self._task.done():
            return
        self.put(delivery)

    async def _run(self) -> None:
        while True:
            while self._items:
                delivery = self._items.popleft()
                try:
                    await self.handler(delivery)
                except Exception:
                    # The handler is the bus's and should not raise; the subscription survives it.
                    self.handler_errors += 1
                    log.exception("kafka broker: handler for %r raised", self.pattern)
                self.group.handled(self)
            if self._stopping:
                return
            self._wake.clear()
            await self._wake.wait()

    async def unsubscribe(self) -> None:
        self._items.clear()
        await self._stop(None)

    async def drain(self, timeout: float | None = None) -> None:
        await self._stop(timeout)

    async def _stop(self, timeout: float | None) -> None:
        self.group.detach(self)
        self.broker._subs.discard(self)
        self._stopping = True
        self._wake.set()
        if self._task is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self.group.release()


class _GroupConsumer:
    """One aiokafka consumer (one member of one Kafka group) shared by this process's subscriptions
    of that group: fetches, dispatches with key affinity, and commits contiguous acked offsets."""

    def __init__(self, broker: KafkaBroker, group_id: str, pattern: str, *, durable: bool) -> None:
        self.broker = broker
        self.bootstrap = broker.bootstrap
        self.config = broker.config
        self.group_id = group_id
        self.pattern = pattern
        self.durable = durable
        self.members: list[_KafkaSubscription] = []
        self.refs = 0
        self._rr = itertools.count()
        self._key_owner: dict[bytes, tuple[_KafkaSubscription, int]] = {}
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
            topic = _inbox_topic(self.pattern)
            regex = None
            if topic is None and is_wildcard(self.pattern):
                regex = topic_regex(self.pattern)
                existing = await self.broker._matching_topics(regex)
            else:
                topic = topic or topic_for(self.pattern)
                await self.broker._ensure_topic(topic)
                existing = {topic}
            aiokafka = _aiokafka()
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
                fetch_max_wait_ms=100,
            )
            if regex is not None:
                consumer.subscribe(pattern=regex, listener=_listener(self))
            else:
                consumer.subscribe(topics=[topic], listener=_listener(self))
            with _kafka_errors(f"subscribe to {self.pattern!r}"):
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
        aiokafka = _aiokafka()
        while not self._closed:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
            except aiokafka.errors.KafkaError as exc:
                log.warning("kafka broker: fetch for group %r failed: %s", self.group_id, exc)
                await asyncio.sleep(0.1)
                continue
            if len(batches) == 1:
                ((tp, records),) = batches.items()
                for record in records:
                    await self._dispatch(tp, record)
                continue
            # Records of different partitions (or topics, for a wildcard) fetched together are
            # handed over in publish order, as far as the publishers' clocks tell; each
            # partition's own order is kept (a merge, not a sort).
            merged = heapq.merge(
                *(((_published_ns(r), tp, r) for r in records) for tp, records in batches.items()),
                key=lambda item: item[0],
            )
            for _, tp, record in merged:
                await self._dispatch(tp, record)

    async def _dispatch(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        subject = record.topic
        for name, value in record.headers or ():
            if name == SUBJECT_HEADER:
                subject = value.decode("utf-8", "replace")
                break
        self._pending.setdefault(tp, deque()).append(record.offset)
        while True:
            member = self._pick(record.key)
            if member is not None and (member.pending < self.config.max_pending or self._closed):
                break
            self._room.clear()
            await self._room.wait()
            if self._closed or not self.members:
                return
        delivery = KafkaDelivery(member, subject, record.value or b"", record.key, tp, record.offset)
        if not (subject == self.pattern or (is_wildcard(self.pattern) and matches(self.pattern, subject))):
            self.acked(delivery)  # another subject mapped to this topic: not ours, skip it
            return
        if record.key is not None:
            _, count = self._key_owner.get(record.key, (member, 0))
            self._key_owner[record.key] = (member, count + 1)
        member.put(delivery)

    def _pick(self, key: bytes | None) -> _KafkaSubscription | None:
        if not self.members:
            return None
        if key is not None and key in self._key_owner:
            return self._key_owner[key][0]
        members = self.members
        start = next(self._rr) % len(members)
        ring = (members[(start + i) % len(members)] for i in range(len(members)))
        return min(ring, key=lambda m: m.pending)  # least loaded, round-robin among equals

    def handled(self, member: _KafkaSubscription) -> None:
        self._room.set()

    def acked(self, delivery: KafkaDelivery) -> None:
        key = delivery.key
        if key is not None and key in self._key_owner:
            owner, count = self._key_owner[key]
            if count <= 1:
                del self._key_owner[key]
            else:
                self._key_owner[key] = (owner, count - 1)
        tp = delivery.tp
        pending = self._pending.get(tp)
        if pending is None:
            return  # the partition was revoked meanwhile
        acked = self._acked.setdefault(tp, set())
        acked.add(delivery.offset)
        advanced = None
        while pending and pending[0] in acked:
            advanced = pending.popleft()
            acked.discard(advanced)
        if advanced is not None:
            self._commit_to[tp] = advanced + 1
            self._dirty.set()

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
        aiokafka = _aiokafka()
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

    def attach(self, member: _KafkaSubscription) -> None:
        self.members.append(member)
        self._room.set()

    def detach(self, member: _KafkaSubscription) -> None:
        if member in self.members:
            self.members.remove(member)
            for key, (owner, _) in list(self._key_owner.items()):
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
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._consumer is not None:
            await self.commit()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None


def _listener(group: _GroupConsumer) -> Any:
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


# Groups shared by the subscriptions of this process: (bootstrap, group id) -> consumer.
_shared_groups: dict[tuple[str, str], _GroupConsumer] = {}
_client_ids = itertools.count(1)


class KafkaBroker(Lifecycle):
    """A Kafka client. ``KafkaBroker("kafka://127.0.0.1:9092", session_timeout_ms=6000)``."""

    name = "kafka"
    capabilities = Capabilities(
        durable=True,
        redelivery=True,
        queue_groups=True,
        wildcards=True,
        ordered_per_key=True,
        native_request_reply=False,
        max_payload=DEFAULT_MAX_PAYLOAD,
    )
    _what = "kafka broker"

    def __init__(self, connection_string: str | None = None, **options: Any) -> None:
        _aiokafka()
        self.bootstrap, self.config = _parse(connection_string, options)
        if self.config.max_payload != DEFAULT_MAX_PAYLOAD:
            self.capabilities = replace(self.capabilities, max_payload=self.config.max_payload)
        unique = f"{os.getpid():x}{next(_client_ids):x}{os.urandom(3).hex()}"
        self.client_id = self.config.client_id or f"amb-{unique}"
        self._inbox = f"{INBOX_ROOT}.{_BAD_TOPIC_CHAR.sub('_', self.client_id)}"
        self._producer: AIOKafkaProducer | None = None
        self._admin: Any = None
        self._create_topics = True
        self._topics: set[str] = set()
        self._subs: set[_KafkaSubscription] = set()
        self._groups = _shared_groups
        self._sub_ids = itertools.count(1)

    async def connect(self) -> None:
        if self._state is LifecycleState.OPEN:
            return
        if self._state is not LifecycleState.UNOPENED:
            raise StateError(f"kafka broker is {self._state.value}; create a new one")
        aiokafka = _aiokafka()
        from aiokafka.admin import AIOKafkaAdminClient

        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-producer",
            max_request_size=self.config.max_payload + 64 * 1024,
            request_timeout_ms=self.config.request_timeout_ms,
            metadata_max_age_ms=self.config.metadata_max_age_ms,
            linger_ms=0,
            acks="all",
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=self.config.request_timeout_ms,
        )
        try:
            with _kafka_errors(f"connect to {self.bootstrap}"):
                await producer.start()
                await admin.start()
        except BaseException:
            await producer.stop()
            await admin.close()
            raise
        self._producer, self._admin = producer, admin
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
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        self._state = LifecycleState.CLOSED

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        if self._state is not LifecycleState.OPEN:
            self._require_open()
        validate_subject(subject)
        topic = topic_for(subject)
        if topic not in self._topics:
            await self._ensure_topic(topic)
        assert self._producer is not None  # guaranteed by the OPEN state
        with _kafka_errors(f"publish to {subject!r}"):
            await self._producer.send_and_wait(
                topic,
                data,
                key=key.encode() if key is not None else None,
                headers=[
                    (SUBJECT_HEADER, subject.encode()),
                    (PUBLISHED_HEADER, str(time.time_ns()).encode()),
                ],
            )

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
    ) -> BrokerSubscription:
        self._require_open()
        validate_pattern(pattern)
        if queue is not None and not queue:
            raise ConfigError("queue group name must be non-empty")
        if durable is not None and not durable:
            raise ConfigError("durable name must be non-empty")
        if durable is not None:
            group_id = durable
        elif queue is not None:
            group_id = f"amb.{queue}.{pattern}"
        else:
            group_id = f"amb.{self.client_id}.{next(self._sub_ids)}.{pattern}"
        group = self._groups.get((self.bootstrap, group_id))
        if group is None:
            group = _GroupConsumer(self, group_id, pattern, durable=durable is not None)
            self._groups[(self.bootstrap, group_id)] = group
        elif group.pattern != pattern:
            raise ConfigError(f"group {group_id!r} is already subscribed to {group.pattern!r}")
        group.refs += 1
        try:
            await group.start()
        except BaseException:
            await group.release()
            raise
        sub = _KafkaSubscription(self, group, pattern, handler, queue)
        group.attach(sub)
        self._subs.add(sub)
        return sub

    def inbox_prefix(self) -> str:
        return self._inbox

    # -- topics --------------------------------------------------------------------------------

    async def _ensure_topic(self, topic: str) -> None:
        """Create ``topic`` if missing. TopicAlreadyExists is success; where CreateTopics is not
        offered, fetching the topic's metadata lets the broker auto-create it."""
        if topic in self._topics:
            return
        from aiokafka import errors as kerr
        from aiokafka.admin import NewTopic

        if self._admin is not None and self._create_topics:
            try:
                await self._admin.create_topics(
                    [NewTopic(topic, self.config.partitions, self.config.replication_factor)]
                )
            except kerr.TopicAlreadyExistsError:
                pass
            except (kerr.IncompatibleBrokerVersion, kerr.UnsupportedVersionError):
                log.debug("kafka broker: CreateTopics not offered; relying on auto-creation")
                self._create_topics = False
            except kerr.KafkaError as exc:
                log.debug("kafka broker: CreateTopics(%s) failed: %s", topic, exc)
        assert self._producer is not None
        with _kafka_errors(f"metadata for topic {topic!r}"):
            await self._producer.partitions_for(topic)
        self._topics.add(topic)

    async def _matching_topics(self, regex: str) -> set[str]:
        assert self._admin is not None
        compiled = re.compile(regex)
        with _kafka_errors("list topics"):
            topics = await self._admin.list_topics()
        return {t for t in topics if compiled.match(t)}
