"""Subjects and subject patterns (NATS syntax, used by every adapter).

A subject is a non-empty string of ``.``-separated tokens: ``tasks.process``. A pattern may use
``*`` for exactly one token and ``>`` (last token only) for one or more trailing tokens:
``tasks.*`` matches ``tasks.process`` but not ``tasks.a.b``; ``tasks.>`` matches both.
Tokens are non-empty and contain no whitespace; ``*`` and ``>`` are not allowed in subjects
one publishes to.
"""

from __future__ import annotations

import re
from functools import lru_cache

from amb.errors import ConfigError

_BAD_TOKEN = re.compile(r"[\s]")


def _tokens(text: str, what: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what} must be a non-empty string")
    tokens = text.split(".")
    for tok in tokens:
        if not tok:
            raise ConfigError(f"{what} {text!r} has an empty token")
        if _BAD_TOKEN.search(tok):
            raise ConfigError(f"{what} {text!r} contains whitespace")
    return tokens


@lru_cache(maxsize=4096)
def validate_subject(subject: str) -> str:
    """Return ``subject`` if it is a valid subject to publish to; raises ConfigError."""
    for tok in _tokens(subject, "subject"):
        if tok in ("*", ">") or "*" in tok or ">" in tok:
            raise ConfigError(f"subject {subject!r} may not contain wildcards")
    return subject


@lru_cache(maxsize=4096)
def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern; raises ConfigError."""
    tokens = _tokens(pattern, "pattern")
    for i, tok in enumerate(tokens):
        if tok == ">" and i != len(tokens) - 1:
            raise ConfigError(f"pattern {pattern!r}: '>' must be the last token")
        if tok not in ("*", ">") and ("*" in tok or ">" in tok):
            raise ConfigError(f"pattern {pattern!r}: wildcards must be whole tokens")
    return pattern


def is_wildcard(pattern: str) -> bool:
    """True when ``pattern`` contains a ``*`` or ``>`` token."""
    return any(tok in ("*", ">") for tok in pattern.split("."))


def matches(pattern: str, subject: str) -> bool:
    """True when ``subject`` matches ``pattern`` (both assumed valid)."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)
