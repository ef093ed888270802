"""Options of the NATS adapter, and the subject arithmetic its JetStream part needs."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from agent_os.amb.errors import ConfigError
from agent_os.amb.numbers import seconds, whole
from agent_os.amb.subjects import validate_pattern

INSTALL_HINT: Final = "the NATS broker needs nats-py: pip install 'agent-os[nats]'"
DEFAULT_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
NAME_OK: Final = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsConfig:
    """Options of :class:`~agent_os.bus_adapters.nats.NatsBroker` (times in seconds)."""

    name: str | None = None  # connection name shown by the server's monitoring
    connect_timeout: float = 5.0  # for the first connection; then it reconnects forever
    reconnect_wait: float = 0.1  # first reconnect delay, doubled per failed attempt...
    reconnect_wait_max: float = 2.0  # ...up to this
    max_pending: int = 4096  # per-subscription queue bound
    publish_timeout: float = 10.0  # a JetStream publish keeps being retried this long
    publish_window: int = 256  # JetStream publishes awaiting their ack before publish() waits
    confirm_publish: bool = False  # True: every publish waits for the server's confirmation
    stream_subjects: tuple[str, ...] = ()  # patterns to publish through JetStream with confirmation
    stream_max_age: float | None = None  # age limit of the streams this adapter creates
    max_deliver: int = 5  # JetStream deliveries of a message before the server gives up
    ack_wait: float = 30.0  # an unacked durable message is redelivered after this
    pull_batch: int = 128  # messages asked for per JetStream pull request
    pull_expires: float = 10.0  # lifetime of a pull request

    def __post_init__(self) -> None:
        times = ("connect_timeout", "reconnect_wait", "reconnect_wait_max", "publish_timeout", "ack_wait")
        for field in (*times, "pull_expires"):
            seconds(getattr(self, field), field)
        if self.reconnect_wait_max < self.reconnect_wait:
            raise ConfigError("reconnect_wait_max must be at least reconnect_wait")
        for field in ("max_pending", "pull_batch", "max_deliver", "publish_window"):
            whole(getattr(self, field), field)
        if self.pull_batch > self.max_pending:
            raise ConfigError("pull_batch must not exceed max_pending")
        if self.stream_max_age is not None:
            seconds(self.stream_max_age, "stream_max_age")
        for pattern in self.stream_subjects:
            validate_pattern(pattern)


def covers(outer: str, inner: str) -> bool:
    """True when every subject matching ``inner`` also matches ``outer`` (both patterns)."""
    o, i = outer.split("."), inner.split(".")
    for n, tok in enumerate(o):
        if tok == ">":
            return len(i) > n
        if n >= len(i) or i[n] == ">" or (tok != "*" and (tok != i[n] or i[n] == "*")):
            return False
    return len(o) == len(i)


def stream_name(pattern: str) -> str:
    """The name of the stream this adapter creates for ``pattern`` (readable part + hash)."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", pattern.replace("*", "S").replace(">", "G"))[:40]
    return f"AMB_{readable}_{hashlib.sha256(pattern.encode()).hexdigest()[:12]}"
