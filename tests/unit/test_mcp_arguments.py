"""McpTools' check of a tool's arguments against the server's input schema: the server's regexes
run on RE2, so a pathological pattern costs linear time on the model's arguments instead of
blocking the event loop in Python's backtracking ``re``; otherwise verdicts are jsonschema's."""

from __future__ import annotations

import time
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema")

from agent_os.control_plane.actions.mcp import McpError, _arguments_check  # noqa: E402

# Python's re takes about 2**n steps to refuse "a" * n + "!" against these: n = 28 is tens of
# seconds there, microseconds on RE2.
NESTED = "^(a+)+$"
EVIL = "a" * 28 + "!"


def _timed(check: Any, arguments: dict[str, Any]) -> tuple[float, str | None]:
    start = time.perf_counter()
    try:
        check(arguments)
        error = None
    except McpError as exc:
        error = str(exc)
    return time.perf_counter() - start, error


def test_a_pathological_pattern_is_refused_in_linear_time() -> None:
    check = _arguments_check(
        {"type": "object", "properties": {"s": {"type": "string", "pattern": NESTED}}}, "t/x"
    )
    took, error = _timed(check, {"s": EVIL})
    assert error is not None
    assert "does not match" in error
    assert took < 1.0
    assert _timed(check, {"s": "aaaa"})[1] is None


def test_pattern_properties_and_additional_properties_match_by_re2() -> None:
    schema = {
        "type": "object",
        "properties": {"plain": {"type": "string"}},
        "patternProperties": {"^(b+)+$": {"type": "integer"}},
        "additionalProperties": False,
    }
    check = _arguments_check(schema, "t/x")
    took, error = _timed(check, {"b" * 28 + "!": 1})
    assert error is not None
    assert "additional properties are not allowed" in error
    assert took < 1.0
    assert _timed(check, {"bbb": 3, "plain": "p"})[1] is None
    wrong = _timed(check, {"bbb": "three"})[1]
    assert wrong is not None
    assert "bbb" in wrong  # the pattern property's own schema applies
    typed = _arguments_check({"type": "object", "additionalProperties": {"type": "integer"}}, "t/y")
    assert _timed(typed, {"n": 1})[1] is None
    assert _timed(typed, {"n": "one"})[1] is not None


@pytest.mark.parametrize(
    ("pattern", "text"),
    [("^[a-z]+$", "abc"), ("^[a-z]+$", "ab1"), ("\\d{3}", "x123"), ("^$", ""), ("é+", "café")],
)
def test_verdicts_are_those_of_jsonschema(pattern: str, text: str) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
    expected = jsonschema.Draft202012Validator(schema).is_valid({"s": text})
    assert (_timed(_arguments_check(schema, "t/x"), {"s": text})[1] is None) == expected


def test_a_regex_re2_cannot_run_fails_the_call_clearly() -> None:
    check = _arguments_check({"type": "object", "properties": {"s": {"pattern": "(a)\\1"}}}, "t/x")
    error = _timed(check, {"s": "aa"})[1]
    assert error is not None
    assert "t/x has an input schema regex that is refused" in error
