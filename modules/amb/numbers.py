"""Checks of the numbers a caller hands the platform (times, counts, limits).

A comparison such as ``ttl <= 0`` lets NaN through (every comparison with NaN is false), and an
infinity or a bool passes it too. These checks refuse each of them, naming the argument, before
anything is sent, started or stored. The bus raises ConfigError; the other parts pass their own
error class (``error=``), so a caller sees the exception that part documents. Numbers of other
types are taken as they are elsewhere: any real number for a time (NumPy's, a Fraction, a
Decimal), any
integer for a count (``operator.index``: NumPy's, an IntEnum), never a bool.
"""

from __future__ import annotations

import math
import numbers
import operator
from decimal import Decimal
from typing import Final

from agent_os.amb.errors import ConfigError

MOST_SECONDS: Final = 1e9
"""The longest time an option may give (about 31 years): every adapter's clock arithmetic
(milliseconds or nanoseconds in 64 bits) and an envelope's expiry hold it."""


def seconds(
    value: object,
    name: str,
    *,
    zero: bool = False,
    most: float = MOST_SECONDS,
    error: type[Exception] = ConfigError,
    unit: str = "seconds",
) -> float:
    """``value`` as a float number of seconds (or another ``unit``): a real number (not a
    bool), finite, above 0 (``zero``: 0 allowed too), at most ``most``. Raises ``error``
    (ConfigError by default) otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        raise error(f"{name} must be a number of {unit}, got {type(value).__name__}")
    try:
        number = float(value)
    except Exception:  # an int beyond a float's range, or a __float__ that fails
        number = math.inf
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        what = f"a finite number of {unit}, 0 or more" if zero else f"a positive, finite number of {unit}"
        raise error(f"{name} must be {what}, got {shown(value)}")
    if number > most:
        raise error(f"{name} must be at most {most:g} {unit}, got {shown(value)}")
    return number


def whole(value: object, name: str, minimum: int = 1, *, error: type[Exception] = ConfigError) -> int:
    """``value`` as an int (any integer type but bool) of at least ``minimum``. Raises
    ``error`` (ConfigError by default) otherwise."""
    if isinstance(value, bool):
        raise error(f"{name} must be an integer, got bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise error(f"{name} must be an integer, got {type(value).__name__}") from None
    if number < minimum:
        raise error(f"{name} must be at least {minimum}, got {shown(number)}")
    return number


def fraction(value: object) -> float | None:
    """``value`` as a float from 0 to 1 (a trust level, a threshold): any real number but a
    bool; None for anything else, NaN included. The caller decides what None means (an error,
    or failing closed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        return None
    try:
        number = float(value)
    except Exception:  # a __float__ that fails
        return None
    return number if type(number) is float and 0.0 <= number <= 1.0 else None


def shown(value: object) -> str:
    """``value`` for an error message: an integer of more than 64 bits by its size (Python
    refuses to print one of thousands of digits, and nobody reads it)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:60]
