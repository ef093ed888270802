from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from agent_os.amb import AMB
from tests.conformance.brokers import TARGETS, BrokerTarget

AmbFactory = Callable[..., Awaitable[AMB]]


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
        for client in reversed(clients):
            await client.close(timeout=5)
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
    from tests.kafka_mock import REAL_KAFKA_ENV, TEST_GROUP_OPTIONS, MockKafkaCluster

    if real := os.environ.get(REAL_KAFKA_ENV):  # a real broker instead (README: Deployment)
        yield real if real.startswith("kafka://") else f"kafka://{real}?{TEST_GROUP_OPTIONS}"
        return
    with MockKafkaCluster(brokers=1) as cluster:
        yield f"kafka://{cluster.bootstrap_servers}?{TEST_GROUP_OPTIONS}"
