"""Every exception class of nats-py, redis-py and aiokafka goes through its adapter's translator
to a specific bus error: none escapes untranslated, and the most specific mapping wins."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import pytest

from agent_os.amb.errors import (
    BrokerUnavailable,
    BusError,
    ConfigError,
    StateError,
    Translator,
    TransportError,
)

LEAVES = (BrokerUnavailable, TransportError, ConfigError, StateError)


def _error_classes(*modules: ModuleType) -> dict[str, type[BaseException]]:
    """The exception classes a client library defines in ``modules`` (not the builtins it
    re-exports), by the names the modules give them (aliases included)."""
    root = modules[0].__name__.split(".")[0]
    return {
        name: cls
        for module in modules
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__.split(".")[0] == root
    }


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls``: some constructors need arguments the library would pass."""
    for args in ((), ("synthetic 1 127.0.0.1:1",), ("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d")):
        try:
            exc = cls(*args)
            str(exc)
            return exc
        except Exception:
            continue
    exc = cls.__new__(cls)
    Exception.__init__(exc, "synthetic")
    return exc


def _check_all(
    translate: Translator, classes: dict[str, type[BaseException]], expected: Mapping[str, type[BusError]]
) -> None:
    assert len(classes) > 20, "the walk found the library's exception classes"
    assert set(expected) <= set(classes), f"expected classes missing: {set(expected) - set(classes)}"
    for name, cls in classes.items():
        error = translate(_instance(cls), "do it")
        assert error is not None, f"{cls.__module__}.{name} escapes untranslated"
        assert type(error) in LEAVES, f"{name} -> {type(error).__name__}"
        want = expected.get(name)
        if want is not None:
            assert type(error) is want, f"{name} -> {type(error).__name__}, not {want.__name__}"
        assert "do it" in str(error)


def _check_context_manager(translated: Any, exc: BaseException, want: type[BusError]) -> None:
    with pytest.raises(want) as info, translated("do it"):
        raise exc
    assert info.value.__cause__ is exc, "the original error is chained"


def test_nats_errors() -> None:
    import nats.errors as ne
    import nats.js.errors as je

    from agent_os.bus_adapters.nats._errors import translate, translated

    expected = {
        "BadSubjectError": ConfigError,
        "MaxPayloadError": ConfigError,
        "BadTimeoutError": ConfigError,
        "MsgAlreadyAckdError": StateError,
        "NoServersError": BrokerUnavailable,
        "ConnectionClosedError": BrokerUnavailable,
        "ConnectionReconnectingError": BrokerUnavailable,
        "StaleConnectionError": BrokerUnavailable,
        "OutboundBufferLimitError": BrokerUnavailable,
        "AuthorizationError": BrokerUnavailable,
        "NoStreamResponseError": BrokerUnavailable,
        "ServiceUnavailableError": BrokerUnavailable,
        "TimeoutError": BrokerUnavailable,
        "NoRespondersError": TransportError,
        "SlowConsumerError": TransportError,
        "APIError": TransportError,
        "NotFoundError": TransportError,
    }
    _check_all(translate, _error_classes(ne, je), expected)
    _check_context_manager(translated, ne.NoServersError(), BrokerUnavailable)
    _check_context_manager(translated, ConnectionRefusedError(111, "refused"), BrokerUnavailable)
    assert translate(ValueError("ours"), "do it") is None, "errors that are not nats-py's pass through"


def test_redis_errors() -> None:
    import redis.exceptions as rexc

    from agent_os.bus_adapters.redis._errors import translate, translated

    expected = {
        "AuthenticationError": TransportError,  # a ConnectionError, but retrying will not help
        "AuthorizationError": TransportError,
        "NoPermissionError": TransportError,
        "ConnectionError": BrokerUnavailable,
        "TimeoutError": BrokerUnavailable,
        "BusyLoadingError": BrokerUnavailable,
        "ReadOnlyError": BrokerUnavailable,
        "ClusterDownError": BrokerUnavailable,
        "MasterDownError": BrokerUnavailable,
        "TryAgainError": BrokerUnavailable,
        "SlotNotCoveredError": BrokerUnavailable,
        "DataError": ConfigError,
        "ResponseError": TransportError,
        "NoScriptError": TransportError,
        "PubSubError": TransportError,
        "RedisClusterException": TransportError,
        "RedisError": TransportError,
    }
    _check_all(translate, _error_classes(rexc), expected)
    _check_context_manager(translated, rexc.ConnectionError("gone"), BrokerUnavailable)
    _check_context_manager(translated, rexc.ResponseError("WRONGTYPE"), TransportError)
    assert translate(KeyError("ours"), "do it") is None


def test_kafka_errors() -> None:
    import aiokafka.errors as kerr

    from agent_os.bus_adapters.kafka._errors import translate, translated

    expected = {
        "KafkaConnectionError": BrokerUnavailable,
        "NodeNotReadyError": BrokerUnavailable,
        "NoBrokersAvailable": BrokerUnavailable,
        "KafkaTimeoutError": BrokerUnavailable,
        "RequestTimedOutError": BrokerUnavailable,
        "LeaderNotAvailableError": BrokerUnavailable,
        "NotLeaderForPartitionError": BrokerUnavailable,
        "CoordinatorNotAvailableError": BrokerUnavailable,
        "MessageSizeTooLargeError": ConfigError,
        "RecordTooLargeError": ConfigError,
        "InvalidTopicError": ConfigError,
        "ConsumerStoppedError": StateError,
        "IllegalOperation": StateError,
        "ProducerClosed": StateError,
        "TopicAuthorizationFailedError": TransportError,
        "UnknownTopicOrPartitionError": TransportError,
        "CorruptRecordException": TransportError,
        "KafkaError": TransportError,
    }
    _check_all(translate, _error_classes(kerr), expected)
    _check_context_manager(translated, kerr.KafkaConnectionError("gone"), BrokerUnavailable)
    _check_context_manager(translated, kerr.TopicAuthorizationFailedError(), TransportError)
    assert translate(ValueError("ours"), "do it") is None


def test_bus_errors_pass_through_untouched() -> None:
    from agent_os.bus_adapters.nats._errors import translated

    original = ConfigError("already a bus error")
    with pytest.raises(ConfigError) as info, translated("do it"):
        raise original
    assert info.value is original
