"""The one place where redis-py errors become bus errors (the original is always chained)."""

from __future__ import annotations

import contextlib

from redis import exceptions as rexc

from agent_os.amb.errors import (
    BrokerUnavailable,
    BusError,
    ConfigError,
    TransportError,
    describe,
    translating,
)


def translate(exc: BaseException, action: str) -> BusError | None:
    """The bus error for a redis-py (or socket) error, most specific first; None if not ours.

    Authentication / authorization refused -> TransportError (retrying will not help);
    connection errors, timeouts, a server still loading its data set, a read-only replica,
    a cluster that is down or has a slot uncovered, and OSError -> BrokerUnavailable; a bad
    option given to redis-py (DataError) -> ConfigError; any other redis-py error (a command
    the server refused, a script error, a protocol error) -> TransportError.
    """
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError | rexc.NoPermissionError):
        return TransportError(f"redis refused to {action}: {describe(exc)}")
    unavailable = (
        rexc.ConnectionError,
        rexc.TimeoutError,
        rexc.BusyLoadingError,
        rexc.ReadOnlyError,
        rexc.ClusterDownError,
        rexc.TryAgainError,
        rexc.MasterDownError,
        OSError,
    )
    if isinstance(exc, unavailable):
        return BrokerUnavailable(f"redis unavailable, could not {action}: {describe(exc)}")
    if isinstance(exc, rexc.DataError):
        return ConfigError(f"redis could not {action}: {describe(exc)}")
    if isinstance(exc, rexc.SlotNotCoveredError):
        return BrokerUnavailable(f"redis unavailable, could not {action}: {describe(exc)}")
    if isinstance(exc, (rexc.RedisError, rexc.RedisClusterException, *_OTHER_REDIS_ERRORS)):
        return TransportError(f"redis failed to {action}: {describe(exc)}")
    return None


# redis-py errors outside its RedisError tree.
_OTHER_REDIS_ERRORS = (rexc.ChildDeadlockedError, rexc.IncorrectPolicyType)


def translated(action: str) -> contextlib.AbstractContextManager[None]:
    """Re-raise a client error as the bus error :func:`translate` picks, original chained."""
    return translating(translate, action)
