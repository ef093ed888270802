"""Strict parsing of model verdicts and judgements: anything off-schema is rejected."""

from __future__ import annotations

import json

import pytest

from agent_os.cmvk import VerdictParseError, parse_judgement, parse_verdict


def test_a_well_formed_verdict_parses() -> None:
    v = parse_verdict('{"verdict": "contradicted", "confidence": 0.75, "reason": "Lyon is not the capital"}')
    assert (v.verdict, v.confidence, v.reason) == ("contradicted", 0.75, "Lyon is not the capital")


def test_a_json_fence_around_the_whole_reply_is_tolerated() -> None:
    v = parse_verdict('```json\n{"verdict": "supported", "confidence": 1, "reason": "ok"}\n```')
    assert v.verdict == "supported"
    assert v.confidence == 1.0


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (None, "empty"),
        ("", "empty"),
        ("Yes, the response is correct.", "not JSON"),
        ('Sure! {"verdict": "supported", "confidence": 0.9, "reason": "ok"}', "not JSON"),
        ('["supported", 0.9, "ok"]', "not an object"),
        ('{"verdict": "supported", "confidence": 0.9}', "missing ['reason']"),
        ('{"verdict": "supported", "confidence": 0.9, "reason": "ok", "notes": "x"}', "unexpected ['notes']"),
        ('{"verdict": "true", "confidence": 0.9, "reason": "ok"}', "verdict must be one of"),
        ('{"verdict": "Supported", "confidence": 0.9, "reason": "ok"}', "verdict must be one of"),
        ('{"verdict": "supported", "confidence": true, "reason": "ok"}', "must be a number"),
        ('{"verdict": "supported", "confidence": "0.9", "reason": "ok"}', "must be a number"),
        ('{"verdict": "supported", "confidence": 1.5, "reason": "ok"}', "outside [0, 1]"),
        ('{"verdict": "supported", "confidence": NaN, "reason": "ok"}', "outside [0, 1]"),
        ('{"verdict": "supported", "confidence": 0.9, "reason": 3}', "reason must be a string"),
        ('{"verdict": "supported", "confidence": 0.9, "reason": "two\\nlines"}', "one line"),
        (json.dumps({"verdict": "supported", "confidence": 0.9, "reason": "x" * 501}), "one line"),
    ],
)
def test_an_off_schema_reply_is_rejected_with_its_reason(reply: str | None, why: str) -> None:
    with pytest.raises(VerdictParseError, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_verdict(reply)


def test_judgement_parsing_is_just_as_strict() -> None:
    j = parse_judgement('{"agree": false, "confidence": 0.8, "reason": "different years"}')
    assert (j.agree, j.confidence) == (False, 0.8)
    with pytest.raises(VerdictParseError, match="agree must be true or false"):
        parse_judgement('{"agree": "yes", "confidence": 0.8, "reason": "x"}')
    with pytest.raises(VerdictParseError, match="wrong keys"):
        parse_judgement('{"verdict": "supported", "confidence": 0.8, "reason": "x"}')
