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
- **Publishing** is pipelined: ``publish()`` returns once the record is in the producer's
  batch for its partition (aiokafka's ``send``; it waits only while the producer's buffer is
  full), not when Kafka has acknowledged it; records of one partition (so of one key) are sent
  and retried in order. A record Kafka refuses or that cannot be delivered within
  ``request_timeout_ms`` is counted (``publish_failures``) and its error raised by the next
  ``publish()`` or ``flush()``. ``flush()`` returns once every publish so far is acknowledged
  (``acks="all"``); ``close()`` waits for them (within its timeout). With
  ``confirm_publish=True`` each ``publish()`` returns only once acknowledged.
- **Delivery**: at least once for queue groups and durable subscriptions: offsets are
  committed manually, per partition, up to the first offset not yet acked (contiguous acks
  only). A crash or a rebalance before the commit redelivers. Ephemeral fan-out subscriptions
  start at the end of the log when ``subscribe()`` returns (nothing published before is
  delivered; everything published after is), except that a client started again with the same
  ``client_id`` resumes each fan-out group from its committed offsets on the partitions that
  have one (so it also gets what was published while it was away).
- **Groups**: a fan-out subscription is its own consumer group, with a stable name
  (``amb.<client-id>.<n>.<pattern>``, ``n`` counting the client's fan-out subscriptions):
  give each *live* client its own ``client_id``, since two live clients with one ``client_id``
  share those groups and split their messages instead of each getting all of them (without a
  ``client_id`` every client gets a random one); ``queue="q"`` joins group ``amb.q.<pattern>``;
  ``durable="d"`` joins group ``d`` and resumes from its committed offsets (from the start of
  the log on its very first start).
- **One Kafka member per group per process.** Subscriptions of this process (of any
  ``KafkaBroker`` on the same bootstrap servers and event loop) that join the same group share
  one Kafka consumer; it spreads messages over them with *key affinity*: while a message with
  key K is being handled by a member, every later message with key K goes to that member, so
  messages of one key are handled in publish order, yet a single busy key does not pin the
  whole group's work on one member: after 16 messages of K in a row, the consumer waits until
  that member has acked them and then gives K to the least loaded member (this wait holds up
  the records fetched behind it). Across processes, Kafka's group protocol
  assigns partitions, and the partition key (``publish(key=...)``) keeps a key on one
  partition, hence in order.
- **Ordering**: per partition (so per key); a subscription's handler sees one delivery at a
  time, in fetch order. ``nack(delay)`` re-queues the message on the same subscription with
  ``attempt + 1`` after ``delay``, without committing past it.
- **Wildcards**: ``*`` -> ``[^.]+``, ``>`` -> ``.+`` as a topic regex; new matching topics are
  found on the next metadata refresh (``metadata_max_age_ms``) and then read from their start.
- **Records that cannot be delivered** (written by another producer: an ``amb-subject``
  header that is not UTF-8 or not a valid subject) are counted (``malformed``) and moved, with
  their key, value and headers, to the topic ``_DEAD.<topic>`` (``dead_letter_topic``) with
  the headers ``amb-dead-reason``, ``-topic``, ``-partition``, ``-offset``, ``-group`` and
  ``-subject``; their offset is then acked, so they are committed past and never delivered
  again. Any other exception while dispatching a record is counted (``reader_errors``) and
  dead-lettered the same way: one record never stops its group's fetch. If the dead letter
  cannot be written (``dead_letter_failures``), the offset stays uncommitted and the record
  comes again after a restart or rebalance. A null header value counts as an absent header.
  Deliveries carry the record's headers in ``extra["headers"]``.
- **Drain**: ``close()`` stops fetching, lets queued messages reach the handlers (up to
  ``timeout``), commits the acked offsets, and leaves the groups.
- **Limits**: ``max_payload`` is 1 MiB by default (Kafka's ``message.max.bytes``).
- **Latency**: a fetch waits up to ``fetch_max_wait_ms`` (100) for data on a subscription and
  ``reply_fetch_max_wait_ms`` (10) on this client's reply inbox. A real broker answers a fetch
  as soon as data arrives, so these only set how often an idle consumer asks; the mock
  answers when the wait expires, so on the mock they are the per-hop latency.

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
- A partition keeps at most 5 MiB of records (and 100,000 batches); older ones are dropped,
  so a consumer further behind loses them (aiokafka resets to the earliest offset), as with
  retention on a real broker. Load tests keep each partition's backlog below that.
- No persistence across a broker restart, no replication, no ACLs, no transactions tested.
"""

from __future__ import annotations

from agent_os.bus_adapters.kafka._config import (
    INSTALL_HINT,
    SUBJECT_HEADER,
    KafkaConfig,
    aiokafka_module,
    dead_letter_topic,
    topic_for,
    topic_regex,
)

aiokafka_module()  # fail at import, with the install hint, not at connect

from agent_os.bus_adapters.kafka._broker import KafkaBroker  # noqa: E402
from agent_os.bus_adapters.kafka._group import KafkaDelivery  # noqa: E402

__all__ = [
    "INSTALL_HINT",
    "SUBJECT_HEADER",
    "KafkaBroker",
    "KafkaConfig",
    "KafkaDelivery",
    "dead_letter_topic",
    "topic_for",
    "topic_regex",
]
