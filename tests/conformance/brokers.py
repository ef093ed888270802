"""The brokers the conformance suite runs against, and how to reach each.

Each entry names the adapter's entry point, the pytest marker that selects it, how to build
a connection string (given the test's fixture request, so a target can use a fixture such as a
mock cluster), and how to delete what a test left on a shared server (durable streams, groups),
given the test's subject prefix. Tests isolate themselves from each other with unique subject
prefixes.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from tests.conformance.cleanup import delete_nats_streams, delete_redis_keys


@dataclass(frozen=True)
class BrokerTarget:
    name: str
    marker: str | None
    url: Callable[[pytest.FixtureRequest], str]
    cleanup: Callable[[str], Awaitable[object]] | None = None  # given the test's subject prefix


def _memory_url(request: pytest.FixtureRequest) -> str:
    # A fresh in-process server per test: nothing leaks between tests.
    return f"memory://conformance-{uuid.uuid4().hex}"


_nats_url_value = "nats://127.0.0.1:4222"
_redis_url_value = "redis://127.0.0.1:6379/0"


def _nats_url(request: pytest.FixtureRequest) -> str:
    return _nats_url_value


def _redis_url(request: pytest.FixtureRequest) -> str:
    return _redis_url_value


async def _nats_cleanup(prefix: str) -> None:
    await delete_nats_streams(prefix, _nats_url_value)


async def _redis_cleanup(prefix: str) -> None:
    await delete_redis_keys(_redis_url_value, subject_prefix=prefix)


def _kafka_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("kafka_bootstrap"))


_ALL = [
    BrokerTarget("memory", None, _memory_url),
    BrokerTarget("nats", "nats", _nats_url, _nats_cleanup),
    BrokerTarget("redis", "redis", _redis_url, _redis_cleanup),
    BrokerTarget("kafka", "kafka", _kafka_url),  # the mock cluster lives and dies with the session
]

# Adapters still being written are left out until their module exists.
TARGETS = [t for t in _ALL if importlib.util.find_spec(f"bus_adapters.{t.name}") is not None]
