"""Checks of the numbers a caller hands the platform (times, counts, limits).

A comparison such as ``ttl <= 0`` lets NaN through (every comparison with NaN is false), and an
infinity or a bool passes it too. These checks refuse each of them, naming the argument, before
anything is sent, started or stored. The bus raises ConfigError; the other parts pass their own
error class (``error=``), so a caller sees the exception that part documents.
"""

from __future__ import annotations

import math

from agent_os.amb.errors import ConfigError


def seconds(
    value: object,
    name: str,
    *,
    zero: bool = False,
    error: type[Exception] = ConfigError,
    unit: str = "seconds",
) -> float:
    """``value`` as a float number of seconds (or another ``unit``): an int or float (not a
    bool), finite, above 0 (``zero``: 0 allowed too). Raises ``error`` (ConfigError by default)
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{name} must be a number of {unit}, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        number = math.inf
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        what = f"a finite number of {unit}, 0 or more" if zero else f"a positive, finite number of {unit}"
        raise error(f"{name} must be {what}, got {shown(value)}")
    return number


def whole(value: object, name: str, minimum: int = 1, *, error: type[Exception] = ConfigError) -> int:
    """``value`` as an int (not a bool) of at least ``minimum``. Raises ``error`` (ConfigError
    by default) otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise error(f"{name} must be at least {minimum}, got {shown(value)}")
    return int(value)


def shown(value: int | float) -> str:
    """``value`` for an error message: an integer of more than 64 bits by its size (Python
    refuses to print one of thousands of digits, and nobody reads it)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)
