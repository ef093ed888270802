"""Conditions: predicates over the evaluation context with three outcomes.

A condition holds (True), does not (False), or cannot be decided (None): NaN, a string or a bool
where a number is compared, a text longer than :data:`MAX_MATCH_CHARS` under ``$regex`` ...
The policy reads None as a match for a deny rule and as no match for an allow rule, so an
undecidable value never turns a deny into an allow. The rules are in ``docs/control-plane.md``
(Conditions).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, time
from typing import Any, Final

from agent_os.control_plane.errors import PolicyError
from agent_os.control_plane.policy.regex import Matcher, compile_regex

Context = Mapping[str, Any]
Outcome = bool | None
"""True (holds), False (does not hold) or None (cannot be decided)."""
Condition = Callable[[Context], Outcome]

MAX_MATCH_CHARS: Final = 65_536
"""The longest text a ``$regex`` condition reads; a longer value cannot be decided."""

_MISSING: Final = object()
_NUMBER: Final = "number"  # the kind of int and finite float (bool is not a number)
_NOT_A_VALUE: Final = "not a value"  # NaN and the infinities: never compared
_ORDERING: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
_SETS: Final = (list, tuple, set, frozenset)


def kind(value: Any) -> object:
    """What a value is compared as: numbers (int and finite float) with numbers, str with str,
    bool with bool, None with None, anything else with its own type; NaN and the infinities
    with nothing."""
    t = type(value)
    if t is str or t is bool or value is None:
        return t
    if t is int:
        return _NUMBER
    if t is float:
        return _NUMBER if math.isfinite(value) else _NOT_A_VALUE
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return _NUMBER
    if isinstance(value, float):
        return _NUMBER if math.isfinite(value) else _NOT_A_VALUE
    if isinstance(value, str):
        return str
    return t


def lookup(context: Context, path: str) -> Any:
    """The value at a dotted ``path`` (``"payload.amount"``) of ``context``, or ``_MISSING``."""
    if path in context:
        return context[path]
    value: Any = context
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            return _MISSING
    return value


def every(outcomes: Sequence[Callable[[Any], Outcome]], arg: Any) -> Outcome:
    """All of ``outcomes`` applied to ``arg``: False if one is False, else None if one is None
    (three-valued AND: a decided False wins over an undecidable)."""
    undecided = False
    for check in outcomes:
        got = check(arg)
        if got is False:
            return False
        if got is None:
            undecided = True
    return None if undecided else True


def _negate(outcome: Outcome) -> Outcome:
    return None if outcome is None else not outcome


class _OneOf:
    """Membership in a list of values of one kind (``$in``, ``$eq`` with one value)."""

    __slots__ = ("kind", "values")

    def __init__(self, field: str, op: str, values: Sequence[Any]) -> None:
        kinds = set()
        for v in values:
            k = kind(v)
            if k is _NOT_A_VALUE:
                raise PolicyError(f"condition on {field!r}: {op} needs finite numbers, got {v!r}")
            if v is not None:
                kinds.add(k)
        if len(kinds) > 1:
            raise PolicyError(
                f"condition on {field!r}: {op} mixes kinds of values ({values!r}): "
                "numbers, strings and booleans are never equal to one another"
            )
        self.values = tuple(values)
        self.kind = kinds.pop() if kinds else type(None)

    def __call__(self, value: Any) -> Outcome:
        if not self.values:
            return False
        if value is None and None in self.values:
            return True
        if value is None or self.kind is type(None):
            # No value is not any name or flag, but it is not comparable to a number.
            return None if self.kind is _NUMBER else False
        if kind(value) is not self.kind:
            return None
        return value in self.values


class _Ordered:
    """``$gt $gte $lt $lte``: decided only between values of the operand's kind."""

    __slots__ = ("arg", "fn", "kind")

    def __init__(self, field: str, op: str, arg: Any) -> None:
        k = kind(arg)
        if k in (_NOT_A_VALUE, bool, type(None)) or isinstance(arg, (*_SETS, Mapping)):
            raise PolicyError(f"condition on {field!r}: {op} needs a finite number or a string, got {arg!r}")
        self.fn, self.arg, self.kind = _ORDERING[op], arg, k

    def __call__(self, value: Any) -> Outcome:
        if kind(value) is not self.kind:
            return None
        return bool(self.fn(value, self.arg))


class _Regex:
    """``$regex``: RE2 searches a string of at most :data:`MAX_MATCH_CHARS` characters."""

    __slots__ = ("rx",)

    def __init__(self, rx: Matcher) -> None:
        self.rx = rx

    def __call__(self, value: Any) -> Outcome:
        if isinstance(value, str):
            if len(value) > MAX_MATCH_CHARS:
                return None
            return self.rx.search(value) is not None
        return False if value is None else None


def _operator(field: str, op: str, arg: Any) -> Callable[[Any], Outcome]:
    if op == "$regex":
        if not isinstance(arg, str):
            raise PolicyError(f"condition on {field!r}: $regex needs a string, got {arg!r}")
        try:
            return _Regex(compile_regex(arg))
        except PolicyError as exc:
            raise PolicyError(f"condition on {field!r}: $regex: {exc}") from None
    if op in _ORDERING:
        return _Ordered(field, op, arg)
    if op in ("$eq", "$ne"):
        one = _OneOf(field, op, (arg,))
        return one if op == "$eq" else lambda v: _negate(one(v))
    if op in ("$in", "$nin"):
        if not isinstance(arg, _SETS):
            raise PolicyError(f"condition on {field!r}: {op} needs a list, got {arg!r}")
        among = _OneOf(field, op, list(arg))
        return among if op == "$in" else lambda v: _negate(among(v))
    raise PolicyError(f"condition on {field!r}: unknown operator {op!r}")


def operator_condition(field: str, spec: Mapping[str, Any]) -> Condition:
    """A condition on ``field`` from an operator map (``{"$gte": 3, "$lt": 9}``, ``$regex``
    ...): every operator must hold. Also the flight recorder's query filters. Raises
    PolicyError for an unknown operator or an operand it cannot compare with (NaN, an
    infinity, a list mixing numbers and strings, ``$gt`` on a bool ...)."""
    checks = [_operator(field, str(op), arg) for op, arg in spec.items() if op != "$exists"]
    want_present = spec.get("$exists", True)
    if not isinstance(want_present, bool):
        raise PolicyError(f"condition on {field!r}: $exists needs true or false, got {want_present!r}")
    only = checks[0] if len(checks) == 1 else None

    def check(ctx: Context) -> Outcome:
        value = lookup(ctx, field)
        if value is _MISSING:
            return not want_present
        if not want_present:
            return False
        return only(value) if only is not None else every(checks, value)

    return check


def _clock(value: Any) -> time:
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise PolicyError(f"time_window needs HH:MM times, got {value!r}") from None


def _time_window(spec: Any) -> Condition:
    if not isinstance(spec, Mapping) or set(spec) - {"start", "end"} or not spec:
        raise PolicyError("time_window needs {'start': 'HH:MM', 'end': 'HH:MM'}")
    start, end = _clock(spec.get("start", "00:00")), _clock(spec.get("end", "23:59:59.999999"))

    def in_window(ctx: Context) -> Outcome:
        now = ctx.get("now") or datetime.now(UTC)
        if isinstance(now, datetime):
            t = now.time()
        elif isinstance(now, time):
            t = now
        else:
            return None  # a clock reading that is not a time
        return start <= t <= end if start <= end else (t >= start or t <= end)

    return in_window


def _one_condition(field: str, spec: Any) -> Condition:
    if field == "time_window":
        return _time_window(spec)
    for prefix, op in (("max_", "$lte"), ("min_", "$gte")):
        if field.startswith(prefix) and len(field) > len(prefix):
            if kind(spec) is not _NUMBER:
                raise PolicyError(f"condition {field!r} needs a finite number, got {spec!r}")
            return operator_condition(field[len(prefix) :], {op: spec})
    if isinstance(spec, Mapping):
        if not spec or not all(isinstance(k, str) and k.startswith("$") for k in spec):
            raise PolicyError(f"condition on {field!r}: a mapping must hold $-operators")
        return operator_condition(field, spec)
    if isinstance(spec, _SETS):
        return operator_condition(field, {"$in": list(spec)})
    return operator_condition(field, {"$eq": spec})


def compile_conditions(conditions: Mapping[str, Any] | None) -> Condition | None:
    """Compile a conditions mapping into one predicate over the evaluation context.

    Forms (``field`` is a dotted path into the context: ``sender``, ``trust_level``,
    ``headers.x-tenant``, ``payload.amount``, or anything passed in ``context``):

    - ``field: [a, b]``: the value is one of them; ``field: value``: it equals value;
    - ``field: {"$gt": 1, "$regex": "^x", "$in": [...], "$exists": false, ...}``: operators
      ``$eq $ne $in $nin $gt $gte $lt $lte $regex $exists``, all must hold;
    - ``max_<field>: n`` / ``min_<field>: n``: the value is at most / at least n;
    - ``time_window: {"start": "09:00", "end": "17:00"}``: now (UTC, or ``context["now"]``) lies
      in the window (a window may wrap past midnight);
    - ``permission: "name"``: the recipient has granted the sender that permission, i.e.
      ``permissions(recipient, sender)`` contains it (IATP's ``iatp.permissions(from_agent,
      to_agent)``: what ``from_agent`` grants ``to_agent``; see Policy's ``permissions`` hook).

    The predicate returns True, False, or None when a value cannot be compared (see the module
    docstring); several conditions combine as a three-valued AND. Raises PolicyError for a
    malformed condition or an operand nothing can be compared with (NaN, an infinity).
    """
    if not conditions:
        return None
    if not isinstance(conditions, Mapping):
        raise PolicyError("conditions must be a mapping of field to requirement")
    checks = [_one_condition(str(f), s) for f, s in conditions.items() if f != "permission"]
    if "permission" in conditions:
        needed = conditions["permission"]
        wanted = [needed] if isinstance(needed, str) else list(needed)
        if not all(isinstance(p, str) and p for p in wanted):
            raise PolicyError("permission condition needs a permission name or a list of them")
        checks.append(lambda ctx: _has_permissions(ctx, wanted))
    if len(checks) == 1:
        return checks[0]
    return lambda ctx: every(checks, ctx)


def condition_fields(conditions: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The context fields ``conditions`` read, or None when their outcome may change for the
    same context (``time_window`` reads the clock, ``permission`` asks the trust hook)."""
    fields: set[str] = set()
    for name in conditions or ():
        field = str(name)
        if field in ("time_window", "permission"):
            return None
        for prefix in ("max_", "min_"):
            if field.startswith(prefix) and len(field) > len(prefix):
                field = field[len(prefix) :]
                break
        fields.add(field)
    return frozenset(fields)


def _has_permissions(ctx: Context, wanted: Sequence[str]) -> bool:
    source = ctx.get("_permissions")
    sender, recipient = ctx.get("sender"), ctx.get("recipient")
    if source is None or not sender or not recipient:
        return False  # no trust edge can be shown: the requirement is not met
    granted = source(recipient, sender)  # what the recipient granted the sender
    return all(p in granted for p in wanted)
