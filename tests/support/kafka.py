"""The librdkafka mock cluster, started in-process for the Kafka tests.

confluent-kafka bundles librdkafka, which contains a Kafka-protocol mock cluster (produce, fetch,
metadata, consumer groups, offset commits). confluent-kafka's Python API only starts it through
the ``test.mock.num.brokers`` property, which gives no handle on the cluster; we drive the C API
through ctypes instead, so we can set the group's initial rebalance delay (3 s by default, which
would make every consumer-group join in the suite take 3 s).

Usage::

    with MockKafkaCluster(brokers=1) as cluster:
        bootstrap = cluster.bootstrap_servers  # "127.0.0.1:PORT"
        cluster.set_broker_down(1)  # fault injection: refuse connections, keep the log
        cluster.set_broker_up(1)
"""

from __future__ import annotations

import ctypes
import glob
import os
from types import TracebackType

_RD_KAFKA_PRODUCER = 0

# Group timings for tests, as KafkaBroker URL options. The mock rebalances a running group after
# ``session_timeout_ms - 1000`` ms, so a short session timeout keeps rejoins quick. A real broker
# must allow it: deploy/docker-compose.yml sets group.min.session.timeout.ms to 1000.
TEST_GROUP_OPTIONS = "session_timeout_ms=1500&heartbeat_interval_ms=100&metadata_max_age_ms=200"

# Set to a real broker's bootstrap servers (``127.0.0.1:9092``) to run the Kafka conformance
# tests against it instead of the mock; a full ``kafka://...`` URL is used as it is.
REAL_KAFKA_ENV = "AGENT_OS_KAFKA_BOOTSTRAP"


# Partitions the mock cluster gives a topic it auto-creates (it does not offer CreateTopics).
MOCK_PARTITIONS = 4


def broker_url(cluster: MockKafkaCluster, **options: int) -> str:
    """The Kafka adapter's URL for ``cluster``, with the test group timings and ``options`` (URL
    options of ``KafkaBroker``, such as ``request_timeout_ms``)."""
    query = "&".join([TEST_GROUP_OPTIONS, *(f"{k}={v}" for k, v in options.items())])
    return f"kafka://{cluster.bootstrap_servers}?{query}"


def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: int = MOCK_PARTITIONS
) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (0 where nothing is committed),
    read with librdkafka's OffsetFetch: a second client, independent of the adapter under test.
    Blocking: call it through ``asyncio.to_thread`` from a test's event loop."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: max(tp.offset, 0) for tp in parts}


def _load_librdkafka() -> ctypes.CDLL:
    import confluent_kafka  # the wheel's bundled librdkafka lives beside the package

    site = os.path.dirname(os.path.dirname(confluent_kafka.__file__))
    candidates = sorted(glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka*.so*")))
    if not candidates:
        raise RuntimeError("librdkafka not found in the confluent-kafka wheel")
    lib = ctypes.CDLL(candidates[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_conf_set.restype = ctypes.c_int
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
    lib.rd_kafka_mock_set_controller_id.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    for updown in (lib.rd_kafka_mock_broker_set_down, lib.rd_kafka_mock_broker_set_up):
        updown.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        updown.restype = ctypes.c_int
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int16,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.rd_kafka_mock_push_request_errors_array.restype = None
    lib.rd_kafka_mock_clear_request_errors.argtypes = [ctypes.c_void_p, ctypes.c_int16]
    lib.rd_kafka_mock_clear_request_errors.restype = None
    return lib


class MockKafkaCluster:
    """A librdkafka mock cluster with ``brokers`` brokers, listening on 127.0.0.1."""

    def __init__(self, brokers: int = 1, *, initial_rebalance_delay_ms: int = 0) -> None:
        self._lib = _load_librdkafka()
        errstr = ctypes.create_string_buffer(512)
        conf = self._lib.rd_kafka_conf_new()
        # The handle that owns the cluster never talks to it; keep its own logging quiet.
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr))
        self._rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not self._rk:
            raise RuntimeError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._cluster:
            self._lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._cluster, initial_rebalance_delay_ms)
        # Metadata responses otherwise name no controller, and admin clients (CreateTopics) need one.
        self._lib.rd_kafka_mock_set_controller_id(self._cluster, 1)
        self.bootstrap_servers: str = self._lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def create_topic(self, name: str, partitions: int = 1, replication_factor: int = 1) -> None:
        err = self._lib.rd_kafka_mock_topic_create(
            self._cluster, name.encode(), partitions, replication_factor
        )
        if err:
            raise RuntimeError(f"mock topic create {name!r} failed: error {err}")

    def set_broker_down(self, broker_id: int = 1) -> None:
        """Close every connection to broker ``broker_id`` and refuse new ones (its port stays
        reserved; the log it holds is kept, as a restarted broker would keep it on disk)."""
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker_id), "set down")

    def set_broker_up(self, broker_id: int = 1) -> None:
        """Let broker ``broker_id`` accept connections again, on the same port."""
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker_id), "set up")

    def push_request_errors(self, api_key: int, *errors: int) -> None:
        """Answer the next ``len(errors)`` requests of ``api_key`` (0 = Produce, 1 = Fetch, 8 =
        OffsetCommit, ...) with these error codes, in order, on any broker. ``-195``
        (librdkafka's ``_TRANSPORT``) makes the broker drop the connection instead."""
        array = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(errors), array)

    def clear_request_errors(self, api_key: int) -> None:
        """Forget the errors still queued for ``api_key``."""
        self._lib.rd_kafka_mock_clear_request_errors(self._cluster, api_key)

    @staticmethod
    def _check(err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"mock broker {what} failed: error {err}")

    def close(self) -> None:
        if self._cluster:
            self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
            self._cluster = None
        if self._rk:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    def __enter__(self) -> MockKafkaCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
