"""The Kafka broker adapter (aiokafka): ``KafkaBroker("kafka://host:9092,host2:9092")``.

Subjects map to topics, queue groups and durables to consumer groups, delivery is at least once;
the mapping, guarantees and options are in ``docs/bus.md`` ("kafka").
"""

from __future__ import annotations

from agent_os.bus_adapters.kafka._config import (
    INSTALL_HINT,
    SUBJECT_HEADER,
    KafkaConfig,
    aiokafka_module,
    dead_letter_topic,
    topic_for,
    topic_regex,
)

aiokafka_module()  # fail at import, with the install hint, not at connect

from agent_os.bus_adapters.kafka._broker import KafkaBroker  # noqa: E402
from agent_os.bus_adapters.kafka._group import KafkaDelivery  # noqa: E402

__all__ = [
    "INSTALL_HINT",
    "SUBJECT_HEADER",
    "KafkaBroker",
    "KafkaConfig",
    "KafkaDelivery",
    "dead_letter_topic",
    "topic_for",
    "topic_regex",
]
