"""The non-LLM agreement measure: the labelled set, the issue's counter-examples, robustness."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmvk import CMVK, AgreementMeasure, CMVKConfigError, Embedder
from cmvk._text import analyze

PAIRS = Path(__file__).resolve().parents[1] / "data" / "cmvk_pairs.jsonl"


def load_pairs() -> list[dict[str, object]]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


class HashingEmbedder:
    """Deterministic character-trigram hashing embedder (no model), for tests."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * self.dim
            padded = f"  {text.lower()}  "
            for i in range(len(padded) - 2):
                h = int.from_bytes(hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest(), "big")
                vec[h % self.dim] += 1.0 if h & 1 << 31 else -1.0
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return out


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
    ],
)
def test_what_difflib_calls_agreement_is_a_disagreement_here(
    a: str, b: str, question: str | None, conflict: str
) -> None:
    result = AgreementMeasure().measure(a, b, question)
    assert not result.agree
    assert conflict in result.conflicts
    assert result.score <= 0.35


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
