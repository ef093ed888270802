"""Subjects and subject patterns (NATS syntax, used by every adapter): validation, matching, and
an index of patterns looked up by subject.

``*`` matches one token, ``>`` one or more trailing tokens. A subject is at most
:data:`MAX_SUBJECT_BYTES` UTF-8 bytes, without whitespace or control characters (see
``docs/bus.md``, "Subjects and filters").
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any, Final, Generic, TypeVar

from agent_os.amb.errors import InvalidSubject

MAX_SUBJECT_BYTES: Final = 1024
"""The longest subject or pattern, in UTF-8 bytes: well under every broker's limit (NATS reads
a protocol line of at most 4,096 bytes, which holds the subject and its reply subject)."""

MAX_NAME_BYTES: Final = 255
"""The longest queue group or durable name, in UTF-8 bytes."""

# The common case in one C-level match: printable ASCII tokens without "*" or ">".
_ASCII_SUBJECT: Final = re.compile(r"[!-)+-\-/-=?-~]+(?:\.[!-)+-\-/-=?-~]+)*")
# Categories refused anywhere in a subject: control, format (zero-width, bidi overrides),
# surrogates, and separators (every kind of space).
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
_SHOWN: Final = 80  # characters of a refused subject quoted in the error


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut to a readable length."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}... ({len(text)} characters)"


def _refused(text: str, what: str, reason: str, detail: str) -> InvalidSubject:
    return InvalidSubject(f"{what} {_shown(text)} {detail}", reason=reason, subject=text)


def plain_text(value: object, what: str) -> str:
    """``value`` as a plain ``str`` for a subject or pattern given by a caller: a ``str``
    subclass (a StrEnum ...) gives its text, which the encoders write; anything else, a list
    included (the validators' caches could not even look it up), raises InvalidSubject."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise InvalidSubject(
        f"{what} must be a non-empty string, got {type(value).__name__}", reason="empty", subject=""
    )


def _check_text(text: object, what: str, limit: int = MAX_SUBJECT_BYTES) -> str:
    """``text`` if it is a non-empty string of at most ``limit`` UTF-8 bytes without whitespace
    or control characters; raises InvalidSubject naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidSubject(f"{what} must be a non-empty string", reason="empty", subject="")
    if len(text) > limit:  # more characters than bytes allowed: too long whatever they are
        raise _refused(text, what, "too_long", f"is longer than {limit} bytes")
    if not text.isascii():
        for ch in text:
            category = unicodedata.category(ch)
            if category in _REFUSED_CATEGORIES or ch.isspace():
                kind = "whitespace" if category[0] == "Z" or ch.isspace() else "a control character"
                reason = "whitespace" if kind == "whitespace" else "control_character"
                raise _refused(text, what, reason, f"contains {kind} ({ch!r})")
        if len(text.encode("utf-8")) > limit:
            raise _refused(text, what, "too_long", f"is longer than {limit} bytes (UTF-8)")
        return text
    for ch in text:
        if ch <= " " or ch == "\x7f":
            kind = "whitespace" if ch.isspace() else "a control character"
            reason = "whitespace" if ch.isspace() else "control_character"
            raise _refused(text, what, reason, f"contains {kind} ({ch!r})")
    return text


def _tokens(text: str, what: str) -> list[str]:
    _check_text(text, what)
    tokens = text.split(".")
    for tok in tokens:
        if not tok:
            raise _refused(text, what, "empty_token", "has an empty token")
    return tokens


_HEADS_MAX: Final = 1024
# ASCII subjects known valid as the head of a longer one: the inboxes of reply subjects
# (``<inbox>.<request number>``), which are new for each request while their inbox repeats.
_valid_heads: set[str] = set()


def subject_ok(subject: object) -> bool:
    """True when ``subject`` is a valid subject to publish to (what :func:`validate_subject`
    accepts), without raising: for subjects that come from the wire, reply subjects above all.

    It does not remember ``subject`` (each reply subject is new) but its head, everything
    before the last ``.``: a valid ASCII head and a last token of ASCII letters and digits
    make a valid subject while the whole is short enough, without the full check."""
    if type(subject) is not str:
        return False
    if len(subject) <= MAX_SUBJECT_BYTES and subject.isascii():
        head, _, token = subject.rpartition(".")
        if head in _valid_heads and token.isalnum():
            return True
        if _ASCII_SUBJECT.fullmatch(subject) is None:
            return False
        if head:
            if len(_valid_heads) >= _HEADS_MAX:
                _valid_heads.clear()
            _valid_heads.add(head)
        return True
    try:
        validate_subject(subject)
    except InvalidSubject:
        return False
    return True


INBOX_ROOT: Final = "_INBOX."
"""Where reply inboxes live (every adapter's; keep ``inbox_prefix`` under it): a subject here is
a reply subject, new for each request, which caches of subjects leave out."""

_VALID_MAX: Final = 4096
valid_subjects: Final[set[str]] = set()
"""Subjects :func:`validate_subject` accepted and remembers (plain ``str`` only, not reply
subjects; it starts over when full): a str in it is a valid subject. Read it, never write it
(the receive path looks a topic up here before calling
:func:`~agent_os.amb.serializers.schema.check_subjects`)."""

_WIDE_REPLIES_MAX: Final = 256
# Valid reply subjects that are not ASCII (a custom inbox_prefix): their full check is slow and
# each is checked a few times in one request, so the latest ones are kept apart from topics.
_wide_replies: set[str] = set()


def validate_subject(subject: str) -> str:
    """Return ``subject`` if it is a valid subject to publish to: non-empty tokens, no
    wildcards, at most :data:`MAX_SUBJECT_BYTES` UTF-8 bytes, no whitespace or control
    characters. Raises :class:`~agent_os.amb.InvalidSubject` (a ConfigError) naming why.

    Valid subjects are remembered (topics repeat), up to 4,096 before starting over; reply
    subjects (under :data:`INBOX_ROOT`) are not, so they never push topics out. Only plain
    ``str`` is remembered: a subclass may compare equal to text that is not its own."""
    plain = type(subject) is str
    if plain and subject in valid_subjects:
        return subject
    if not plain and isinstance(subject, str):
        validate_subject(str.__str__(subject))  # its text, whatever the subclass overrides
        return subject
    ascii_ok = (
        plain
        and len(subject) <= MAX_SUBJECT_BYTES
        and subject.isascii()
        and _ASCII_SUBJECT.fullmatch(subject)
    )
    if not ascii_ok:
        if plain and subject in _wide_replies:
            return subject
        for tok in _tokens(subject, "subject"):  # invalid (or not ASCII): name what is wrong
            if "*" in tok or ">" in tok:
                raise _refused(subject, "subject", "wildcard", "may not contain wildcards")
    if plain:
        if not subject.startswith(INBOX_ROOT):
            if len(valid_subjects) >= _VALID_MAX:
                valid_subjects.clear()
            valid_subjects.add(subject)
        elif not ascii_ok:
            if len(_wide_replies) >= _WIDE_REPLIES_MAX:
                _wide_replies.clear()
            _wide_replies.add(subject)
    return subject


@lru_cache(maxsize=4096)
def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern (the rules of a subject, with
    ``*`` and ``>`` as whole tokens, ``>`` last). Raises :class:`~agent_os.amb.InvalidSubject`."""
    tokens = _tokens(pattern, "pattern")
    for i, tok in enumerate(tokens):
        if tok == ">" and i != len(tokens) - 1:
            raise _refused(pattern, "pattern", "wildcard", "has '>' before its last token")
        if tok not in ("*", ">") and ("*" in tok or ">" in tok):
            raise _refused(pattern, "pattern", "wildcard", "has wildcards that are not whole tokens")
    return pattern


def validate_name(name: str, what: str) -> str:
    """Return ``name`` (a queue group or durable name, ``what`` says which) if it is non-empty,
    at most :data:`MAX_NAME_BYTES` UTF-8 bytes, without whitespace or control characters.
    Raises :class:`~agent_os.amb.InvalidSubject`."""
    return _check_text(name, f"{what} name", MAX_NAME_BYTES)


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


V = TypeVar("V")

INDEXED_TOKENS: Final = 8
"""The tokens of a pattern :class:`SubjectIndex` files by; a longer pattern is kept with its
first ones and checked whole (with :func:`compile_pattern`) against a subject reaching them.
Subjects have a few tokens; the bound keeps a deep pattern (up to 512 tokens) from costing a
node per token."""


class _Node(Generic[V]):
    """The patterns sharing one prefix of tokens: those that end here, those that end with
    ``>`` after it, those longer than :data:`INDEXED_TOKENS` (with their matcher), and the
    others by their next token (a literal or ``*``). Lists and the dict are made when needed."""

    __slots__ = ("children", "deep", "ends", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] | None = None
        self.ends: list[tuple[int, V]] | None = None
        self.rest: list[tuple[int, V]] | None = None
        self.deep: list[tuple[int, V, Callable[[str], bool]]] | None = None

    def empty(self) -> bool:
        return not (self.children or self.ends or self.rest or self.deep)


def _order(entry: tuple[int, object] | tuple[int, object, object]) -> int:
    return entry[0]


def _path(pattern: str) -> tuple[list[str], str]:
    """The tokens ``pattern`` is filed under, and the list of its node it goes in: ``"ends"``,
    ``"rest"`` (its last token ``>``) or ``"deep"`` (more tokens than :data:`INDEXED_TOKENS`)."""
    tokens = pattern.split(".")
    if len(tokens) > INDEXED_TOKENS:
        return tokens[:INDEXED_TOKENS], "deep"
    if tokens[-1] == ">":
        return tokens[:-1], "rest"
    return tokens, "ends"


class SubjectIndex(Generic[V]):
    """Values filed under subscription patterns, found by subject (a tree of pattern tokens).

    :meth:`match` returns the values whose pattern matches a subject, in the order they were
    added, with the answers of :func:`matches`. Its cost grows with the subject's tokens and
    the patterns that share its prefixes, not with the number of patterns: a broker routing
    subjects it has not seen before (every request's reply subject is new) does not scan every
    subscription. A pattern costs at most :data:`INDEXED_TOKENS` nodes. Patterns must be valid
    (:func:`validate_pattern`), subjects valid subjects.
    """

    __slots__ = ("_root", "_seq", "_size")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        """The number of values filed."""
        return self._size

    def add(self, pattern: str, value: V) -> None:
        """File ``value`` under ``pattern``."""
        tokens, where = _path(pattern)
        node = self._root
        for tok in tokens:
            if node.children is None:
                node.children = {}
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node()
            node = child
        seq = next(self._seq)
        if where == "deep":
            if node.deep is None:
                node.deep = []
            node.deep.append((seq, value, compile_pattern(pattern)))
        elif where == "rest":
            if node.rest is None:
                node.rest = []
            node.rest.append((seq, value))
        else:
            if node.ends is None:
                node.ends = []
            node.ends.append((seq, value))
        self._size += 1

    def remove(self, pattern: str, value: V) -> bool:
        """Take ``value`` (the same object) from under ``pattern``; False if it was not there.
        Branches left empty are dropped, so patterns that come and go leave nothing behind."""
        tokens, where = _path(pattern)
        path = [self._root]
        for tok in tokens:
            children = path[-1].children
            child = None if children is None else children.get(tok)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        entries: list[Any] | None = getattr(node, where)
        if entries is None:
            return False
        for i, entry in enumerate(entries):
            if entry[1] is value:
                del entries[i]
                break
        else:
            return False
        if not entries:
            setattr(node, where, None)
        self._size -= 1
        for depth in range(len(tokens), 0, -1):
            if not path[depth].empty():
                break
            parent = path[depth - 1]
            assert parent.children is not None  # it holds this node
            del parent.children[tokens[depth - 1]]
            if not parent.children:
                parent.children = None
        return True

    def match(self, subject: str) -> list[V]:
        """The values whose pattern matches ``subject``, in the order they were added."""
        tokens = subject.split(".")
        n = len(tokens)
        found: list[Any] = []
        # Each node stands for one prefix of a pattern, so it is reached at most once.
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.deep is not None:  # i == INDEXED_TOKENS: the rest is checked whole
                found.extend(e for e in node.deep if e[2](subject))
            if i == n:
                if node.ends is not None:
                    found.extend(node.ends)
                continue
            if node.rest is not None:  # ">" after this prefix: tokens[i:] is one token or more
                found.extend(node.rest)
            children = node.children
            if children is not None:
                child = children.get(tokens[i])
                if child is not None:
                    stack.append((child, i + 1))
                star = children.get("*")
                if star is not None and star is not child:  # (not a subject: "*" as a token)
                    stack.append((star, i + 1))
        if len(found) > 1:
            found.sort(key=_order)
        return [entry[1] for entry in found]
