"""The brokers the conformance suite runs against, and how to reach each.

Each entry names the adapter's entry point, the pytest marker that selects it, and how to build
a connection string that isolates one test from the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BrokerTarget:
    name: str
    marker: str | None
    url: Callable[[], str]


def _memory_url() -> str:
    # A fresh in-process server per test: nothing leaks between tests.
    return f"memory://conformance-{uuid.uuid4().hex}"


TARGETS: list[BrokerTarget] = [
    BrokerTarget("memory", None, _memory_url),
]
