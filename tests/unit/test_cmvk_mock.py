"""CMVK.verify / cross_check on litellm's mock_response: verdict parsing, voting, abstentions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytest

from agent_os.cmvk import CMVK, CMVKConfigError, ModelSpec
from agent_os.cmvk._client import litellm_module
from agent_os.cmvk.testing import verdict


def mock(name: str, reply: Any, weight: float = 1.0, **params: Any) -> ModelSpec:
    return ModelSpec(name, model=f"openai/{name}", weight=weight, params={"mock_response": reply, **params})


async def test_three_supporting_models_verify_with_the_reference_shape() -> None:
    cmvk = CMVK(
        [
            mock("gpt-4", verdict("supported", 0.9)),
            mock("claude-3", verdict("supported", 1.0)),
            mock("gemini-pro", verdict("supported", 0.95)),
        ]
    )
    result = await cmvk.verify(
        "What is the capital of France?", "Paris is the capital of France.", {"domain": "geography"}
    )
    assert result.verified
    assert result["verified"] is True
    assert result["model_votes"] == {"gpt-4": True, "claude-3": True, "gemini-pro": True}
    assert result["consensus"] == "unanimous"
    assert result.confidence == pytest.approx(0.95)
    assert set(result.to_dict()) >= {
        "verified",
        "confidence",
        "model_votes",
        "consensus",
        "reason",
        "details",
    }
    assert result.model_votes["gpt-4"].stats.attempts == 1
    assert result.to_dict()["prompt_tokens"] is not None


async def test_one_contradiction_blocks_at_the_default_threshold() -> None:
    cmvk = CMVK(
        [
            mock("a", verdict("supported")),
            mock("b", verdict("supported")),
            mock("c", verdict("contradicted", reason="Lyon is not the capital")),
        ]
    )
    result = await cmvk.verify("capital of France?", "Lyon")
    assert not result.verified
    assert result.consensus == "majority"
    assert result.support == pytest.approx(2 / 3)
    assert "c (contradicted: Lyon is not the capital)" in result.reason


async def test_unsure_is_an_answer_that_does_not_vouch() -> None:
    cmvk = CMVK([mock("a", verdict("supported")), mock("b", verdict("unsure"))], consensus_threshold=0.5)
    result = await cmvk.verify("q", "r")
    assert result["model_votes"] == {"a": True, "b": False}
    assert not result.verified  # majority needs more than half


async def test_unparsable_replies_are_abstentions_never_votes() -> None:
    cmvk = CMVK(
        [
            mock("a", verdict("supported")),
            mock("b", "Looks right to me!"),
            mock("c", '{"verdict": "supported"}'),
        ],
        quorum=2,
    )
    result = await cmvk.verify("q", "r")
    assert result["model_votes"] == {"a": True, "b": None, "c": None}
    assert result.model_votes["b"].abstention == "parse_error"
    assert "not JSON" in result.model_votes["b"].reason
    assert "missing" in result.model_votes["c"].reason
    assert not result.verified
    assert result.consensus == "no_quorum"
    assert "quorum not met: 1 of 3" in result.reason


async def test_provider_errors_never_verify_and_are_retried_when_transient() -> None:
    cmvk = CMVK(
        [mock("a", Exception("provider down")), mock("b", "litellm.RateLimitError")],
        quorum=1,
        retries=2,
        backoff=0.01,
    )
    result = await cmvk.verify("q", "r")
    assert not result.verified
    assert result.consensus == "no_quorum"
    for vote in result.model_votes.values():
        assert vote.abstention == "provider_error"
        assert vote.stats.attempts == 3  # first try + 2 retries
    assert "provider down" in result.model_votes["a"].reason
    assert set(result.abstentions) == {"a", "b"}


async def test_a_final_provider_error_is_not_retried() -> None:
    litellm = litellm_module()  # sets LITELLM_LOCAL_MODEL_COST_MAP before the import
    rejected = litellm.AuthenticationError(message="bad key", llm_provider="openai", model="a")
    cmvk = CMVK([mock("a", rejected)], retries=3, backoff=0.01)
    result = await cmvk.verify("q", "r")
    assert result.model_votes["a"].abstention == "provider_error"
    assert result.model_votes["a"].stats.attempts == 1
    assert result.model_votes["a"].reason.startswith("AuthenticationError")


async def test_weighted_voting_follows_the_weights() -> None:
    panel = [
        mock("strong", verdict("supported"), weight=3.0),
        mock("w1", verdict("contradicted")),
        mock("w2", verdict("contradicted")),
    ]
    weighted = await CMVK(panel, consensus_threshold=0.6, voting_strategy="weighted").verify("q", "r")
    assert weighted.verified
    assert weighted.support == pytest.approx(0.6)
    majority = await CMVK(panel, consensus_threshold=0.6, voting_strategy="majority").verify("q", "r")
    assert not majority.verified
    overridden = CMVK(panel, consensus_threshold=0.6, voting_strategy="weighted", weights={"strong": 1.0})
    assert not (await overridden.verify("q", "r")).verified


async def test_models_run_in_parallel_and_a_timeout_is_an_abstention() -> None:
    panel = [mock(n, verdict("supported"), mock_delay=0.3) for n in ("a", "b", "c")]
    panel.append(ModelSpec("slow", model="openai/slow", params={"mock_timeout": True}))
    cmvk = CMVK(panel, model_timeout=0.4, retries=0)
    await cmvk.verify("warm", "up")
    start = time.monotonic()
    result = await cmvk.verify("q", "r")
    elapsed = time.monotonic() - start
    assert result.verified
    # Each call's latency lies inside the verify call; if they add up to more than its
    # duration, the calls overlapped (sequential calls cannot), however loaded the machine.
    latencies = [v.stats.latency_s for v in result.model_votes.values()]
    assert min(latencies) >= 0.3
    assert sum(latencies) > 1.5 * elapsed
    assert elapsed < 1.0  # sequential: 3 x 0.3 s + the 0.4 s timeout = 1.3 s
    assert result.model_votes["slow"].abstention == "timeout"
    assert "abstained: slow (timeout" in result.reason


async def test_non_string_prompts_and_responses_are_serialized() -> None:
    cmvk = CMVK([mock("a", verdict("supported"))])
    result = await cmvk.verify(("analyze", 3), {"analyzed": True})
    assert result.verified


async def test_cross_check_reports_the_majority_answer_and_the_dissenter() -> None:
    cmvk = CMVK(
        [
            mock("a", "Paris is the capital of France."),
            mock("b", "The capital of France is Paris."),
            mock("c", "Lyon."),
        ],
        consensus_threshold=0.6,
    )
    result = await cmvk.cross_check("What is the capital of France?")
    assert result.verified
    assert result.majority == ["a", "b"]
    assert result.dissenters == ["c"]
    assert "Paris" in (result.majority_answer or "")
    assert result.consensus == "majority"
    assert not result.pairs["a|c"].agree
    assert result["dissenters"] == ["c"]


def test_configuration_errors_raise() -> None:
    with pytest.raises(CMVKConfigError, match="at least one"):
        CMVK([])
    with pytest.raises(CMVKConfigError, match="unique"):
        CMVK(["a", "a"])
    with pytest.raises(CMVKConfigError, match="voting_strategy"):
        CMVK(["a"], voting_strategy="plurality")  # type: ignore[arg-type]
    with pytest.raises(CMVKConfigError, match="consensus_threshold"):
        CMVK(["a"], consensus_threshold=1.5)
    with pytest.raises(CMVKConfigError, match="quorum"):
        CMVK(["a", "b"], quorum=3)
    with pytest.raises(CMVKConfigError, match="timeout"):
        CMVK(["a"], timeout=0)
    with pytest.raises(CMVKConfigError, match="weights for models not in the panel"):
        CMVK(["a"], weights={"b": 2.0})
    with pytest.raises(CMVKConfigError, match="weight"):
        ModelSpec("a", weight=0)
    assert "secret" not in repr(ModelSpec("a", api_key="secret"))


@pytest.mark.parametrize("key", ["model", "messages", "timeout", "max_retries", "num_retries", "stream"])
def test_litellm_arguments_cmvk_sets_itself_are_refused_when_built(key: str) -> None:
    # passed through, they made every call fail ("got multiple values for keyword argument"):
    # each model a silent provider_error
    with pytest.raises(CMVKConfigError, match=f"params of 'a' may not set '{key}'"):
        ModelSpec("a", params={key: 1})
    with pytest.raises(CMVKConfigError, match=f"litellm_params may not set '{key}'"):
        CMVK(["a"], litellm_params={key: 1})
    with pytest.raises(CMVKConfigError, match=f"may not set '{key}'"):
        CMVK(["a"], judge=ModelSpec("j", params={key: 1}))


def test_litellm_arguments_need_string_names_in_a_mapping() -> None:
    with pytest.raises(CMVKConfigError, match="string names"):
        ModelSpec("a", params={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(CMVKConfigError, match="mapping"):
        CMVK(["a"], litellm_params=[("temperature", 0)])  # type: ignore[arg-type]


async def test_other_litellm_arguments_reach_every_call() -> None:
    cmvk = CMVK(
        [mock("a", verdict("supported")), mock("b", verdict("supported"))],
        litellm_params={"temperature": 0.0, "max_tokens": 50},
    )
    result = await cmvk.verify("q", "r")
    assert result.verified
    assert not result.abstentions


async def test_bad_context_raises() -> None:
    with pytest.raises(CMVKConfigError, match="context"):
        await CMVK(["a"]).verify("q", "r", context=["not", "a", "dict"])  # type: ignore[arg-type]


def test_importing_cmvk_does_not_import_litellm() -> None:
    code = "import sys, agent_os.cmvk, agent_os.modules; print('litellm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class CountingEmbedder:
    """An async embedder (EMK's shape) that records its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return [[float(len(t)), 1.0] for t in texts]


async def test_cross_check_embeds_all_answers_in_one_call() -> None:
    embedder = CountingEmbedder()
    long = "Rayleigh scattering by air molecules sends blue sunlight across the whole sky."
    cmvk = CMVK(
        [mock("a", long), mock("b", long), mock("c", "The sky is green because of chlorophyll.")],
        embedder=embedder,
    )
    result = await cmvk.cross_check("Why is the sky blue?")
    assert embedder.calls == [[long, long, "The sky is green because of chlorophyll."]]
    assert result.majority == ["a", "b"]
    assert result.pairs["a|b"].method == "embedding"


def judge(agree: bool) -> ModelSpec:
    reply = json.dumps({"agree": agree, "confidence": 0.8, "reason": "judged"})
    return ModelSpec("judge", model="openai/judge", params={"mock_response": reply})


async def test_the_judge_decides_short_answers_that_only_share_numbers_in_unknown_context() -> None:
    cmvk = CMVK(["m"], judge=judge(False))
    bare = await cmvk.judge_agreement("100", "100 km", "How far is it?")
    assert (bare.method, bare.agree, bare.reason) == ("judge", False, "judged")
    assert (await cmvk.agreement("100", "100 km", "How far is it?")).agree  # the measure alone
    counted = await cmvk.judge_agreement("5 apples", "5 oranges")
    assert counted.method == "judge"
    assert not counted.agree


@pytest.mark.parametrize(
    ("a", "b", "question", "agree"),
    [
        ("42", "Forty-two.", "What is 6 times 7?", True),
        ("100 km", "62 miles", None, True),
        ("100 km", "100 miles", None, False),
        ("$5", "€5", "How much is it?", False),
    ],
)
async def test_settled_short_answers_do_not_ask_the_judge(
    a: str, b: str, question: str | None, agree: bool
) -> None:
    result = await CMVK(["m"], judge=judge(not agree)).judge_agreement(a, b, question)
    assert result.method == "canonical"
    assert result.agree is agree
