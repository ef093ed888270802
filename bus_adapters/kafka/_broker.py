"""The Kafka broker client: producer, admin, topics, and subscription set-up."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent_os.amb.broker import BrokerSubscription, Capabilities, DeliveryHandler, Lifecycle, LifecycleState
from agent_os.amb.dispatch import check_group_names, drain_all
from agent_os.amb.errors import BrokerUnavailable, BusError, ConfigError, TransportError
from agent_os.amb.subjects import INBOX_ROOT, validate_pattern, validate_subject
from agent_os.bus_adapters.kafka._config import (
    BAD_TOPIC_CHAR,
    DEFAULT_MAX_PAYLOAD,
    PUBLISHED_HEADER,
    SUBJECT_HEADER,
    aiokafka_module,
    parse_options,
    topic_for,
)
from agent_os.bus_adapters.kafka._errors import translate, translated
from agent_os.bus_adapters.kafka._group import GroupConsumer, KafkaSubscription

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = logging.getLogger("agent_os.bus_adapters.kafka")

# Groups shared by the subscriptions of this process: (bootstrap, group id) -> consumer.
_shared_groups: dict[tuple[str, str], GroupConsumer] = {}
_client_ids = itertools.count(1)


class KafkaBroker(Lifecycle):
    """A Kafka client. ``KafkaBroker("kafka://127.0.0.1:9092", session_timeout_ms=6000)``.

    Counters: ``publish_failures``; ``malformed`` (records without a valid subject),
    ``reader_errors`` (any other failure to dispatch a record, or of a fetch), both
    dead-lettered (``dead_lettered``, or ``dead_letter_failures`` when that failed); see
    ``docs/bus.md``, "kafka".
    """

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
        aiokafka_module()
        self.bootstrap, self.config = parse_options(connection_string, options)
        if self.config.max_payload != DEFAULT_MAX_PAYLOAD:
            self.capabilities = replace(self.capabilities, max_payload=self.config.max_payload)
        unique = f"{os.getpid():x}{next(_client_ids):x}{os.urandom(3).hex()}"
        self.client_id = self.config.client_id or f"amb-{unique}"
        self._inbox = f"{INBOX_ROOT}{BAD_TOPIC_CHAR.sub('_', self.client_id)}"
        self._producer: AIOKafkaProducer | None = None
        self._admin: Any = None
        self._create_topics = True
        self._topics: set[str] = set()
        self._subs: set[KafkaSubscription] = set()
        self._groups = _shared_groups
        self._sub_ids = itertools.count(1)
        self.publish_failures = 0
        self.malformed = 0
        self.dead_lettered = 0
        self.dead_letter_failures = 0
        self.reader_errors = 0
        self._unacked = 0
        self._publish_errors: list[BusError] = []
        self._all_acked = asyncio.Event()
        self._all_acked.set()

    async def connect(self) -> None:
        """Start the producer and the admin client; raises BrokerUnavailable."""
        if not self._begin_connect():
            return
        aiokafka = aiokafka_module()
        from aiokafka.admin import AIOKafkaAdminClient

        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-producer",
            max_request_size=self.config.max_payload + 64 * 1024,
            request_timeout_ms=self.config.request_timeout_ms,
            metadata_max_age_ms=self.config.metadata_max_age_ms,
            linger_ms=self.config.linger_ms,
            acks="all",
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=self.config.request_timeout_ms,
        )
        try:
            with translated(f"connect to {self.bootstrap}"):
                await producer.start()
                await admin.start()
        except BaseException:
            await producer.stop()
            await admin.close()
            raise
        self._producer, self._admin = producer, admin
        self._state = LifecycleState.OPEN

    async def close(self, timeout: float = 5.0) -> None:
        """Wait for pipelined publishes' acks, drain every subscription (up to ``timeout``),
        commit, leave the groups and close."""
        if not self._begin_close():
            return
        try:
            await self._flush(timeout)
        except BusError as exc:
            log.error("kafka broker: closing with publishes not acknowledged: %s", exc)
        await drain_all(list(self._subs), timeout)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        self._state = LifecycleState.CLOSED

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        """Append the record to the producer's batch for ``subject``'s topic (see the package
        docstring for what returning means). Raises ConfigError (bad subject, record too
        large), BrokerUnavailable / TransportError, and the failures of earlier publishes."""
        if self._state is not LifecycleState.OPEN:
            self._require_open()
        if self._publish_errors:
            self._raise_failures()
        validate_subject(subject)
        topic = topic_for(subject)
        if topic not in self._topics:
            await self._ensure_topic(topic)
        producer = self._producer
        assert producer is not None  # guaranteed by the OPEN state
        try:
            ack = await producer.send(
                topic,
                data,
                key=key.encode() if key is not None else None,
                headers=[
                    (SUBJECT_HEADER, subject.encode()),
                    (PUBLISHED_HEADER, str(time.time_ns()).encode()),
                ],
            )
            if self.config.confirm_publish:
                await ack
                return
        except Exception as exc:
            raise (translate(exc, f"publish to {subject!r}") or exc) from exc
        self._unacked += 1
        self._all_acked.clear()
        ack.add_done_callback(functools.partial(self._on_ack, subject))

    def _on_ack(self, subject: str, ack: asyncio.Future[Any]) -> None:
        self._unacked -= 1
        if not self._unacked:
            self._all_acked.set()
        exc: BaseException | None = (
            TransportError("the publish was cancelled") if ack.cancelled() else ack.exception()
        )
        if exc is None:
            return
        self.publish_failures += 1
        error = translate(exc, f"publish to {subject!r}") or TransportError(f"kafka: publish failed: {exc!r}")
        error.__cause__ = exc
        log.error("kafka broker: %s", error)
        self._publish_errors.append(error)

    def _raise_failures(self) -> None:
        if self._publish_errors:
            errors, self._publish_errors = self._publish_errors, []
            raise TransportError(
                f"{len(errors)} publish(es) were not acknowledged by Kafka; first: {errors[0]}"
            ) from errors[0]

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every publish so far is acknowledged; raise TransportError for those that
        failed (or BrokerUnavailable when ``timeout`` passes first)."""
        self._require_open()
        await self._flush(timeout)

    async def _flush(self, timeout: float | None) -> None:
        producer = self._producer
        try:
            async with asyncio.timeout(timeout):
                if producer is not None:
                    with translated("flush"):
                        await producer.flush()
                await self._all_acked.wait()
        except TimeoutError:
            raise BrokerUnavailable(
                f"kafka: {self._unacked} publishes unacknowledged after {timeout:g}s"
            ) from None
        self._raise_failures()

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
    ) -> BrokerSubscription:
        """Join the consumer group for ``queue`` / ``durable`` / this fan-out subscription and
        return once its partitions are assigned. Raises ConfigError, BrokerUnavailable."""
        self._require_open()
        validate_pattern(pattern)
        check_group_names(queue, durable)
        if durable is not None:
            group_id = durable
        elif queue is not None:
            group_id = f"amb.{queue}.{pattern}"
        else:
            group_id = f"amb.{self.client_id}.{next(self._sub_ids)}.{pattern}"
        group = self._groups.get((self.bootstrap, group_id))
        if group is None:
            group = GroupConsumer(self, group_id, pattern, durable=durable is not None)
            self._groups[(self.bootstrap, group_id)] = group
        elif group.pattern != pattern:
            raise ConfigError(f"group {group_id!r} is already subscribed to {group.pattern!r}")
        group.refs += 1
        try:
            await group.start()
        except BaseException:
            await group.release()
            raise
        sub = KafkaSubscription(self, group, pattern, handler, queue)
        group.attach(sub)
        self._subs.add(sub)
        return sub

    @property
    def connected(self) -> bool:
        """True while open and the producer is running (aiokafka reconnects to the cluster by
        itself; an error it cannot recover from surfaces as a failed publish)."""
        producer = self._producer
        return self._state is LifecycleState.OPEN and producer is not None and not producer._closed

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
        with translated(f"metadata for topic {topic!r}"):
            await self._producer.partitions_for(topic)
        self._topics.add(topic)

    async def _matching_topics(self, regex: str) -> set[str]:
        assert self._admin is not None
        compiled = re.compile(regex)
        with translated("list topics"):
            topics = await self._admin.list_topics()
        return {t for t in topics if compiled.match(t)}
