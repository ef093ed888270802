"""CMVK over the real HTTP path: litellm -> a local OpenAI-compatible server scripting each model."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict

PANEL = ("gpt-4", "claude-3", "gemini-pro")


@pytest.fixture
async def server() -> AsyncIterator[ScriptedLLMServer]:
    async with ScriptedLLMServer() as srv:
        yield srv


def panel(server: ScriptedLLMServer, names: tuple[str, ...] = PANEL, **options: Any) -> CMVK:
    specs = [ModelSpec(n, model=f"openai/{n}") for n in names]
    return CMVK(specs, api_base=server.url, api_key="test-key", **options)


async def test_the_reference_example_returns_its_documented_shape(server: ScriptedLLMServer) -> None:
    for name, conf in zip(PANEL, (0.95, 0.9, 0.97), strict=True):
        server.script(name, Reply(verdict("supported", conf, "Paris is the capital")))
    cmvk = panel(server, consensus_threshold=0.8, voting_strategy="majority", timeout=30.0)
    result = await cmvk.verify(
        prompt="What is the capital of France?",
        response="Paris is the capital of France.",
        context={"domain": "geography"},
    )
    shape = {k: result[k] for k in ("verified", "confidence", "model_votes", "consensus")}
    assert shape == {
        "verified": True,
        "confidence": pytest.approx(0.94, abs=0.01),
        "model_votes": {"gpt-4": True, "claude-3": True, "gemini-pro": True},
        "consensus": "unanimous",
    }
    # every model saw the prompt, the response and the context, fenced as data
    for req in server.requests:
        user = req.messages[-1]["content"]
        assert "What is the capital of France?" in user
        assert "Paris is the capital of France." in user
        assert '"domain": "geography"' in user
    details = result.to_dict()["details"]["gpt-4"]
    assert (details["prompt_tokens"], details["completion_tokens"]) == (20, 10)
    assert result.to_dict()["prompt_tokens"] == 60
    assert details["cost_usd"] > 0  # gpt-4 is in litellm's price list


async def test_three_models_at_200_400_600_ms_answer_in_parallel(server: ScriptedLLMServer) -> None:
    # The figure (under 700 ms) is measured by benchmarks/cmvk.py; here parallelism is
    # proved from the server's own log, which a loaded machine cannot turn into a false failure.
    for name, delay in zip(PANEL, (0.2, 0.4, 0.6), strict=True):
        server.script(name, Reply(verdict("supported"), delay=delay))
    cmvk = panel(server)
    await cmvk.verify("warm", "up")  # first litellm call sets up its HTTP client
    warm = len(server.requests)
    start = time.monotonic()
    result = await cmvk.verify("q", "r")
    elapsed = time.monotonic() - start
    assert result.verified
    calls = server.requests[warm:]
    assert sorted(r.model for r in calls) == sorted(PANEL)
    finished = [r.replied_at for r in calls]
    assert None not in finished
    # every request arrived before the first reply went out: the three calls overlapped
    assert max(r.at for r in calls) < min(f for f in finished if f is not None)
    assert elapsed < 1.0, f"took {elapsed:.3f}s; sequential calls would take 1.2s"
    latencies = [result.model_votes[n].stats.latency_s for n in PANEL]
    assert latencies == sorted(latencies)
    assert latencies[0] >= 0.2


async def test_one_model_timing_out_is_reported_and_the_others_decide(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply(verdict("supported")))
    server.script("claude-3", Reply(verdict("supported")))
    server.script("gemini-pro", Reply(verdict("supported"), delay=10))
    cmvk = panel(server, model_timeout=0.3, retries=0)
    start = time.monotonic()
    result = await cmvk.verify("q", "r")
    assert time.monotonic() - start < 2.0
    assert result.verified  # 2 of 3 answered: quorum holds, both support
    assert result["model_votes"]["gemini-pro"] is None
    assert result.model_votes["gemini-pro"].abstention == "timeout"
    assert "gemini-pro (timeout: no reply within 0.30s)" in result.reason


async def test_the_total_deadline_bounds_verify(server: ScriptedLLMServer) -> None:
    for name in PANEL:
        server.script(name, Reply(verdict("supported"), delay=10))
    cmvk = panel(server, timeout=0.5, retries=3)
    start = time.monotonic()
    result = await cmvk.verify("q", "r")
    assert time.monotonic() - start < 1.0
    assert not result.verified
    assert result.consensus == "no_quorum"
    assert {v.abstention for v in result.model_votes.values()} <= {"timeout", "deadline"}


async def test_a_500_is_retried_and_then_counts(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", [Reply(status=500), Reply(status=503), Reply(verdict("supported"))])
    server.script("claude-3", Reply(verdict("supported")))
    server.script("gemini-pro", Reply(verdict("supported")))
    result = await panel(server, retries=2, backoff=0.01).verify("q", "r")
    assert result.verified
    assert result.model_votes["gpt-4"].stats.attempts == 3
    assert server.hits("gpt-4") == 3


async def test_provider_errors_and_malformed_bodies_never_verify(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply(status=500))
    server.script("claude-3", Reply(body="{not json at all"))
    server.script("gemini-pro", Reply(status=401))
    result = await panel(server, retries=1, backoff=0.01).verify("q", "r")
    assert not result.verified
    assert result.consensus == "no_quorum"
    assert all(v.abstention == "provider_error" for v in result.model_votes.values())
    assert server.hits("gpt-4") == 2  # 5xx: retried once
    assert server.hits("gemini-pro") == 1  # 401: final


async def test_a_lone_supporter_beside_failures_is_not_enough(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply(verdict("supported")))
    server.script("claude-3", Reply(status=500))
    server.script("gemini-pro", Reply("I think the response is fine."))
    result = await panel(server, retries=0).verify("q", "r")
    assert not result.verified
    assert result["model_votes"] == {"gpt-4": True, "claude-3": None, "gemini-pro": None}
    assert result.model_votes["gemini-pro"].abstention == "parse_error"


async def test_a_contradicting_model_blocks(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply(verdict("supported")))
    server.script("claude-3", Reply(verdict("supported")))
    server.script("gemini-pro", Reply(verdict("contradicted", 0.9, "the capital is Paris, not Lyon")))
    result = await panel(server).verify("What is the capital of France?", "Lyon")
    assert not result.verified
    assert "the capital is Paris, not Lyon" in result.reason


async def test_cross_check_groups_answers_by_meaning(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply("The answer is 42."))
    server.script("claude-3", Reply("Forty-two."))
    server.script("gemini-pro", Reply("The answer is 24."))
    result = await panel(server, consensus_threshold=0.6).cross_check("What is 6 times 7?")
    assert result.verified
    assert result.majority == ["gpt-4", "claude-3"]
    assert result.dissenters == ["gemini-pro"]
    assert result.majority_answer in ("The answer is 42.", "Forty-two.")
    assert result.pairs["gpt-4|gemini-pro"].conflicts == ("number",)
    assert result.to_dict()["answers"]["claude-3"]["answer"] == "Forty-two."


async def test_cross_check_without_quorum(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply("Paris."))
    server.script("claude-3", Reply(status=500))
    server.script("gemini-pro", Reply(""))
    result = await panel(server, retries=0).cross_check("What is the capital of France?")
    assert not result.verified
    assert result.consensus == "no_quorum"
    assert result.answers["gemini-pro"].abstention == "parse_error"


def judge_reply(agree: bool) -> Reply:
    return Reply(json.dumps({"agree": agree, "confidence": 0.9, "reason": "judged"}))


async def test_a_judge_decides_for_long_answers_only(server: ScriptedLLMServer) -> None:
    long_a = (
        "Version control records every change to the code, so teams can collaborate, review history, "
        "and roll back mistakes."
    )
    long_b = (
        "It keeps a history of all changes, lets several people work on the same code base, and makes "
        "it possible to revert to an earlier version when something breaks."
    )
    server.script("gpt-4", Reply(long_a))
    server.script("claude-3", Reply(long_b))
    server.script("gemini-pro", Reply(long_b))
    server.script("judge", judge_reply(True))
    cmvk = panel(server, judge=ModelSpec("judge", model="openai/judge"), consensus_threshold=0.9)
    result = await cmvk.cross_check("Why do we use version control?")
    assert result.verified, result.reason
    assert result.consensus == "unanimous"
    assert result.pairs["gpt-4|claude-3"].method == "judge"
    assert server.hits("judge") == 2  # the two pairs with long_a; identical answers need no judge
    short = await cmvk.judge_agreement("42", "Forty-two.", "What is 6 times 7?")
    assert short.method == "canonical"
    assert server.hits("judge") == 2


async def test_a_judge_is_asked_when_short_answers_share_only_bare_numbers(server: ScriptedLLMServer) -> None:
    server.script("gpt-4", Reply("100 km."))
    server.script("claude-3", Reply("100."))
    server.script("gemini-pro", Reply("100 miles."))
    server.script("judge", judge_reply(False))
    cmvk = panel(server, judge=ModelSpec("judge", model="openai/judge"), consensus_threshold=0.6)
    result = await cmvk.cross_check("How far is the lake from here?")
    assert result.pairs["gpt-4|gemini-pro"].conflicts == ("unit",)  # settled: no judge
    assert result.pairs["gpt-4|gemini-pro"].method == "canonical"
    assert result.pairs["gpt-4|claude-3"].method == "judge"  # "100" of what?
    assert result.pairs["claude-3|gemini-pro"].method == "judge"
    assert server.hits("judge") == 2
    assert not result.verified
    assert result.consensus == "split"


async def test_a_judge_that_fails_falls_back_to_the_measure(server: ScriptedLLMServer) -> None:
    server.script("judge", Reply("they agree"))
    cmvk = panel(server, judge=ModelSpec("judge", model="openai/judge"))
    a = "A load balancer distributes incoming requests across many backend servers so no machine overloads."
    b = "It spreads incoming traffic over multiple backend servers, avoiding overload on any one of them."
    result = await cmvk.judge_agreement(a, b, "What does a load balancer do?")
    assert result.method != "judge"
    assert "judge abstained: reply is not JSON" in result.reason
    measured = await cmvk.agreement(a, b, "What does a load balancer do?")
    assert (result.score, result.agree) == (measured.score, measured.agree)


async def test_a_judge_that_sees_a_disagreement_makes_a_dissenter(server: ScriptedLLMServer) -> None:
    long_a = "Version control records every change, so teams can collaborate and roll back their mistakes."
    long_b = "Version control is mainly a backup tool that copies files to a remote server every night."
    server.script("gpt-4", Reply(long_a))
    server.script("claude-3", Reply(long_b))
    server.script("gemini-pro", Reply(long_b))
    server.script("judge", judge_reply(False))
    cmvk = panel(server, judge=ModelSpec("judge", model="openai/judge"), consensus_threshold=0.6)
    result = await cmvk.cross_check("Why do we use version control?")
    assert result.majority == ["claude-3", "gemini-pro"]
    assert result.dissenters == ["gpt-4"]
    assert result.pairs["gpt-4|claude-3"].method == "judge"
    assert result.pairs["gpt-4|claude-3"].score == pytest.approx(0.05)
