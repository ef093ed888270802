"""Regular expressions from policy, run by RE2 (google-re2): matching time is linear in the text.

A pattern RE2 cannot run (backreferences, lookarounds, atomic groups, possessive repeats, ``\\Z``)
is refused when the policy is built, never fallen back to Python's backtracking ``re``. The
dialect is in ``docs/control-plane.md`` (Regular expressions).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from agent_os.control_plane.errors import PolicyError

_OPTIONS: Final = re2.Options()
_OPTIONS.log_errors = False  # the error reaches the caller as a PolicyError; nothing on stderr


class Matcher(Protocol):
    """What a compiled pattern offers (``re.Pattern`` and RE2's compiled patterns alike)."""

    def fullmatch(self, text: str) -> Any: ...

    def match(self, text: str) -> Any: ...

    def search(self, text: str) -> Any: ...


def compile_regex(pattern: str) -> Matcher:
    """Compile ``pattern`` with RE2. Raises PolicyError naming the pattern and what RE2 refused
    (a syntax error, a construct RE2 does not run, a pattern over RE2's memory budget)."""
    if not isinstance(pattern, str):
        raise PolicyError(f"a regex must be a string, got {pattern!r}")
    try:
        return re2.compile(pattern, _OPTIONS)  # type: ignore[no-any-return]
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PolicyError(
            f"invalid regex {pattern!r} for RE2 ({detail}): backreferences, lookarounds, atomic "
            "groups, possessive repeats and \\Z are not supported (use \\z)"
        ) from None
