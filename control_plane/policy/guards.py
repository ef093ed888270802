"""The checks behind :meth:`Policy.no_destructive_sql` and :meth:`Policy.file_access`.

:func:`destructive_sql` lexes SQL text into statements and words and denies on every dialect's
reading; :func:`path_refusal` says why a path is outside a root. What each denies, and what it
does not judge: ``docs/control-plane.md`` (Policies and patterns, Guards).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Final

_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_ALWAYS: Final = frozenset({"DROP", "TRUNCATE"})
_CHANGES: Final = frozenset({"DELETE", "UPDATE"})
_NOT_A_COMMAND_AFTER: Final = frozenset({"ON", "FOR", "KEY"})


class _Unlexable(ValueError):
    pass


def destructive_sql(text: str) -> str | None:
    """Why ``text`` (one or more SQL statements) is destructive, or None (docs/control-plane.md, Guards)."""
    for escapes in (False, True):
        for nested in (True, False):
            try:
                statements = list(_statements(text, escapes, nested))
            except _Unlexable as exc:
                return f"SQL that does not lex: {exc}"
            for words in statements:
                why = _destructive(words)
                if why is not None:
                    return why
    return None


def _destructive(words: list[tuple[str, int]]) -> str | None:
    """``words``: (upper-cased word, parenthesis depth) of one statement."""
    if not words:
        return None
    for i, (word, depth) in enumerate(words):
        if word in _ALWAYS:
            return f"{word} statement"
        if word not in _CHANGES or (i > 0 and words[i - 1][0] in _NOT_A_COMMAND_AFTER):
            continue
        if i != 0 or depth != 0:
            return f"{word} inside another statement"
        if not any(w == "WHERE" and d == 0 for w, d in words[1:]):
            return f"{word} without WHERE"
    return None


def _statements(text: str, escapes: bool, nested: bool) -> Iterator[list[tuple[str, int]]]:
    """The words of each statement, with their parenthesis depth; literals, quoted identifiers
    and comments are left out. Raises _Unlexable for an unterminated literal or comment."""
    words: list[tuple[str, int]] = []
    depth = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ";":
            yield words
            words, depth = [], 0
            i += 1
        elif c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth = max(depth - 1, 0)
            i += 1
        elif c in "'\"":
            i = _skip_quoted(text, i, c, escapes and c == "'")
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*!", i):
            i += 3  # MySQL runs what is inside: read it as code
        elif text.startswith("/*", i):
            i = _skip_block_comment(text, i, nested)
        else:
            m = _WORD.match(text, i)
            if m is None:
                i += 1
            else:
                words.append((m.group(0).upper(), depth))
                i = m.end()
    yield words


def _skip_quoted(text: str, start: int, quote: str, escapes: bool) -> int:
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if escapes and c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < n and text[i + 1] == quote:  # a doubled quote stands for itself
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise _Unlexable(f"unterminated {quote} at offset {start}")


def _skip_block_comment(text: str, start: int, nested: bool) -> int:
    level, i, n = 1, start + 2, len(text)
    while i < n:
        if nested and text.startswith("/*", i):
            level += 1
            i += 2
        elif text.startswith("*/", i):
            level -= 1
            i += 2
            if level == 0:
                return i
        else:
            i += 1
    raise _Unlexable(f"unterminated comment at offset {start}")


def path_refusal(root: str, path: str) -> str | None:
    """Why ``path`` is not inside ``root`` (an absolute, normalized path), or None."""
    if "\\" in path or "\0" in path:
        return "path traversal (a backslash or NUL in the path)"
    if ".." in path.split("/"):
        return "path traversal (a '..' segment)"
    if not path.startswith("/"):
        return f"not an absolute path under {root}"
    normal = posixpath.normpath(path)
    if root == "/" or normal == root or normal.startswith(root + "/"):
        return None
    return f"outside {root}"
