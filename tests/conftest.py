"""Fixtures shared by every folder of the suite. Those that start something close it after the
test, whether it passed or failed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.closing import Closing
from tests.support.kafka import MockKafkaCluster, broker_url

if TYPE_CHECKING:
    from tests.support.tracing import MemorySpans


@pytest.fixture
async def closing() -> AsyncIterator[Closing]:
    """``closing(thing)`` returns ``thing`` and closes it after the test, passed or failed,
    newest first (``tests/support/closing.py``)."""
    async with contextlib.AsyncExitStack() as stack:
        yield Closing(stack)


@pytest.fixture
def kafka_cluster() -> Iterator[MockKafkaCluster]:
    """A librdkafka mock cluster of the test's own, with one broker (a test may take it down)."""
    with MockKafkaCluster(brokers=1) as cluster:
        yield cluster


@pytest.fixture
def kafka_url(kafka_cluster: MockKafkaCluster) -> str:
    """The Kafka adapter's URL for ``kafka_cluster``, with the test group timings."""
    return broker_url(kafka_cluster)


@pytest.fixture
def spans() -> Iterator[MemorySpans]:
    """Tracing on for the test, with spans kept in memory; off again after it
    (``tests/support/tracing.py``). Clients trace when they connect inside the test."""
    from tests.support.tracing import traced

    with traced() as memory:
        yield memory
