"""The brokers the conformance suite runs against, and how to reach each.

Each entry names the adapter's entry point, the pytest marker that selects it, and how to build
a connection string (given the test's fixture request, so a target can use a fixture such as a
mock cluster). Tests isolate themselves from each other with unique subject prefixes.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class BrokerTarget:
    name: str
    marker: str | None
    url: Callable[[pytest.FixtureRequest], str]


def _memory_url(request: pytest.FixtureRequest) -> str:
    # A fresh in-process server per test: nothing leaks between tests.
    return f"memory://conformance-{uuid.uuid4().hex}"


def _nats_url(request: pytest.FixtureRequest) -> str:
    return "nats://127.0.0.1:4222"


def _redis_url(request: pytest.FixtureRequest) -> str:
    return "redis://127.0.0.1:6379/0"


def _kafka_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("kafka_bootstrap"))


_ALL = [
    BrokerTarget("memory", None, _memory_url),
    BrokerTarget("nats", "nats", _nats_url),
    BrokerTarget("redis", "redis", _redis_url),
    BrokerTarget("kafka", "kafka", _kafka_url),
]

# Adapters still being written are left out until their module exists.
TARGETS = [t for t in _ALL if importlib.util.find_spec(f"bus_adapters.{t.name}") is not None]
