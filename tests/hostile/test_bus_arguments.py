"""Hostile arguments to the bus's API: a publish whose envelope every receiver would refuse
(a priority of False or 1.5, a recipient of 5, headers holding an int), and numbers that a
plain comparison lets through (NaN, infinities, bools, strings, integers of thousands of
digits). Each is refused with a ConfigError naming the argument, before anything reaches the
broker; the client goes on working."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from agent_os.amb import AMB, ConfigError, Metadata
from agent_os.amb.numbers import seconds, whole
from agent_os.amb.subscription import SubscriptionOptions
from agent_os.bus_adapters.kafka._config import parse_options
from agent_os.bus_adapters.memory import memory_server
from agent_os.bus_adapters.nats._config import NatsConfig
from agent_os.bus_adapters.redis import RedisBroker
from tests.support import Collector, memory_url
from tests.support.closing import Closing


class _Unreadable(Mapping[str, str]):
    """Headers that claim a key and fail to give it."""

    def __getitem__(self, key: str) -> str:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1


class Text(str):
    """A str subclass msgspec does not encode: the bus sends its text."""


class Number(int):
    """An int subclass likewise."""


class Level(enum.IntEnum):
    HIGH = 9


class Name(enum.StrEnum):
    WORKER = "worker-1"


HUGE = 10**5000  # str() of it raises ValueError: no message may print it
BAD_TIMES: dict[str, object] = {
    "NaN": math.nan,
    "infinity": math.inf,
    "minus infinity": -math.inf,
    "negative": -1.0,
    "bool": True,
    "text": "5",
    "None in a list": [None],
    "huge int": HUGE,
    "beyond any clock": 1e300,
}
BAD_COUNTS: dict[str, object] = {"zero": 0, "float": 1.5, "NaN": math.nan, "bool": True, "text": "2"}

BAD_PUBLISH: dict[str, dict[str, Any]] = {
    "priority False": {"priority": False},
    "priority 0.0": {"priority": 0.0},
    "priority 1.5": {"priority": 1.5},
    "priority NaN": {"priority": math.nan},
    "priority past 64 bits": {"priority": 2**64},
    "priority below 64 bits": {"priority": -(2**63) - 1},
    "priority huge": {"priority": HUGE},
    "recipient int": {"recipient": 5},
    "correlation_id bytes": {"correlation_id": b"x"},
    "sender_id int": {"sender_id": 5},
    "header value int": {"headers": {"a": 1}},
    "header key int": {"headers": {1: "a"}},
    "headers not a mapping": {"headers": 5},
    "headers a bad list": {"headers": ["ab", "c"]},
    "headers falsy but not a mapping": {"headers": 0},
    "headers that fail when read": {"headers": _Unreadable()},
    "headers of bools": {"headers": {"a": True}},
    "topic a list": {"topic": ["t", "x"]},
    "reply_to a list": {"reply_to": ["a"]},
    "reply_to falsy but not a string": {"reply_to": 0},
    "key int": {"key": 5},
    **{f"ttl {name}": {"ttl": value} for name, value in BAD_TIMES.items()},
    "ttl past the wire's range": {"ttl": 1e12},
}


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
async def test_a_publish_receivers_would_refuse_is_refused_before_the_broker(
    serializer: str, closing: Closing
) -> None:
    url = memory_url("args")
    sub = closing(AMB("memory", url, agent_id="sub"))
    pub = closing(AMB("memory", url, serializer=serializer, agent_id="pub"))
    got = Collector()
    await sub.subscribe("t.x", got)
    await pub.connect()
    server = memory_server(pub.broker.server_name)  # type: ignore[attr-defined]
    assert server is not None
    for name, kwargs in BAD_PUBLISH.items():
        kwargs = dict(kwargs)  # the table is shared by both serializers
        topic = kwargs.pop("topic", "t.x")
        with pytest.raises(ConfigError) as info:
            await pub.publish(topic, "m", **kwargs)
        argument = next(iter(kwargs), "topic").replace("_id", "")
        assert argument.split("_")[0] in str(info.value), (name, str(info.value))
    assert server.stats.published == 0  # nothing reached the broker
    # What receivers accept still goes: subclasses of int and str, the ends of the range.
    await pub.publish("t.x", 1, priority=Level.HIGH, recipient=Name.WORKER, headers={"h": Name.WORKER})
    await pub.publish("t.x", 2, priority=2**64 - 1, ttl=60, key="k", correlation_id="c", sender_id="s")
    await pub.publish("t.x", 3, priority=-(2**63), ttl=1)
    # Other number types for times, str and int subclasses that msgspec would not encode:
    # taken as their values.
    await pub.publish(Text("t.x"), 4, ttl=np.float32(5), sender_id=Text("s"), priority=Number(4))  # type: ignore[arg-type]
    await pub.publish("t.x", 5, ttl=Fraction(5), headers={Text("h"): Text("v")}, key=Text("k"))  # type: ignore[arg-type]
    await pub.publish("t.x", 6, ttl=np.int64(5), recipient=Text("r"), correlation_id=Text("c"))  # type: ignore[arg-type]
    await got.wait_for(6)
    assert got.messages == [1, 2, 3, 4, 5, 6]
    assert [m.priority for m in got.metadata] == [9, 2**64 - 1, -(2**63), 4, 0, 0]
    assert (got.metadata[3].sender, got.metadata[5].recipient, got.metadata[5].correlation_id) == (
        "s",
        "r",
        "c",
    )
    assert got.metadata[4].headers["h"] == "v"
    assert got.metadata[0].recipient == "worker-1"
    assert got.metadata[0].headers["h"] == "worker-1"


@pytest.mark.parametrize("timeout", BAD_TIMES.values(), ids=list(BAD_TIMES))
async def test_a_request_with_a_bad_timeout_is_refused_and_leaves_nothing_pending(
    timeout: object, closing: Closing
) -> None:
    client = closing(AMB("memory", memory_url("args")))
    await client.connect()
    with pytest.raises(ConfigError, match="timeout"):
        await client.request("t.x", "q", timeout=timeout)  # type: ignore[arg-type]
    assert client.stats.requests == 0
    assert len(client._requests) == 0


async def test_close_with_a_bad_timeout_is_refused_and_the_client_stays_usable(closing: Closing) -> None:
    client = closing(AMB("memory", memory_url("args")))
    got = Collector()
    await client.subscribe("t.x", got)
    for timeout in (math.nan, -1, "1", math.inf):
        with pytest.raises(ConfigError, match="timeout"):
            await client.close(timeout=timeout)  # type: ignore[arg-type]
    await client.publish("t.x", "still open")
    await got.wait_for(1)
    await client.close(timeout=0)


def test_an_agent_id_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="agent_id"):
        AMB("memory", memory_url("args"), agent_id=5)  # type: ignore[arg-type]


async def test_other_number_types_are_taken_for_times_and_counts(closing: Closing) -> None:
    url = memory_url("args")
    client = closing(AMB("memory", url))
    got = Collector()
    await client.subscribe("t.rr", got, concurrency=np.int64(2), max_attempts=np.int64(2))  # type: ignore[call-overload]
    async with AMB("memory", url) as responder:

        async def echo(message: object, metadata: Metadata) -> None:
            await responder.reply(metadata, message)

        await responder.subscribe("t.echo", echo)
        assert await client.request("t.echo", "q", timeout=np.float32(5)) == "q"  # type: ignore[arg-type]
        assert await client.request("t.echo", "q", timeout=Fraction(5, 2)) == "q"  # type: ignore[arg-type]
    await client.publish("t.rr", "m")
    await got.wait_for(1)
    await client.close(timeout=np.int64(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", [["t", "x"], 5, None], ids=repr)
async def test_a_pattern_that_is_not_a_string_is_refused(pattern: object, closing: Closing) -> None:
    client = closing(AMB("memory", memory_url("args")))
    with pytest.raises(ConfigError, match="pattern must be a non-empty string"):
        await client.subscribe(pattern, Collector())  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="pattern must be a non-empty string"):
        client.stream(pattern)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", BAD_COUNTS.values(), ids=list(BAD_COUNTS))
async def test_bounds_of_queues_are_whole_numbers(value: object, closing: Closing) -> None:
    client = closing(AMB("memory", memory_url("args")))
    with pytest.raises(ConfigError, match="buffer"):
        client.stream("t.x", buffer=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_pending"):
        AMB("memory", memory_url("args"), broker_options={"max_pending": value})


@pytest.mark.parametrize("field", ["concurrency", "max_attempts"])
@pytest.mark.parametrize("value", BAD_COUNTS.values(), ids=list(BAD_COUNTS))
def test_subscription_counts_are_whole_numbers(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SubscriptionOptions(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5, "0.1", None], ids=repr)
def test_a_retry_delay_is_a_finite_number_of_seconds(value: object) -> None:
    with pytest.raises(ConfigError, match="retry_delay"):
        SubscriptionOptions(retry_delay=value)  # type: ignore[arg-type]
    assert SubscriptionOptions(retry_delay=0).retry_delay == 0


@pytest.mark.parametrize("field", ["connect_timeout", "ack_wait", "pull_expires", "stream_max_age"])
@pytest.mark.parametrize("value", BAD_TIMES.values(), ids=list(BAD_TIMES))
def test_nats_times(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        NatsConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_pending", "pull_batch", "publish_window"])
@pytest.mark.parametrize("value", BAD_COUNTS.values(), ids=list(BAD_COUNTS))
def test_nats_counts(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        NatsConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["claim_min_idle", "queue_lease", "block", "durable_ttl"])
@pytest.mark.parametrize("value", BAD_TIMES.values(), ids=list(BAD_TIMES))
def test_redis_times(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        RedisBroker("redis://127.0.0.1:6379/0", **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_pending", "read_batch", "max_connections"])
@pytest.mark.parametrize("value", BAD_COUNTS.values(), ids=list(BAD_COUNTS))
def test_redis_counts(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        RedisBroker("redis://127.0.0.1:6379/0", **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "query",
    [
        "subscribe_timeout=nan",
        "subscribe_timeout=inf",
        "subscribe_timeout=-1",
        "subscribe_timeout=abc",
        "partitions=0",
        "partitions=x",
        "max_pending=" + "9" * 5000,
        "linger_ms=-1",
        "session_timeout_ms=0",
    ],
)
def test_kafka_options_in_the_url(query: str) -> None:
    name = query.partition("=")[0]
    with pytest.raises(ConfigError, match=name):
        parse_options(f"kafka://127.0.0.1:9092?{query}", {})


def test_the_checks_accept_what_they_should_and_name_the_rest() -> None:
    assert seconds(1, "t") == 1.0
    assert seconds(0.25, "t") == 0.25
    assert seconds(0, "t", zero=True) == 0.0
    assert whole(3, "n") == 3
    assert whole(0, "n", minimum=0) == 0
    with pytest.raises(ConfigError, match="an integer of 16610 bits"):
        seconds(HUGE, "t")
    with pytest.raises(ConfigError, match="an integer of 16610 bits"):
        whole(-HUGE, "n")
    with pytest.raises(ConfigError, match="positive"):
        seconds(0, "t")
