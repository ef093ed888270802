"""Options of the Kafka adapter and the mapping from subjects to topics."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final
from urllib.parse import parse_qsl, urlparse

from agent_os.amb.errors import ConfigError
from agent_os.amb.numbers import seconds, whole
from agent_os.amb.subjects import INBOX_ROOT, is_wildcard

SUBJECT_HEADER: Final = "amb-subject"
PUBLISHED_HEADER: Final = "amb-published-ns"
_INBOX_TOKEN: Final = INBOX_ROOT.rstrip(".")  # the first token of every reply subject
DEAD_LETTER_ROOT: Final = "_DEAD"
DEAD_HEADER_PREFIX: Final = "amb-dead-"
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
INSTALL_HINT: Final = "the kafka broker needs aiokafka: pip install 'agent-os[kafka]'"
BAD_TOPIC_CHAR: Final = re.compile(r"[^A-Za-z0-9._-]")
_MAX_TOPIC_LEN: Final = 249


def aiokafka_module() -> Any:
    """The aiokafka module, or ImportError naming the extra to install."""
    try:
        import aiokafka
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(INSTALL_HINT) from exc
    return aiokafka


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """Options of :class:`~agent_os.bus_adapters.kafka.KafkaBroker` (keyword arguments or URL query).

    ``confirm_publish``: each ``publish()`` waits for the broker's acknowledgement (otherwise
    publishes are pipelined; see ``docs/bus.md``). ``fetch_max_wait_ms`` is how long a
    fetch waits for data on subscriptions, ``reply_fetch_max_wait_ms`` the same for this
    client's reply inbox (short: request/reply latency).
    """

    client_id: str | None = None
    partitions: int = 4
    replication_factor: int = 1
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    metadata_max_age_ms: int = 5_000
    request_timeout_ms: int = 30_000
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_pending: int = 1024
    subscribe_timeout: float = 30.0
    confirm_publish: bool = False
    linger_ms: int = 0
    fetch_max_wait_ms: int = 100
    reply_fetch_max_wait_ms: int = 10


def parse_options(connection_string: str | None, options: Mapping[str, Any]) -> tuple[str, KafkaConfig]:
    """The bootstrap servers and config from a ``kafka://`` URL and keyword options.

    Raises ConfigError for a bad URL, an unknown option or an out-of-range value.
    """
    url = urlparse(connection_string or "kafka://127.0.0.1:9092")
    if url.scheme not in ("kafka", ""):
        raise ConfigError(f"kafka broker URL must look like kafka://host:port, got {connection_string!r}")
    bootstrap = url.netloc if url.scheme else url.path
    if not bootstrap:
        raise ConfigError(f"no bootstrap servers in {connection_string!r}")
    types = {f.name: f.type for f in fields(KafkaConfig)}
    merged: dict[str, Any] = {}
    for key, value in [*parse_qsl(url.query), *options.items()]:
        if key not in types:
            raise ConfigError(f"unknown kafka broker option {key!r}")
        kind = types[key]
        try:
            if isinstance(value, str) and kind in ("int", int):
                value = int(value)
            elif isinstance(value, str) and kind in ("float", float):
                value = float(value)
        except ValueError:
            raise ConfigError(f"kafka broker option {key} must be a number, got {value[:40]!r}") from None
        if isinstance(value, str) and kind in ("bool", bool):
            word = value.lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"kafka broker option {key} must be true or false, got {value[:40]!r}")
            value = word in ("1", "true", "yes", "on")
        merged[key] = value
    config = replace(KafkaConfig(), **merged)
    for name in ("partitions", "replication_factor", "max_pending", "max_payload"):
        whole(getattr(config, name), name)
    for name in ("session_timeout_ms", "heartbeat_interval_ms", "metadata_max_age_ms", "request_timeout_ms"):
        whole(getattr(config, name), name)
    for name in ("linger_ms", "fetch_max_wait_ms", "reply_fetch_max_wait_ms"):
        whole(getattr(config, name), name, minimum=0)
    seconds(config.subscribe_timeout, "subscribe_timeout")
    return bootstrap, config


def topic_for(subject: str) -> str:
    """The topic a subject is published to (deterministic; reply subjects share one topic)."""
    if subject.startswith(INBOX_ROOT) and subject.count(".") > 1:
        # A reply subject, new for each request: its inbox's topic, so that the cache below
        # keeps inboxes, not every reply subject (which would push topics out of it).
        return _topic_for(".".join(subject.split(".", 2)[:2]))
    return _topic_for(subject)


@functools.lru_cache(maxsize=8192)
def _topic_for(subject: str) -> str:
    tokens = subject.split(".")
    topic = ".".join(BAD_TOPIC_CHAR.sub(lambda m: f"_x{ord(m.group()):02x}_", t) for t in tokens)
    if len(topic) > _MAX_TOPIC_LEN:
        raise ConfigError(f"subject {subject!r} maps to a topic longer than {_MAX_TOPIC_LEN} characters")
    return topic


def dead_letter_topic(topic: str) -> str:
    """The topic records of ``topic`` that cannot be delivered are moved to: ``_DEAD.<topic>``
    (shortened with a hash of ``topic`` where that would be too long for Kafka)."""
    dead = f"{DEAD_LETTER_ROOT}.{topic}"
    if len(dead) > _MAX_TOPIC_LEN:
        digest = hashlib.sha256(topic.encode()).hexdigest()[:16]
        dead = f"{dead[: _MAX_TOPIC_LEN - len(digest) - 1].rstrip('.')}.{digest}"
    return dead


def inbox_topic(pattern: str) -> str | None:
    """The reply topic a pattern under ``_INBOX.<client>.`` reads, or None for other patterns."""
    tokens = pattern.split(".")
    if tokens[0] == _INBOX_TOKEN and len(tokens) > 2 and not is_wildcard(tokens[1]):
        return topic_for(f"{tokens[0]}.{tokens[1]}")
    return None


def topic_regex(pattern: str) -> str:
    """The topic regex of a wildcard pattern: ``*`` -> ``[^.]+``, ``>`` -> ``.+``."""
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(topic_for(tok)))
    return "^" + r"\.".join(parts) + "$"
