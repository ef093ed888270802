"""The broker targets of the conformance suite, for the bus soak tests."""

from __future__ import annotations

from tests.support.brokers import amb_factory, kafka_bootstrap, subject, target

__all__ = ["amb_factory", "kafka_bootstrap", "subject", "target"]
