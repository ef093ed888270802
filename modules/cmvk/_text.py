"""Text analysis for the agreement measure: tokens, stems, numbers with their units (see
:mod:`agent_os.cmvk._units`), negation, entities.

Everything here is deterministic and uses no model: the word lists of
:mod:`agent_os.cmvk._lexicon`, a light suffix stemmer and a number-word parser.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from functools import lru_cache

from agent_os.cmvk._lexicon import (
    AUXILIARIES,
    EXCLUSIVE_GROUPS,
    NEGATIONS,
    NEGATIVE_PREFIXES,
    NO_WORDS,
    NUMBER_SCALES,
    NUMBER_UNITS,
    NUMBER_WORDS,
    STOPWORDS,
    YES_WORDS,
)
from agent_os.cmvk._units import PREFIX_CURRENCIES, Quantity, separate, unit_at

_CONTRACTIONS = [
    (re.compile(r"\bcan['’]t\b", re.I), "cannot"),
    (re.compile(r"\bwon['’]t\b", re.I), "will not"),
    (re.compile(r"\bshan['’]t\b", re.I), "shall not"),
    (re.compile(r"n['’]t\b", re.I), " not"),
    (re.compile(r"['’](s|re|ve|ll|d|m)\b", re.I), ""),
]
_TOKEN = re.compile(
    r"(?P<cur>(?<![^\W_])(?:US|A|C)\$|[$€£¥₹])"
    r"|(?P<num>(?:(?<!\w)[-−])?(?:\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?))(?!\w)"
    r"|(?P<word>[^\W_]+)"
    r"|(?P<stop>[.;:!?]|,\s|—|–\s| - |\(|\))"
)


@dataclass(frozen=True, slots=True)
class Token:
    """One token: its lowercase text, its stem, whether it was capitalized, and the sentence
    position (0 = first word of a sentence)."""

    text: str
    stem: str
    capitalized: bool
    position: int


@dataclass(slots=True)
class Analysis:
    """What the agreement measure needs to know about one answer."""

    tokens: list[Token] = field(default_factory=list)
    clauses: list[list[Token]] = field(default_factory=list)
    quantities: list[Quantity] = field(default_factory=list)  # numbers with their units
    leading: str | None = None  # "yes" / "no" when the answer opens with one
    stems: set[str] = field(default_factory=set)  # every content stem (negated or not)
    asserted: set[str] = field(default_factory=set)  # content stems not under a negation
    negated: set[str] = field(default_factory=set)  # content stems right after a negation
    dangling_negation: bool = False  # a negation with no content word after it ("It isn't.")
    entities: set[str] = field(default_factory=set)  # stems of capitalized content words

    @property
    def numbers(self) -> list[float]:
        """The values of :attr:`quantities`."""
        return [q.value for q in self.quantities]


@lru_cache(maxsize=1024)  # an answer is normalized for its analysis and for its stems
def normalize(text: str) -> str:
    """NFKC (so "H₂O" is "H2O"), typographic quotes to ASCII, contractions expanded, units
    written apart from their numbers ("100km" -> "100 km", "$5m" -> "$5 million")."""
    text = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'")
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    return separate(text)


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A light suffix stemmer: enough to match "modifies"/"modify", "caused"/"causes",
    "postponed"/"postpone"; not a linguistic analysis."""
    w = word.lower()
    if len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("sses") or (w.endswith("es") and len(w) > 4 and w[-3] in "sxz"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    for suffix in ("ingly", "edly", "ing", "ed", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":  # "stopped" -> "stop"
                w = w[:-1]
            break
    if w.endswith("ied"):
        w = w[:-3] + "y"
    if len(w) > 4 and w.endswith("e"):
        w = w[:-1]
    if len(w) > 3 and w.endswith("y") and w[-2] not in "aeiou":
        w = w[:-1] + "i"
    return w


_EXCLUSIVE: dict[str, tuple[int, int]] = {}
for _g, _group in enumerate(EXCLUSIVE_GROUPS):
    for _t, _term in enumerate(_group.split()):
        for _form in _term.split("/"):
            _EXCLUSIVE.setdefault(stem(_form), (_g, _t))


def exclusive_term(stem_: str) -> tuple[int, int] | None:
    """``(group, term)`` of a stem in the mutually exclusive groups, if it is in one."""
    return _EXCLUSIVE.get(stem_)


def _parse_number(text: str) -> float:
    return float(text.replace(",", "").replace("−", "-"))


def _words_to_numbers(words: list[str]) -> list[float]:
    """Parse runs of number words ("three hundred and sixty-six") into values."""
    values: list[float] = []
    total = current = 0
    active = False
    for i, w in enumerate(words):
        if w in NUMBER_UNITS:
            current += NUMBER_UNITS[w]
            active = True
        elif w in NUMBER_SCALES and (active or (i > 0 and words[i - 1] == "a")):
            scale = NUMBER_SCALES[w]
            if scale == 100:
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * scale
                current = 0
            active = True
        elif w == "and" and active and i > 0 and words[i - 1] in NUMBER_SCALES:
            continue
        else:
            if active:
                values.append(float(total + current))
            total = current = 0
            active = False
    if active:
        values.append(float(total + current))
    return values


def analyze(text: str, question_stems: frozenset[str] = frozenset()) -> Analysis:
    """Tokenize and analyse one answer. ``question_stems`` are used to read "unsafe" as
    "not safe" when "safe" occurs in the question.

    A number is read from digits ("2,100,000", "2.1 million", "$5bn") or words ("three hundred
    and sixty-six"), with its unit (see :mod:`agent_os.cmvk._units`); a unit is part of the number, not
    a content word. A number without a unit records the content word right after it as its
    context ("8 legs")."""
    out = Analysis()
    text = normalize(text)
    clause: list[Token] = []
    position = 0
    run: list[str] = []  # consecutive number words: "three hundred and sixty six"
    digit: float | None = None  # a digit number, waiting to see whether "million" follows
    prefix: str | None = None  # the currency symbol read before ``digit``
    currency: str | None = None  # a currency symbol waiting for its number
    end = 0  # where the number being read ends in ``text``
    waiting: int | None = None  # a unitless quantity waiting for its context word

    def close() -> int | None:
        """End the number being read: read its unit; return where the unit ends, if any."""
        nonlocal digit, prefix, waiting
        values = [digit] if digit is not None else _words_to_numbers(run)
        run.clear()
        digit = None
        if not values:
            return None
        unit, unit_end = unit_at(text, end, prefix)
        prefix = None
        out.quantities.extend(Quantity(v) for v in values[:-1])
        out.quantities.append(Quantity(values[-1], unit))
        waiting = len(out.quantities) - 1 if unit is None else None
        return unit_end if unit_end > end else None

    pos = 0
    while (m := _TOKEN.search(text, pos)) is not None:
        pos = m.end()
        kind, raw = m.lastgroup, m.group()
        low = raw.lower() if kind == "word" else ""
        if digit is not None and low in NUMBER_SCALES:
            digit *= NUMBER_SCALES[low]
            end = pos
            continue
        if low in NUMBER_WORDS or (low == "and" and run):
            if digit is not None:
                close()
            run.append(low)
            if low != "and":
                end = pos
            position += 1
            continue
        if digit is not None or run:
            unit_end = close()
            if unit_end is not None:  # the unit is this token (or ends before it: "52%")
                pos = unit_end
                continue
        if waiting is not None:
            if low and low not in STOPWORDS and low not in NEGATIONS:
                out.quantities[waiting] = replace(out.quantities[waiting], context=stem(low))
            waiting = None
        if kind == "cur":
            currency = PREFIX_CURRENCIES[raw]
            continue
        if kind == "num":
            digit, prefix, currency = _parse_number(raw), currency, None
            end = pos
            position += 1
            continue
        currency = None
        if kind == "stop":
            if clause:
                out.clauses.append(clause)
                clause = []
            if raw in ".!?":
                position = 0
            continue
        tok = Token(low, stem(low), raw[0].isupper(), position)
        position += 1
        out.tokens.append(tok)
        clause.append(tok)
    close()
    if clause:
        out.clauses.append(clause)

    if out.tokens and (out.tokens[0].text in YES_WORDS or out.tokens[0].text in NO_WORDS):
        first = out.tokens[0].text
        # "No, ..." is an answer; "No one knows" / "True enough" are not treated specially
        out.leading = "yes" if first in YES_WORDS else "no"
    for ci, cl in enumerate(out.clauses):
        negate_next = False
        for ti, tok in enumerate(cl):
            if ci == 0 and ti == 0 and out.leading is not None:
                continue
            if tok.text in NEGATIONS:
                negate_next = True
                continue
            if tok.text in STOPWORDS:
                continue
            s = tok.stem
            base = _strip_negative_prefix(tok.text, question_stems)
            if base is not None:
                out.stems.add(base)
                out.negated.add(base)
                negate_next = False
                continue
            out.stems.add(s)
            if tok.capitalized and len(tok.text) > 1 and s not in YES_WORDS | NO_WORDS:
                out.entities.add(s)
            if negate_next:
                out.negated.add(s)
                negate_next = False
            else:
                out.asserted.add(s)
        if negate_next:
            out.dangling_negation = True
    return out


def _strip_negative_prefix(word: str, known: frozenset[str]) -> str | None:
    """``"unsafe"`` -> ``"safe"`` when ``safe`` is a known stem (from the question or the
    other answer); otherwise None. Only then is the prefix read as a negation, so
    "interest" is never "not terest"."""
    for prefix in NEGATIVE_PREFIXES:
        if word.startswith(prefix) and len(word) - len(prefix) >= 3:
            rest = stem(word[len(prefix) :].lstrip("-"))
            if rest in known:
                return rest
    return None


def content_stems(text: str) -> frozenset[str]:
    """Stems of the content words of ``text`` (no stopwords, negations or number words)."""
    stems = set()
    for m in _TOKEN.finditer(normalize(text)):
        word = m.group("word")
        if word is None:
            continue
        low = word.lower()
        if low in STOPWORDS or low in NEGATIONS or low in NUMBER_WORDS:
            continue
        stems.add(stem(low))
    return frozenset(stems)


def is_yes_no_question(question: str) -> bool:
    """Whether ``question`` asks for a yes or a no ("Is it safe?", "Can penguins fly?")."""
    m = re.match(r"\s*([A-Za-z']+)", question)
    return m is not None and m.group(1).lower() in AUXILIARIES and " or " not in question.lower()
