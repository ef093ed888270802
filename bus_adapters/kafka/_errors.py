"""The one place where aiokafka errors become bus errors (the original is always chained)."""

from __future__ import annotations

import contextlib

from agent_os.amb.errors import (
    BrokerUnavailable,
    BusError,
    ConfigError,
    StateError,
    TransportError,
    describe,
    translating,
)


def translate(exc: BaseException, action: str) -> BusError | None:
    """The bus error for an aiokafka error, most specific first; None if not ours.

    Unreachable or unready brokers (connection errors, node not ready, no brokers, request
    timed out, leader or coordinator not available, a broker shutting down) and OSError ->
    BrokerUnavailable; a record or request too large, an invalid topic or configuration ->
    ConfigError; a client used after stop (ConsumerStoppedError, IllegalOperation,
    IllegalStateError, ProducerClosed) -> StateError; authorization or any other Kafka error ->
    TransportError.
    """
    from aiokafka import errors as kerr

    text = f"kafka: {action}: {describe(exc)}"
    unavailable = (
        kerr.KafkaConnectionError,
        kerr.NodeNotReadyError,
        kerr.NoBrokersAvailable,
        kerr.KafkaTimeoutError,
        kerr.RequestTimedOutError,
        kerr.LeaderNotAvailableError,
        kerr.NotLeaderForPartitionError,
        kerr.CoordinatorNotAvailableError,
        kerr.NotCoordinatorError,
        kerr.CoordinatorLoadInProgressError,
        kerr.NotEnoughReplicasError,
        kerr.NotEnoughReplicasAfterAppendError,
        kerr.BrokerNotAvailableError,
        kerr.KafkaUnavailableError,
        OSError,
    )
    if isinstance(exc, unavailable):
        return BrokerUnavailable(text)
    invalid = (
        kerr.MessageSizeTooLargeError,
        kerr.RecordListTooLargeError,
        kerr.RecordTooLargeError,
        kerr.InvalidTopicError,
        kerr.InvalidConfigurationError,
        kerr.InvalidPartitionsError,
        kerr.InvalidReplicationFactorError,
        kerr.UnsupportedCodecError,
    )
    if isinstance(exc, invalid):
        return ConfigError(text)
    stopped = (kerr.ConsumerStoppedError, kerr.IllegalOperation, kerr.IllegalStateError, kerr.ProducerClosed)
    if isinstance(exc, stopped):
        return StateError(text)
    if isinstance(exc, kerr.KafkaError | TimeoutError):
        return TransportError(text)
    return None


def translated(action: str) -> contextlib.AbstractContextManager[None]:
    """Re-raise a client error as the bus error :func:`translate` picks, original chained."""
    return translating(translate, action)
