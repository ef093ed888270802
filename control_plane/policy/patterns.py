"""Patterns: what a policy rule matches (operation, resource, conditions, exclusions).

Globs or regular expressions over the resource, conditions on the evaluation context, compiled
once when the pattern is created; the matching rules are in ``docs/control-plane.md``
(Policies and patterns).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, time
from typing import Any, Final, Literal

from agent_os.control_plane.errors import PolicyError

MatchType = Literal["glob", "regex"]
Context = Mapping[str, Any]
Condition = Callable[[Context], bool]

_GLOB_META: Final = re.compile(r"[*?\[]")
_MISSING: Final = object()
_OPERATORS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "$eq": lambda v, a: v == a,
    "$ne": lambda v, a: v != a,
    "$in": lambda v, a: v in a,
    "$nin": lambda v, a: v not in a,
    "$gt": lambda v, a: v > a,
    "$gte": lambda v, a: v >= a,
    "$lt": lambda v, a: v < a,
    "$lte": lambda v, a: v <= a,
}


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


def literal_prefix(resource: str, match_type: MatchType) -> str:
    """The characters every matching resource starts with (used to index rules)."""
    if match_type == "regex":
        return ""
    m = _GLOB_META.search(resource)
    return resource if m is None else resource[: m.start()]


def compile_resource(resource: str, match_type: MatchType) -> re.Pattern[str]:
    """Compile a resource pattern; raises PolicyError for an invalid regex or match type."""
    if match_type == "glob":
        return re.compile(fnmatch.translate(resource), re.S)
    if match_type == "regex":
        try:
            return re.compile(resource)
        except re.error as exc:
            raise PolicyError(f"invalid regex {resource!r}: {exc}") from None
    raise PolicyError(f"match_type must be 'glob' or 'regex', got {match_type!r}")


def _clock(value: Any) -> time:
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise PolicyError(f"time_window needs HH:MM times, got {value!r}") from None


def _regex_check(rx: re.Pattern[str], value: Any) -> bool:
    return isinstance(value, str) and rx.search(value) is not None


def _apply(fn: Callable[[Any, Any], bool], arg: Any, value: Any) -> bool:
    return fn(value, arg)


def operator_condition(field: str, spec: Mapping[str, Any]) -> Condition:
    """A condition on ``field`` from an operator map (``{"$gte": 3, "$lt": 9}``, ``$regex``
    ...): every operator must hold. Also the flight recorder's query filters. Raises
    PolicyError for an unknown operator."""
    checks: list[Callable[[Any], bool]] = []
    for op, arg in spec.items():
        if op == "$regex":
            rx = compile_resource(str(arg), "regex")
            checks.append(functools.partial(_regex_check, rx))
        elif op == "$exists":
            continue  # handled below: presence is checked before the other operators
        elif op in _OPERATORS:
            fn = _OPERATORS[op]
            checks.append(functools.partial(_apply, fn, arg))
        else:
            raise PolicyError(f"condition on {field!r}: unknown operator {op!r}")
    want_present = bool(spec.get("$exists", True))

    def check(ctx: Context) -> bool:
        value = lookup(ctx, field)
        if value is _MISSING:
            return not want_present
        return want_present and all(c(value) for c in checks)

    return check


def _one_condition(field: str, spec: Any) -> Condition:
    if field == "time_window":
        if not isinstance(spec, Mapping) or set(spec) - {"start", "end"} or not spec:
            raise PolicyError("time_window needs {'start': 'HH:MM', 'end': 'HH:MM'}")
        start, end = _clock(spec.get("start", "00:00")), _clock(spec.get("end", "23:59:59.999999"))

        def in_window(ctx: Context) -> bool:
            now = ctx.get("now") or datetime.now(UTC)
            t = now.time() if isinstance(now, datetime) else now
            return start <= t <= end if start <= end else (t >= start or t <= end)

        return in_window
    for prefix, op in (("max_", "$lte"), ("min_", "$gte")):
        if field.startswith(prefix) and len(field) > len(prefix):
            if isinstance(spec, bool) or not isinstance(spec, int | float):
                raise PolicyError(f"condition {field!r} needs a number, got {spec!r}")
            return operator_condition(field[len(prefix) :], {op: spec})
    if isinstance(spec, Mapping):
        if not spec or not all(isinstance(k, str) and k.startswith("$") for k in spec):
            raise PolicyError(f"condition on {field!r}: a mapping must hold $-operators")
        return operator_condition(field, spec)
    if isinstance(spec, list | tuple | set | frozenset):
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

    Raises PolicyError for a malformed condition. A comparison that fails at evaluation time
    (say ``"a" > 1``) raises, and the policy turns that into a deny (fail closed).
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
    return lambda ctx: all(c(ctx) for c in checks)


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


class Pattern:
    """What a rule matches: ``Pattern(operation, resource, match_type, conditions, exclude)``.

    The matching rules are in ``docs/control-plane.md``. Raises PolicyError for an invalid
    regex, match type or condition.
    """

    __slots__ = (
        "_cond",
        "_exclude",
        "_op_rx",
        "_rx",
        "cache_fields",
        "conditions",
        "exclude",
        "match_type",
        "operation",
        "prefix",
        "resource",
    )

    def __init__(
        self,
        operation: str = "*",
        resource: str = "*",
        match_type: MatchType = "glob",
        conditions: Mapping[str, Any] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(operation, str) or not operation:
            raise PolicyError("operation must be a non-empty string")
        if not isinstance(resource, str):
            raise PolicyError("resource must be a string")
        self.operation = operation
        self.resource = resource
        self.match_type = match_type
        self.conditions = dict(conditions) if conditions else None
        self.exclude = list(exclude) if exclude else []
        self._rx = compile_resource(resource, match_type)
        self._op_rx = None if _GLOB_META.search(operation) is None else compile_resource(operation, "glob")
        self._exclude = [compile_resource(e, match_type) for e in self.exclude]
        self._cond = compile_conditions(self.conditions)
        self.prefix = literal_prefix(resource, match_type)
        self.cache_fields = condition_fields(self.conditions)

    @property
    def literal_operation(self) -> str | None:
        """The operation when it has no wildcard, else None."""
        return self.operation if self._op_rx is None else None

    def matches(self, operation: str, resource: str, context: Context) -> bool:
        """Whether an action matches; may raise on a condition that cannot be evaluated."""
        return self.targets(operation, resource) and (self._cond is None or self._cond(context))

    def targets(self, operation: str, resource: str) -> bool:
        """Whether the operation and resource match (the conditions are not looked at)."""
        if self._op_rx is None:
            if operation != self.operation:
                return False
        elif self._op_rx.match(operation) is None:
            return False
        if not resource.startswith(self.prefix) or self._rx.fullmatch(resource) is None:
            return False
        exclude = self._exclude
        return not exclude or all(ex.fullmatch(resource) is None for ex in exclude)

    def holds(self, context: Context) -> bool:
        """Whether the conditions hold for ``context`` (True without conditions); may raise."""
        return self._cond is None or self._cond(context)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operation": self.operation, "resource": self.resource}
        if self.match_type != "glob":
            out["match_type"] = self.match_type
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.conditions:
            out["conditions"] = dict(self.conditions)
        return out

    def __repr__(self) -> str:
        return f"Pattern({self.operation!r}, {self.resource!r}, match_type={self.match_type!r})"


class CheckedPattern(Pattern):
    """A pattern whose resource is matched by a function (the built-in helpers' checks, e.g.
    "a destructive SQL statement"): ``check(resource)`` returns why it matches, or None.

    It is indexed like a regex pattern (under every resource) and serialised with
    ``resource`` set to its ``description``; it has no YAML form.
    """

    __slots__ = ("check", "description")

    def __init__(
        self,
        operation: str,
        check: Callable[[str], str | None],
        description: str,
        conditions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(operation, "(?s).*", "regex", conditions)
        self.check = check
        self.description = description

    def targets(self, operation: str, resource: str) -> bool:
        return super().targets(operation, resource) and self.check(resource) is not None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(resource=self.description, match_type="check")
        return out

    def __repr__(self) -> str:
        return f"CheckedPattern({self.operation!r}, {self.description!r})"
