from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_os.amb.errors import ConfigError
from agent_os.amb.filters import compile_filter
from agent_os.amb.subjects import matches, validate_pattern, validate_subject


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b", "a.b", True),
        ("*", "a", True),
        (">", "a.b.c", True),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.d", False),
    ],
)
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a*"])
def test_invalid_subjects(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_subject(bad)


@pytest.mark.parametrize("bad", ["", "a.>.b", "a*.b", "a.b>", "a..b"])
def test_invalid_patterns(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_pattern(bad)


token = st.text(alphabet="abc", min_size=1, max_size=2)


def reference(pattern: str, subject: str) -> bool:
    """An independent regex translation of the wildcard rules."""
    parts = [{"*": r"[^.]+", ">": r".+"}.get(tok, re.escape(tok)) for tok in pattern.split(".")]
    return re.fullmatch(r"\.".join(parts), subject) is not None


@given(
    st.lists(st.one_of(token, st.just("*")), min_size=1, max_size=4).map(".".join)
    | st.lists(token, min_size=0, max_size=3).map(lambda t: ".".join([*t, ">"])),
    st.lists(token, min_size=1, max_size=5).map(".".join),
)
def test_matches_agrees_with_a_regex_reference(pattern: str, subject: str) -> None:
    assert matches(pattern, subject) is reference(pattern, subject)


def test_dict_filter_conditions() -> None:
    f = compile_filter({"priority": ["high", "urgent"], "user.role": "admin", "size": lambda s: s > 10})
    assert f is not None
    assert f({"priority": "high", "user": {"role": "admin"}, "size": 11})
    assert not f({"priority": "low", "user": {"role": "admin"}, "size": 11})
    assert not f({"priority": "high", "user": {"role": "guest"}, "size": 11})
    assert not f({"priority": "high", "user": "admin", "size": 11})
    assert not f({"priority": "high", "user": {"role": "admin"}})
    assert not f(["not", "a", "dict"])


def test_predicate_filter_and_none() -> None:
    assert compile_filter(None) is None
    f = compile_filter(lambda m: m == 3)
    assert f is not None
    assert f(3)
    assert not f(4)


@pytest.mark.parametrize("bad", [{}, {"": 1}, {"a..b": 1}, "priority", 5])
def test_invalid_filters(bad: object) -> None:
    with pytest.raises(ConfigError):
        compile_filter(bad)  # type: ignore[arg-type]
