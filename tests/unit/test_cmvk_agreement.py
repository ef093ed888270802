"""The non-LLM agreement measure: the labelled set, the issue's counter-examples, robustness."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_os.cmvk import CMVK, AgreementMeasure, CMVKConfigError, Embedder
from agent_os.cmvk._text import analyze
from tests.support.embedders import HashingEmbedder

PAIRS = Path(__file__).resolve().parents[1] / "data" / "cmvk_pairs.jsonl"


def load_pairs() -> list[dict[str, object]]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


async def accuracy(cmvk: CMVK) -> tuple[float, list[int]]:
    """Accuracy of ``cmvk.agreement`` (no LLM is called) on the labelled pairs."""
    pairs = load_pairs()
    wrong = []
    for p in pairs:
        question = p["question"] if isinstance(p["question"], str) else None
        if (await cmvk.agreement(str(p["a"]), str(p["b"]), question)).agree != p["agree"]:
            wrong.append(int(str(p["id"])))
    return 1 - len(wrong) / len(pairs), wrong


class AsyncHashingEmbedder(HashingEmbedder):
    """The same vectors from an ``async def embed``, as EMK's embedders have."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:  # type: ignore[override]
        return HashingEmbedder.embed(self, texts)


class BrokenEmbedder:
    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise RuntimeError("model not loaded")


def test_the_labelled_set_is_large_and_balanced() -> None:
    pairs = load_pairs()
    assert len(pairs) >= 60
    agree = sum(1 for p in pairs if p["agree"])
    assert 0.35 < agree / len(pairs) < 0.65
    assert len({p["id"] for p in pairs}) == len(pairs)
    categories = {p["category"] for p in pairs}
    assert {"paraphrase", "negation", "swapped_number", "swapped_entity", "contradiction"} <= categories
    assert {"unit_mismatch", "unit_equivalent"} <= categories


async def test_accuracy_on_the_labelled_set_without_embeddings() -> None:
    acc, wrong = await accuracy(CMVK(["unused"]))
    assert acc >= 0.9, f"accuracy {acc:.2f}, wrong: {wrong}"


@pytest.mark.parametrize("embedder", [HashingEmbedder(), AsyncHashingEmbedder()], ids=["plain", "async"])
async def test_accuracy_on_the_labelled_set_with_a_deterministic_embedder(embedder: Embedder) -> None:
    assert isinstance(embedder, Embedder)
    acc, wrong = await accuracy(CMVK(["unused"], embedder=embedder))
    assert acc >= 0.9, f"accuracy {acc:.2f}, wrong: {wrong}"


async def test_the_embedding_similarity_moves_the_score_of_long_answers() -> None:
    a = "Version control records every change, so teams can collaborate and roll back mistakes."
    b = "It keeps a history of all changes and lets several people work on one code base."
    plain = await CMVK(["m"]).agreement(a, b)
    embedded = await CMVK(["m"], embedder=AsyncHashingEmbedder()).agreement(a, b)
    assert embedded.method == "embedding"
    assert plain.method == "lexical"
    assert embedded.score != plain.score


async def test_a_failing_embedder_degrades_to_the_measure() -> None:
    cmvk = CMVK(["m"], embedder=BrokenEmbedder())
    result = await cmvk.agreement("The answer is 42.", "The answer is 24.")
    assert not result.agree
    assert "embedder failed: RuntimeError: model not loaded" in result.reason


@pytest.mark.parametrize(
    ("a", "b", "question", "conflict"),
    [
        ("The answer is 42.", "The answer is 24.", None, "number"),
        ("Yes, it is safe", "No, it is not safe", None, "polarity"),
        ("The drug is safe for children.", "The drug is not safe for children.", None, "negation"),
        ("Prices rose last year.", "Prices fell last year.", None, "exclusive"),
        ("Paris is the capital of France.", "Lyon is the capital of France.", None, "entity"),
        ("Canberra", "Sydney", "What is the capital of Australia?", "disjoint"),
        ("100 km", "100 miles", None, "unit"),
        ("every 4 hours", "every 4 days", "How often should I take it?", "unit"),
        ("Take 5 mg.", "Take 5 g.", None, "unit"),
        ("5 million dollars", "5 million euros", None, "unit"),
        ("$5", "€5", "How much is it?", "unit"),
        ("The rate is 5%.", "The rate is 5 percentage points.", None, "unit"),
        ("It opens at 9 am.", "It opens at 9 pm.", None, "unit"),
        ("$5 million", "$5 billion", None, "number"),
    ],
)
def test_what_difflib_calls_agreement_is_a_disagreement_here(
    a: str, b: str, question: str | None, conflict: str
) -> None:
    result = AgreementMeasure().measure(a, b, question)
    assert not result.agree
    assert conflict in result.conflicts
    assert result.score <= 0.35


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("5 million", "5,000,000"),
        ("$5", "5 dollars"),
        ("$5 million", "5,000,000 USD"),
        ("€2.1bn", "2.1 billion euros"),
        ("$5m", "five million dollars"),
        ("500 cents", "$5"),
        ("100km", "100 kilometres"),
        ("100 km", "62 miles"),
        ("1 hour", "60 minutes"),
        ("every 6 hours", "every six hours"),
        ("100 °C", "212 °F"),
        ("2 kg", "2000 g"),
        ("It got 52%.", "52 percent"),
        ("60 km/h", "60 kilometres per hour"),
        ("$20 per hour", "20 dollars an hour"),
        ("1 GB", "1024 MB"),
        ("3 pounds", "£3"),
    ],
)
def test_equivalent_units_agree_and_settle(a: str, b: str) -> None:
    result = AgreementMeasure().measure(a, b)
    assert result.agree, result.reason
    assert result.conflicts == ()
    assert result.settled
    assert AgreementMeasure().measure(b, a).agree


@pytest.mark.parametrize(
    ("a", "b", "question", "settled"),
    [
        ("100", "100 km", None, False),  # what the bare 100 counts is unknown
        ("100", "100 km", "How far is it?", False),
        ("135", "It is 135 km.", "How many kilometres is it to Rouen?", True),  # the question says
        ("5 apples", "5 oranges", None, False),
        ("About 2.1 million people.", "2,100,000 inhabitants", "What is the population?", False),
        ("A spider has eight legs.", "8", "How many legs does a spider have?", True),
        ("The answer is 42.", "Forty-two.", "What is 6 times 7?", True),
        ("100 km", "100 kilometres", None, True),
        ("100 km", "100 miles", None, True),  # a conflict is a decision
        ("Yes, 100 of them.", "Yes, 100.", "Did you ship them?", True),  # the yes decides too
    ],
)
def test_matching_numbers_in_unknown_context_are_not_settled(
    a: str, b: str, question: str | None, settled: bool
) -> None:
    result = AgreementMeasure().measure(a, b, question)
    assert result.method == "canonical"
    assert result.settled is settled, result.reason
    assert result.to_dict()["settled"] is settled
    if not settled:
        assert result.agree
        assert "numbers in unknown context" in result.reason


def test_long_answers_are_never_settled_by_the_measure() -> None:
    a = "Version control records every change, so teams can collaborate and roll back mistakes."
    b = "It keeps a history of all changes and lets several people work on one code base."
    assert not AgreementMeasure().measure(a, b).settled


@pytest.mark.parametrize(
    ("text", "quantities"),
    [
        ("100 km", [(100.0, "km")]),
        ("100km and 62 mi", [(100.0, "km"), (62.0, "mi")]),
        ("every four hours", [(4.0, "h")]),
        ("$5 million", [(5_000_000.0, "USD")]),
        ("US$5m", [(5_000_000.0, "USD")]),
        ("5,000,000 euros", [(5_000_000.0, "EUR")]),
        ("It got 52%.", [(52.0, "percent")]),
        ("52 per cent", [(52.0, "percent")]),
        ("zero degrees Celsius", [(0.0, "C")]),
        ("50 mph", [(50.0, "mi/h")]),
        ("9.81 m/s", [(9.81, "m/s")]),
        ("$20 per hour", [(20.0, "USD/h")]),
        ("3 times per day", [(3.0, None)]),
        ("the 1990s", []),  # "1990s" is a word, as before
        ("A spider has 8 legs", [(8.0, None)]),
        ("5G and 4K", []),
    ],
)
def test_units_are_read_with_their_numbers(text: str, quantities: list[tuple[float, str | None]]) -> None:
    assert [(q.value, q.unit) for q in analyze(text).quantities] == quantities


def test_a_unitless_number_keeps_the_word_after_it_as_context() -> None:
    assert [q.context for q in analyze("A spider has 8 legs, not 6.").quantities] == ["leg", None]
    assert analyze("8 km").quantities[0].context is None
    # a unit is part of the number, not a content word
    assert "km" not in analyze("It is 8 km away").stems


def test_what_difflib_calls_disagreement_is_an_agreement_here() -> None:
    result = AgreementMeasure().measure("Paris is the capital of France", "The capital of France is Paris")
    assert result.agree
    assert result.score == 1.0
    assert result.conflicts == ()


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("forty-two", [42.0]),
        ("three hundred and sixty-six days", [366.0]),
        ("About 2.1 million people", [2_100_000.0]),
        ("2,100,000 inhabitants", [2_100_000.0]),
        ("It got 52%.", [52.0]),
        ("one thousand two hundred", [1200.0]),
        ("Germany beat Brazil 7-1", [7.0, 1.0]),
        ("−3.5 degrees", [-3.5]),
        ("no numbers here", []),
    ],
)
def test_numbers_are_read_from_digits_and_words(text: str, numbers: list[float]) -> None:
    assert analyze(text).numbers == numbers


def test_a_prefix_negation_counts_only_when_the_base_word_is_known() -> None:
    assert analyze("It is unsafe", frozenset({"safe"})).negated == {"safe"}
    assert analyze("It is unsafe").asserted == {"unsaf"}
    assert analyze("an informal talk", frozenset({"talk"})).negated == set()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80), st.one_of(st.none(), st.text(max_size=40)))
def test_any_pair_of_strings_gets_a_symmetric_score_in_range(a: str, b: str, q: str | None) -> None:
    m = AgreementMeasure()
    ab, ba = m.measure(a, b, q), m.measure(b, a, q)
    assert 0.0 <= ab.score <= 1.0
    assert ab.agree == ba.agree
    assert ab.score == pytest.approx(ba.score)
    assert ab.agree == (ab.score >= m.threshold)


_UNITISH = st.sampled_from(
    [
        "5",
        "100",
        "2.5",
        "1,000",
        "$",
        "€",
        "US$",
        "km",
        "miles",
        "%",
        "million",
        "bn",
        "m",
        "per",
        "hour",
        "/",
        "h",
        "°C",
        "°F",
        "five",
        "and",
        "a",
        "an",
        "day",
        "pounds",
        "£",
        "5km",
        "$5m",
        "Yes",
        "not",
        ".",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_UNITISH, max_size=8), st.lists(_UNITISH, max_size=8))
def test_numbers_with_units_get_a_symmetric_score(xs: list[str], ys: list[str]) -> None:
    m = AgreementMeasure()
    a, b = " ".join(xs), " ".join(ys)
    ab, ba = m.measure(a, b), m.measure(b, a)
    assert ab.agree == ba.agree
    assert ab.score == pytest.approx(ba.score)
    assert ab.settled == ba.settled


def test_an_answer_agrees_with_itself() -> None:
    for p in load_pairs():
        assert AgreementMeasure().measure(str(p["a"]), str(p["a"]), p["question"]).agree  # type: ignore[arg-type]


async def test_cmvk_agreement_uses_its_configured_threshold() -> None:
    a, b = "Plants make sugar from light.", "Photosynthesis turns light into chemical energy in plants."
    lenient = await CMVK(["m"], agreement_threshold=0.5).agreement(a, b)
    strict = await CMVK(["m"], agreement_threshold=0.95).agreement(a, b)
    assert lenient.score == strict.score
    assert lenient.agree
    assert not strict.agree
    assert lenient.to_dict()["method"] in ("canonical", "lexical")


async def test_bad_configuration_and_arguments_raise() -> None:
    with pytest.raises(CMVKConfigError):
        AgreementMeasure(threshold=0.0)
    with pytest.raises(CMVKConfigError):
        AgreementMeasure(short_terms=-1)
    with pytest.raises(CMVKConfigError):
        await CMVK(["m"]).agreement("a", 42)  # type: ignore[arg-type]
