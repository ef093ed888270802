"""Do two answers say the same thing? A measure by meaning, without calling any LLM: conflicts
(numbers and units, yes/no, negation, exclusive terms, names) first, then word and embedding
similarity. The rules: ``docs/verification.md``, "Agreement by meaning".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from agent_os.cmvk._errors import CMVKConfigError
from agent_os.cmvk._text import (
    Analysis,
    analyze,
    content_stems,
    exclusive_term,
    is_yes_no_question,
    normalize,
)
from agent_os.cmvk._units import Quantity, describe, literal, same_number, same_quantity, units_named

Method = Literal["canonical", "lexical", "embedding", "judge"]


@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into vectors: ``embed(texts) -> list[list[float]]``, plain or
    ``async def``.

    Structurally compatible with the (async) embedders of the EMK module and with simple
    wrappers around sentence-transformers or ``litellm.embedding``. Vectors of one call must
    have the same length; they need not be normalized.
    """

    def embed(self, texts: Sequence[str]) -> list[list[float]] | Awaitable[list[list[float]]]: ...


async def embed(embedder: Embedder, texts: Sequence[str]) -> list[list[float]]:
    """Call a plain or async embedder; check it returned one vector per text.

    Raises ValueError when it did not; the embedder's own exceptions propagate."""
    out = embedder.embed(list(texts))
    vectors = await out if inspect.isawaitable(out) else out
    if not isinstance(vectors, list) or len(vectors) != len(texts):
        raise ValueError(f"the embedder returned {type(vectors).__name__}, not {len(texts)} vectors")
    return vectors


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    """Cosine similarity (0.0 when either vector is zero). Raises ValueError on unequal lengths."""
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return dot / (nu * nv)


@dataclass(frozen=True, slots=True)
class Agreement:
    """The agreement of two answers.

    ``score`` is in [0, 1]; ``agree`` is ``score >= threshold``; ``method`` says what decided
    (``canonical`` for short factual answers, ``lexical``/``embedding`` for longer ones,
    ``judge`` when an LLM judge did); ``conflicts`` names the conflicts found (see the module
    docstring), ``reason`` is one line for humans. ``settled`` is False when the decision
    should go to a judge if one is configured: long answers, and short ones whose only
    evidence is numbers in unknown context ("100" / "100 km").
    """

    score: float
    agree: bool
    method: Method
    conflicts: tuple[str, ...] = ()
    reason: str = ""
    settled: bool = True

    def to_dict(self) -> dict[str, object]:
        return {
            "score": round(self.score, 4),
            "agree": self.agree,
            "method": self.method,
            "conflicts": list(self.conflicts),
            "reason": self.reason,
            "settled": self.settled,
        }


def _unmatched(xs: Sequence[Quantity], ys: Sequence[Quantity]) -> list[Quantity]:
    return [x for x in xs if not any(same_quantity(x, y) for y in ys)]


def _known_context(x: Quantity, y: Quantity, question_units: frozenset[str]) -> bool:
    """Whether two matching numbers are known to count the same thing: both have a unit, or
    neither has one and the same word (or none) follows both, or the one without a unit is
    bare and the other's unit is the question's."""
    if x.unit is not None and y.unit is not None:
        return True
    if x.unit is None and y.unit is None:
        return x.context == y.context
    bare, counted = (x, y) if x.unit is None else (y, x)
    return bare.context is None and counted.unit in question_units


def _dice(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return 2 * len(a & b) / (len(a) + len(b))


@dataclass(slots=True)
class _Side:
    analysis: Analysis
    numbers: list[Quantity]  # not in the question; a context word of the question reads as None
    core: set[str]  # content stems not in the question
    polarity: str | None


@dataclass(slots=True)
class AgreementMeasure:
    """The non-LLM agreement measure (rules: ``docs/verification.md``).

    Args:
        threshold: the score at which two answers agree, in (0, 1].
        short_terms: answers with at most this many content words (outside the question's
            words) are compared canonically ("short factual answers").

    Raises CMVKConfigError for a threshold outside (0, 1] or a negative ``short_terms``.
    ``measure`` never raises on any pair of strings.
    """

    threshold: float = 0.6
    short_terms: int = 6
    _stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise CMVKConfigError(f"agreement threshold must be in (0, 1], got {self.threshold}")
        if self.short_terms < 0:
            raise CMVKConfigError("short_terms must not be negative")

    def _side(
        self,
        text: str,
        known: frozenset[str],
        q_stems: frozenset[str],
        q_numbers: list[Quantity],
        yes_no: bool,
    ) -> _Side:
        a = analyze(text, known)
        numbers = [
            replace(x, context=None) if x.context in q_stems else x
            for x in a.quantities
            if not any(literal(x, q) for q in q_numbers)
        ]
        core = a.stems - q_stems
        polarity = a.leading
        if polarity is None and yes_no:
            negates_question = bool(a.negated & q_stems) or a.dangling_negation
            polarity = "no" if negates_question else "yes"
        return _Side(a, numbers, core, polarity)

    def measure(
        self, answer_a: str, answer_b: str, question: str | None = None, *, similarity: float | None = None
    ) -> Agreement:
        """Score the agreement of two answers (optionally to ``question``). See the module
        docstring for the rules; the result's ``conflicts`` and ``reason`` say why.

        ``similarity`` is the cosine of the answers' embeddings, when an embedder is used
        (see :meth:`agent_os.cmvk.CMVK.agreement`); it is averaged with the word similarity."""
        q_stems = content_stems(question) if question else frozenset()
        q_numbers = analyze(question).quantities if question else []
        q_units = units_named(normalize(question)) if question else frozenset()
        known = q_stems | content_stems(answer_a) | content_stems(answer_b)
        yes_no = bool(question) and is_yes_no_question(question or "")
        a = self._side(answer_a, known, q_stems, q_numbers, yes_no)
        b = self._side(answer_b, known, q_stems, q_numbers, yes_no)
        if not yes_no and (a.polarity is None) != (b.polarity is None):
            # only one answer opens with yes/no: read the other one's polarity from its negations
            for side in (a, b):
                if side.polarity is None:
                    side.polarity = (
                        "no" if side.analysis.negated or side.analysis.dangling_negation else "yes"
                    )

        conflicts: list[str] = []
        details: list[str] = []
        evidence = 0.0
        firm = False  # evidence other than numbers in unknown context
        # numbers
        if a.numbers and b.numbers:
            ua, ub = _unmatched(a.numbers, b.numbers), _unmatched(b.numbers, a.numbers)
            if ua and ub:
                units = any(same_number(x.value, y.value) for x in ua for y in ub)
                conflicts.append("unit" if units else "number")
                details.append(f"{'units' if units else 'numbers'} {_fmt(ua)} vs {_fmt(ub)}")
            else:
                evidence = 1.0
                firm = any(
                    same_quantity(x, y) and _known_context(x, y, q_units)
                    for x in a.numbers
                    for y in b.numbers
                )
        # yes / no
        if a.polarity is not None and b.polarity is not None:
            if a.polarity != b.polarity:
                conflicts.append("polarity")
                details.append(f"{a.polarity} vs {b.polarity}")
            elif a.analysis.leading or b.analysis.leading or yes_no:
                evidence = 1.0
                firm = True
        # negated claims
        flipped = (a.analysis.asserted & b.analysis.negated) | (a.analysis.negated & b.analysis.asserted)
        if flipped:
            conflicts.append("negation")
            details.append(f"negated in one answer only: {', '.join(sorted(flipped))}")
        # mutually exclusive terms
        clash = self._exclusive(a.analysis.asserted, b.analysis.asserted)
        if clash:
            conflicts.append("exclusive")
            details.append(f"{clash[0]} vs {clash[1]}")
        # entities
        ea = {e for e in a.analysis.entities - q_stems if e not in b.analysis.stems}
        eb = {e for e in b.analysis.entities - q_stems if e not in a.analysis.stems}
        if ea and eb:
            conflicts.append("entity")
            details.append(f"{', '.join(sorted(ea))} vs {', '.join(sorted(eb))}")
        elif (a.analysis.entities & b.analysis.entities) - q_stems:
            evidence = max(evidence, 1.0 if not (ea or eb) else 0.5)
            firm = True
        # short answers: the core words
        short = min(len(a.core), len(b.core)) <= self.short_terms
        overlap = 0.0
        if a.core and b.core:
            shared = a.core & b.core
            overlap = len(shared) / min(len(a.core), len(b.core))
            if short and max(len(a.core), len(b.core)) <= self.short_terms and not shared and not evidence:
                conflicts.append("disjoint")
                details.append(f"no shared content: {_words(a.core)} vs {_words(b.core)}")

        sim = _dice(a.core or a.analysis.stems, b.core or b.analysis.stems)
        method: Method = "canonical" if short else "lexical"
        if similarity is not None:
            sim = (sim + max(0.0, min(1.0, similarity))) / 2
            if not short:
                method = "embedding"
        if conflicts:
            score = 0.35 * sim
            reason = "; ".join(details)
        else:
            support = max(evidence, overlap if short else 0.0, sim)
            score = 0.4 + 0.6 * support
            reason = f"no conflict; support {support:.2f}"
        score = min(1.0, max(0.0, score))
        settled = short and (bool(conflicts) or firm or not evidence)
        if short and not settled:
            reason += " (numbers in unknown context)"
        return Agreement(score, score >= self.threshold, method, tuple(conflicts), reason, settled)

    @staticmethod
    def _exclusive(xs: set[str], ys: set[str]) -> tuple[str, str] | None:
        terms_x = {t: x for x in xs if (t := exclusive_term(x)) is not None}
        terms_y = {t: y for y in ys if (t := exclusive_term(y)) is not None}
        for tx, x in sorted(terms_x.items()):
            if tx in terms_y:
                continue
            for ty, y in sorted(terms_y.items()):
                if ty[0] == tx[0] and ty not in terms_x:
                    return x, y
        return None


def _fmt(values: Sequence[Quantity]) -> str:
    return ", ".join(describe(v) for v in values)


def _words(stems: set[str]) -> str:
    return ", ".join(sorted(stems)[:5])
