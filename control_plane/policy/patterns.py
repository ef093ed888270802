"""Patterns: what a policy rule matches (operation, resource, conditions, exclusions).

Globs or regular expressions over the resource, conditions on the evaluation context, compiled
once when the pattern is created; the matching rules are in ``docs/control-plane.md``
(Policies and patterns).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar

from agent_os.control_plane.errors import PatternError, PolicyError
from agent_os.control_plane.policy.conditions import (
    Condition,
    Context,
    Outcome,
    compile_conditions,
    condition_fields,
    operator_condition,
)
from agent_os.control_plane.policy.regex import Matcher, compile_regex

__all__ = [
    "CheckedPattern",
    "Condition",
    "ContentPattern",
    "Context",
    "MatchType",
    "Outcome",
    "Pattern",
    "compile_conditions",
    "compile_resource",
    "literal_prefix",
    "operator_condition",
]

MatchType = Literal["glob", "regex"]

_GLOB_META: Final = re.compile(r"[*?\[]")


def literal_prefix(resource: str, match_type: MatchType) -> str:
    """The characters every matching resource starts with (used to index rules)."""
    if match_type == "regex":
        return ""
    m = _GLOB_META.search(resource)
    return resource if m is None else resource[: m.start()]


def compile_resource(resource: str, match_type: MatchType) -> Matcher:
    """Compile a resource pattern; raises PolicyError for an invalid regex or match type.

    A regex is compiled by RE2 (linear time; what RE2 cannot run is refused). A glob is
    translated by :func:`fnmatch.translate`, whose atomic groups scan for each ``*`` once, so
    its matching time is bounded by the resource's length times the glob's, without
    backtracking; it runs on Python's ``re``, several times faster than RE2 per call."""
    if match_type == "glob":
        return re.compile(fnmatch.translate(resource), re.S)
    if match_type == "regex":
        return compile_regex(resource)
    raise PolicyError(f"match_type must be 'glob' or 'regex', got {match_type!r}")


_T = TypeVar("_T")


def _part(part: str, compile: Callable[..., _T], *args: Any) -> _T:
    try:
        return compile(*args)
    except PolicyError as exc:
        raise PatternError(part, str(exc)) from None


class Pattern:
    """What a rule matches: ``Pattern(operation, resource, match_type, conditions, exclude)``.

    The matching rules are in ``docs/control-plane.md``. Raises PatternError (a PolicyError
    naming the part at fault) for an invalid regex (or one RE2 cannot run), match type or
    condition.
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
            raise PatternError("operation", "must be a non-empty string")
        if not isinstance(resource, str):
            raise PatternError("resource", "must be a string")
        if match_type not in ("glob", "regex"):
            raise PatternError("match_type", f"must be 'glob' or 'regex', got {match_type!r}")
        self.operation = operation
        self.resource = resource
        self.match_type = match_type
        self.conditions = dict(conditions) if conditions else None
        self.exclude = list(exclude) if exclude else []
        if not all(isinstance(e, str) for e in self.exclude):
            raise PatternError("exclude", f"must be a list of strings, got {self.exclude!r}")
        self._rx = _part("resource", compile_resource, resource, match_type)
        self._op_rx = None if _GLOB_META.search(operation) is None else compile_resource(operation, "glob")
        self._exclude = [_part("exclude", compile_resource, e, match_type) for e in self.exclude]
        self._cond = _part("conditions", compile_conditions, self.conditions)
        self.prefix = literal_prefix(resource, match_type)
        self.cache_fields = condition_fields(self.conditions)

    @property
    def literal_operation(self) -> str | None:
        """The operation when it has no wildcard, else None."""
        return self.operation if self._op_rx is None else None

    def matches(self, operation: str, resource: str, context: Context) -> Outcome:
        """Whether an action matches: ``targets`` and ``holds``; None when the target matches
        and a condition cannot be decided. May raise on a condition that cannot be evaluated."""
        if not self.targets(operation, resource):
            return False
        return self.holds(context)

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

    def holds(self, context: Context) -> Outcome:
        """Whether the conditions hold for ``context`` (True without conditions), or None when
        one cannot be decided (NaN, a string where a number is compared ...); may raise."""
        return True if self._cond is None else self._cond(context)

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
        super().__init__(operation, "*", "glob", conditions)
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


class ContentPattern(Pattern):
    """A pattern over the texts of what an agent is given (``context["content"]``, a tuple of
    strings: the arguments of ``kernel.execute``): it holds when ``check(text)`` gives a reason
    for one of them. It matches every resource of ``operation``, reads a context field the
    decision cache is not keyed by (so its decisions are never cached), and has no YAML form.
    """

    __slots__ = ("check", "description")

    def __init__(self, operation: str, check: Callable[[str], str | None], description: str) -> None:
        super().__init__(operation, "*", "glob")
        self.check = check
        self.description = description
        self.cache_fields = None  # reads "content"

    def holds(self, context: Context) -> Outcome:
        """True when ``check`` gives a reason for a text of ``context["content"]``; else None
        when ``context["content_complete"]`` is False (texts past a bound were not collected:
        undecidable), else False."""
        texts = context.get("content")
        if not isinstance(texts, tuple | list):
            return False
        check = self.check
        if any(check(t) is not None for t in texts if isinstance(t, str)):
            return True
        return None if context.get("content_complete") is False else False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(content=self.description, match_type="check")
        return out

    def __repr__(self) -> str:
        return f"ContentPattern({self.operation!r}, {self.description!r})"
