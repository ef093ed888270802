"""Fixtures of the integration tests (real servers, the Kafka mock, service processes)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.support.cleanup import delete_redis_keys
from tests.support.servers import REDIS_URL


@pytest.fixture
def prefix() -> str:
    """A prefix unique to the test for its subjects and keys, so that tests sharing a server
    never see each other's."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_keys(prefix: str) -> AsyncIterator[None]:
    """After the test, deletes every Redis key whose name starts with the test's ``prefix``."""
    yield
    await delete_redis_keys(REDIS_URL, key_prefix=prefix)


@pytest.fixture
async def redis_subjects(prefix: str) -> AsyncIterator[None]:
    """After the test, deletes what the Redis adapter keeps for subjects under ``prefix``
    (streams, consumer groups, registry entries)."""
    yield
    await delete_redis_keys(REDIS_URL, subject_prefix=prefix)
