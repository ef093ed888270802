"""The conformance suite's fixtures: every test runs once per broker target."""

from __future__ import annotations

from tests.support.brokers import amb_factory, kafka_bootstrap, subject, target

__all__ = ["amb_factory", "kafka_bootstrap", "subject", "target"]
