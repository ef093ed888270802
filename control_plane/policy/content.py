"""The content of a run: the texts of the arguments an agent is executed with, which content
rules (:class:`~agent_os.control_plane.policy.patterns.ContentPattern`) judge.

Strings are collected from the positional and keyword arguments and from the lists, tuples,
sets and dicts (keys and values) inside them, depth first, within bounds; other objects are
not read. What lies past a bound is not judged, and a content rule then cannot decide (a deny
rule denies: fail closed). ``docs/control-plane.md`` (The kernel, Governed runs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

MAX_DEPTH: Final = 16
"""How deep into nested lists and dicts the texts are collected."""
MAX_TEXTS: Final = 1_000
"""At most this many texts are collected."""
MAX_CHARS: Final = 1_048_576
"""At most this many characters of texts in all."""

_CONTAINERS: Final = (list, tuple, set, frozenset)


def argument_texts(args: Iterable[Any], kwargs: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    """The texts of ``args`` and ``kwargs``, and whether all of them were collected (False
    when a bound was reached or a container was cyclic). Never raises."""
    texts: list[str] = []
    budget = [MAX_CHARS]
    complete = _collect([*args, *kwargs.values()], 0, texts, budget, set())
    return tuple(texts), complete


def _collect(values: Iterable[Any], depth: int, texts: list[str], budget: list[int], seen: set[int]) -> bool:
    complete = True
    for value in values:
        if isinstance(value, str):
            if len(texts) >= MAX_TEXTS or len(value) > budget[0]:
                return False
            texts.append(value)
            budget[0] -= len(value)
            continue
        if isinstance(value, Mapping):
            inner: Iterable[Any] = [*value.keys(), *value.values()]
        elif isinstance(value, _CONTAINERS):
            inner = value
        else:
            continue
        if depth >= MAX_DEPTH or id(value) in seen:
            return False
        seen.add(id(value))
        complete = _collect(inner, depth + 1, texts, budget, seen) and complete
        if not complete:
            return False
    return complete
