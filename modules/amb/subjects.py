"""Subjects and subject patterns (NATS syntax, used by every adapter): validation and matching.

``*`` matches one token, ``>`` one or more trailing tokens (see ``docs/bus.md``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache, partial

from agent_os.amb.errors import ConfigError

_BAD_TOKEN = re.compile(r"[\s]")
# A valid subject in one C-level match: non-empty tokens without whitespace, "*" or ">".
_SUBJECT = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")


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
    if type(subject) is str and _SUBJECT.fullmatch(subject):
        return subject
    for tok in _tokens(subject, "subject"):  # invalid: name what is wrong
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


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A function telling whether a (valid) subject matches ``pattern`` (a valid pattern): the
    same answers as :func:`matches`, faster for exact and ``prefix.>`` patterns."""
    if not is_wildcard(pattern):
        return pattern.__eq__
    if pattern == ">":
        return _any_subject
    head, _, last = pattern.rpartition(".")
    if last == ">" and "*" not in head.split("."):
        prefix = head + "."
        return partial(_under, prefix)
    return partial(matches, pattern)


def _any_subject(subject: str) -> bool:
    return True


def _under(prefix: str, subject: str) -> bool:
    # Subjects have no empty tokens, so anything after "<prefix>." is one or more tokens.
    return subject.startswith(prefix) and len(subject) > len(prefix)


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
