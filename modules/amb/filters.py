"""Content filters: decide from a payload whether a subscription wants a message.

A filter is a predicate or a dict of field conditions (equality, membership, a callable); the
rules are in ``docs/bus.md``, "Subjects and filters".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent_os.amb.errors import ConfigError

Predicate = Callable[[Any], bool]
FilterSpec = Predicate | Mapping[str, Any]

_MISSING = object()


def _lookup(payload: Any, path: tuple[str, ...]) -> Any:
    value = payload
    for key in path:
        if type(value) is not dict:
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _condition(expected: Any) -> Predicate:
    if isinstance(expected, list | tuple | set | frozenset):
        members = list(expected)
        return lambda value: value in members
    if callable(expected):
        return lambda value: bool(expected(value))
    return lambda value: bool(value == expected)


def compile_filter(spec: FilterSpec | None) -> Predicate | None:
    """Turn a filter spec into one predicate over payloads (None when there is no filter)."""
    if spec is None:
        return None
    if callable(spec):
        predicate = spec
        return lambda payload: bool(predicate(payload))
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError("a filter must be a callable or a non-empty dict of field conditions")
    checks: list[tuple[tuple[str, ...], Predicate]] = []
    for field, expected in spec.items():
        if not isinstance(field, str) or not field or any(not part for part in field.split(".")):
            raise ConfigError(f"filter field {field!r} must be a dotted field name")
        checks.append((tuple(field.split(".")), _condition(expected)))

    def matches(payload: Any) -> bool:
        if type(payload) is not dict:
            return False
        for path, check in checks:
            value = _lookup(payload, path)
            if value is _MISSING or not check(value):
                return False
        return True

    return matches
