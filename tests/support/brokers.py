"""The brokers the conformance suite (and the bus soak tests) run against, and their fixtures.

Each target names the adapter's entry point, the pytest marker that selects it, how to build a
connection string (given the test's fixture request, so a target can use a fixture such as a
mock cluster), and how to delete what a test left on a shared server (durable streams, groups),
given the test's subject prefix. Tests isolate themselves from each other with unique subject
prefixes. A folder's ``conftest.py`` imports the fixtures below to offer them to its tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from agent_os.amb import AMB
from tests.support.cleanup import delete_nats_streams, delete_redis_keys
from tests.support.servers import NATS_URL, REDIS_URL

if TYPE_CHECKING:
    from agent_os.bus_adapters.redis import RedisBroker

AmbFactory = Callable[..., Awaitable[AMB]]


@dataclass(frozen=True)
class BrokerTarget:
    name: str
    marker: str | None
    url: Callable[[pytest.FixtureRequest], str]
    cleanup: Callable[[str], Awaitable[object]] | None = None  # given the test's subject prefix


def _memory_url(request: pytest.FixtureRequest) -> str:
    # A fresh in-process server per test: nothing leaks between tests.
    return f"memory://conformance-{uuid.uuid4().hex}"


def _nats_url(request: pytest.FixtureRequest) -> str:
    return NATS_URL


def _redis_url(request: pytest.FixtureRequest) -> str:
    return REDIS_URL


async def _nats_cleanup(prefix: str) -> None:
    await delete_nats_streams(prefix, NATS_URL)


async def _redis_cleanup(prefix: str) -> None:
    await delete_redis_keys(REDIS_URL, subject_prefix=prefix)


def _kafka_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("kafka_bootstrap"))


_ALL = [
    BrokerTarget("memory", None, _memory_url),
    BrokerTarget("nats", "nats", _nats_url, _nats_cleanup),
    BrokerTarget("redis", "redis", _redis_url, _redis_cleanup),
    BrokerTarget("kafka", "kafka", _kafka_url),  # the mock cluster lives and dies with the session
]

# Adapters still being written are left out until their module exists.
TARGETS = [t for t in _ALL if importlib.util.find_spec(f"agent_os.bus_adapters.{t.name}") is not None]


@pytest.fixture(
    params=[
        pytest.param(t, id=t.name, marks=[getattr(pytest.mark, t.marker)] if t.marker else [])
        for t in TARGETS
    ]
)
def target(request: pytest.FixtureRequest) -> BrokerTarget:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def subject() -> str:
    """A subject prefix unique to the test, so tests sharing a real server never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def amb_factory(
    target: BrokerTarget, subject: str, request: pytest.FixtureRequest
) -> AsyncIterator[AmbFactory]:
    """Creates connected clients that share one broker; after the test, closes them all and
    deletes what the test left on the server under its subject prefix (durable streams, groups)."""
    url = target.url(request)
    clients: list[AMB] = []

    async def make(**options: Any) -> AMB:
        client = AMB(backend=target.name, connection_string=url, **options)
        await client.connect()
        clients.append(client)
        return client

    try:
        yield make
    finally:
        try:
            for client in reversed(clients):
                await client.close(timeout=5)
        finally:
            if target.cleanup is not None:
                await target.cleanup(subject)


def requires(client: AMB, capability: str) -> None:
    """Skip, visibly and naming the adapter, when the broker lacks ``capability``."""
    if not getattr(client.capabilities, capability):
        pytest.skip(f"{client.broker.name} broker does not declare {capability}")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The librdkafka mock cluster for the kafka target, with group timings tuned for tests.

    The mock rebalances a running group after ``session_timeout_ms - 1000`` ms, so a short
    session timeout keeps wildcard subscriptions (which rejoin when a new topic appears) quick.
    """
    from tests.support.kafka import REAL_KAFKA_ENV, TEST_GROUP_OPTIONS, MockKafkaCluster

    if real := os.environ.get(REAL_KAFKA_ENV):  # a real broker instead (README: Deployment)
        yield real if real.startswith("kafka://") else f"kafka://{real}?{TEST_GROUP_OPTIONS}"
        return
    with MockKafkaCluster(brokers=1) as cluster:
        yield f"kafka://{cluster.bootstrap_servers}?{TEST_GROUP_OPTIONS}"


@contextlib.asynccontextmanager
async def redis_broker(prefix: str, **options: Any) -> AsyncIterator[RedisBroker]:
    """A connected RedisBroker on the test server whose keys start with ``amb-<prefix>:`` (its
    ``options`` besides), closed and its keys deleted afterwards, even when the test fails."""
    from agent_os.bus_adapters.redis import RedisBroker  # redis-py: only where a test needs it

    broker = RedisBroker(REDIS_URL, key_prefix=f"amb-{prefix}:", **options)
    await broker.connect()
    try:
        yield broker
    finally:
        try:
            await broker.close()
        finally:
            await delete_redis_keys(REDIS_URL, key_prefix=f"amb-{prefix}:")
