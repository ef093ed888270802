"""JetStream set-up: the stream that captures a pattern and the durable consumer on it,
both created idempotently (several clients may race to create them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent_os.amb.errors import ConfigError, TransportError
from agent_os.bus_adapters.nats._config import NatsConfig, covers, stream_name
from agent_os.bus_adapters.nats._errors import translated

if TYPE_CHECKING:
    from nats.js.manager import JetStreamManager

_ERR_SUBJECTS_OVERLAP: Final = 10065


async def stream_for(jsm: JetStreamManager, config: NatsConfig, pattern: str) -> tuple[str, list[str]]:
    """The stream capturing ``pattern`` and its subjects: an existing one covering it, or a new one.

    Raises ConfigError when an existing stream overlaps ``pattern`` without covering it.
    """
    import nats.js.api as api
    import nats.js.errors as je

    for _ in range(3):
        with translated(f"finding the stream for {pattern!r}"):
            try:
                name: str | None = await jsm.find_stream_name_by_subject(pattern)
            except je.NotFoundError:
                name = None
            if name is not None:
                subjects = (await jsm.stream_info(name)).config.subjects or []
                if not any(covers(s, pattern) for s in subjects):
                    raise ConfigError(
                        f"stream {name!r} captures {subjects} which overlap {pattern!r} without "
                        "covering it: subscribe durably to a pattern inside one stream"
                    )
                return name, subjects
            name = stream_name(pattern)
            stream = api.StreamConfig(
                name=name,
                subjects=[pattern],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                max_age=config.stream_max_age,
            )
            try:
                await jsm.add_stream(stream)
            except je.BadRequestError as exc:
                if exc.err_code == _ERR_SUBJECTS_OVERLAP:
                    continue  # another client created an overlapping stream meanwhile: look again
                raise
            return name, [pattern]
    raise TransportError(f"no stream could be found or created for {pattern!r}")


async def ensure_consumer(
    jsm: JetStreamManager, config: NatsConfig, stream: str, durable: str, pattern: str
) -> None:
    """Create the durable pull consumer ``durable`` on ``stream`` unless it exists (for ``pattern``).

    Raises ConfigError when it exists for another pattern.
    """
    import nats.js.api as api
    import nats.js.errors as je

    with translated(f"creating durable consumer {durable!r}"):
        try:
            info = await jsm.consumer_info(stream, durable)
        except je.NotFoundError:
            info = None
        if info is not None:
            existing = info.config.filter_subject
            if existing and existing != pattern:
                raise ConfigError(f"durable {durable!r} already consumes {existing!r}, not {pattern!r}")
            return
        await jsm.add_consumer(
            stream,
            api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.NEW,
                filter_subject=pattern,
                max_deliver=config.max_deliver,
                ack_wait=config.ack_wait,
            ),
        )
