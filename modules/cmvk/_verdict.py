"""The prompts sent to the models and the strict parsers for what they send back: a reply that
is not exactly the verdict (or judge) JSON object raises :class:`VerdictParseError` and the model
abstains. The schemas: ``docs/verification.md``, "Verdicts".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from agent_os.cmvk._errors import VerdictParseError

Verdict = Literal["supported", "contradicted", "unsure"]
VERDICTS: Final = ("supported", "contradicted", "unsure")
MAX_REASON: Final = 500

VERIFY_SYSTEM: Final = (
    "You are a strict fact checker. You are given a PROMPT, a RESPONSE that some assistant gave "
    "to it, and optional CONTEXT. Decide whether the RESPONSE is correct and faithful as an "
    "answer to the PROMPT.\n"
    'Reply with exactly one JSON object and nothing else: {"verdict": "supported" | '
    '"contradicted" | "unsure", "confidence": <number from 0 to 1>, "reason": "<one short line>"}.\n'
    '"supported": the response is correct; "contradicted": it is wrong or contains a false claim; '
    '"unsure": you cannot tell.'
)
ANSWER_SYSTEM: Final = (
    "Answer the question directly and concisely, in one or two sentences, without preamble."
)
JUDGE_SYSTEM: Final = (
    "You compare two answers to the same question. Decide whether they state the same thing "
    "(paraphrases agree; different numbers, names, or a negation disagree).\n"
    'Reply with exactly one JSON object and nothing else: {"agree": true | false, '
    '"confidence": <number from 0 to 1>, "reason": "<one short line>"}.'
)

_FENCE = re.compile(r"\A```(?:json)?\s*\n?(?P<body>.*?)\n?```\Z", re.S)


@dataclass(frozen=True, slots=True)
class ParsedVerdict:
    verdict: Verdict
    confidence: float
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedJudgement:
    agree: bool
    confidence: float
    reason: str


def _block(tag: str, text: str) -> str:
    # The texts are data, not instructions: fence them so a response cannot close its block.
    safe = text.replace("<<<", "< < <").replace(">>>", "> > >")
    return f"{tag}:\n<<<\n{safe}\n>>>"


def verify_messages(prompt: str, response: str, context: dict[str, Any] | None) -> list[dict[str, str]]:
    """The chat messages asking a model for a verdict."""
    parts = [_block("PROMPT", prompt), _block("RESPONSE", response)]
    if context:
        parts.append(_block("CONTEXT", json.dumps(context, ensure_ascii=False, default=str, sort_keys=True)))
    return [{"role": "system", "content": VERIFY_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def answer_messages(prompt: str, context: dict[str, Any] | None) -> list[dict[str, str]]:
    """The chat messages asking a model to answer ``prompt`` (generation mode)."""
    content = prompt
    if context:
        content += "\n\n" + _block("CONTEXT", json.dumps(context, ensure_ascii=False, default=str))
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": content}]


def judge_messages(question: str | None, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages asking a judge whether two answers agree."""
    parts = [
        _block("QUESTION", question or "(not given)"),
        _block("ANSWER A", answer_a),
        _block("ANSWER B", answer_b),
    ]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def _object(text: str | None, keys: set[str]) -> dict[str, Any]:
    if not isinstance(text, str) or not text.strip():
        raise VerdictParseError("empty reply")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group("body").strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise VerdictParseError(f"reply is not JSON: {exc.msg} at {exc.pos}") from None
    except ValueError as exc:  # e.g. integers with too many digits
        raise VerdictParseError(f"reply is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise VerdictParseError(f"reply is a JSON {type(obj).__name__}, not an object")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        raise VerdictParseError(f"wrong keys (missing {missing}, unexpected {extra})")
    return obj


def _confidence(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VerdictParseError(f"confidence must be a number, got {type(value).__name__}")
    conf = float(value)
    if not 0.0 <= conf <= 1.0:  # also rejects NaN
        raise VerdictParseError(f"confidence {value!r} is outside [0, 1]")
    return conf


def _reason(value: object) -> str:
    if not isinstance(value, str):
        raise VerdictParseError("reason must be a string")
    reason = value.strip()
    if "\n" in reason or len(reason) > MAX_REASON:
        raise VerdictParseError(f"reason must be one line of at most {MAX_REASON} characters")
    return reason


def parse_verdict(text: str | None) -> ParsedVerdict:
    """Parse a verdict reply strictly (schema: ``docs/verification.md``, "Verdicts").

    Raises VerdictParseError naming what is wrong."""
    obj = _object(text, {"verdict", "confidence", "reason"})
    verdict = obj["verdict"]
    if verdict not in VERDICTS:
        raise VerdictParseError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    return ParsedVerdict(verdict, _confidence(obj["confidence"]), _reason(obj["reason"]))


def parse_judgement(text: str | None) -> ParsedJudgement:
    """Parse a judge reply strictly. Raises VerdictParseError naming what is wrong."""
    obj = _object(text, {"agree", "confidence", "reason"})
    if not isinstance(obj["agree"], bool):
        raise VerdictParseError("agree must be true or false")
    return ParsedJudgement(obj["agree"], _confidence(obj["confidence"]), _reason(obj["reason"]))


def parse_answer(text: str | None) -> str:
    """An answer in generation mode: any non-empty text. Raises VerdictParseError when empty."""
    if not isinstance(text, str) or not text.strip():
        raise VerdictParseError("empty answer")
    return text.strip()
