"""Fixtures shared by every folder of the suite. Those that start something close it after the
test, whether it passed or failed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kafka import MockKafkaCluster, broker_url


@pytest.fixture
def kafka_cluster() -> Iterator[MockKafkaCluster]:
    """A librdkafka mock cluster of the test's own, with one broker (a test may take it down)."""
    with MockKafkaCluster(brokers=1) as cluster:
        yield cluster


@pytest.fixture
def kafka_url(kafka_cluster: MockKafkaCluster) -> str:
    """The Kafka adapter's URL for ``kafka_cluster``, with the test group timings."""
    return broker_url(kafka_cluster)
