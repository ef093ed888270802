"""The index of a policy's rules: which rules can match an (operation, resource) at all.

Rules are bucketed by their literal operation and the first token of their resource's literal
prefix; the candidates for an action are tried in rule order, so the outcome is that of a
linear scan (``docs/control-plane.md``, Policies).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from agent_os.control_plane.policy.decision import Decision, Rule

_TOKEN: Final = re.compile(r"[^./]*")
_ANY: Final = ""
_CACHE_MAX: Final = 4096


def first_token(resource: str) -> str:
    """The resource's first token (up to the first ``.`` or ``/``)."""
    m = _TOKEN.match(resource)
    return m.group(0) if m else ""


class RuleIndex:
    """An immutable snapshot of a policy's rules, their index and the decision cache."""

    __slots__ = ("buckets", "cache", "decisions", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self.buckets: dict[tuple[str | None, str], list[Rule]] | None = None  # built on first use
        self.cache: dict[tuple[str, str], tuple[Rule, ...]] = {}
        # (operation, resource, *KEY_FIELDS values) -> the Decision, or the rate-limited Rule
        self.decisions: dict[tuple[Any, ...], Decision | Rule] = {}

    def _index(self) -> dict[tuple[str | None, str], list[Rule]]:
        buckets: dict[tuple[str | None, str], list[Rule]] = {}
        for rule in self.rules:
            prefix = rule.pattern.prefix
            token = first_token(prefix)
            literal = rule.pattern.match_type == "glob" and prefix == rule.pattern.resource
            # The token is complete when a separator follows it in the prefix, or the resource is
            # literal (a matching resource equals it); otherwise the rule goes under "any token".
            key_token = token if (len(token) < len(prefix) or literal) else _ANY
            key = (rule.pattern.literal_operation, key_token)
            buckets.setdefault(key, []).append(rule)
        self.buckets = buckets
        return buckets

    def candidates(self, operation: str, resource: str) -> tuple[Rule, ...]:
        token = first_token(resource)
        key = (operation, token)
        found = self.cache.get(key)
        if found is None:
            b = self.buckets if self.buckets is not None else self._index()
            merged: list[Rule] = []
            for k in ((operation, token), (operation, _ANY), (None, token), (None, _ANY)):
                merged.extend(b.get(k, ()))
            if token == _ANY:  # a resource with an empty first token: only "any" buckets apply
                merged = list({id(r): r for r in merged}.values())
            merged.sort(key=lambda r: r.index)
            found = tuple(merged)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[key] = found
        return found
