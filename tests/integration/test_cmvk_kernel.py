"""kernel.add_module(cmvk): a registered agent's result is verified before it is returned."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.control_plane import KernelSpace, VerificationFailed


def fact_checker(body: dict[str, Any]) -> Reply:
    """A model that knows one fact: the capital of France is Paris."""
    user = body["messages"][-1]["content"]
    response = user.split("RESPONSE:", 1)[1]
    if "Paris" in response:
        return Reply(verdict("supported", 0.95, "Paris is the capital"))
    return Reply(verdict("contradicted", 0.9, "the capital of France is Paris"))


@pytest.fixture
async def kernel() -> AsyncIterator[tuple[KernelSpace, ScriptedLLMServer]]:
    async with ScriptedLLMServer({n: fact_checker for n in ("gpt-4", "claude-3", "gemini-pro")}) as llm:
        cmvk = CMVK(
            [ModelSpec(n, model=f"openai/{n}") for n in ("gpt-4", "claude-3", "gemini-pro")],
            consensus_threshold=0.8,
            api_base=llm.url,
            api_key="k",
        )
        k = KernelSpace(policy="strict")
        k.add_module(cmvk)
        yield k, llm


async def test_a_verified_result_is_returned_and_recorded(
    kernel: tuple[KernelSpace, ScriptedLLMServer],
) -> None:
    k, llm = kernel

    @k.register
    async def geography_agent(query: str) -> str:
        return "Paris is the capital of France."

    assert await geography_agent("What is the capital of France?") == "Paris is the capital of France."
    assert llm.hits("gpt-4") == 1
    records = await k.recorder.query(event_type="verification")
    assert [r.data["decision"] for r in records] == ["allow"]
    assert records[0].data["module"] == "CMVK"
    assert records[0].data["confidence"] == pytest.approx(0.95)


async def test_an_unverified_result_is_blocked_and_recorded(
    kernel: tuple[KernelSpace, ScriptedLLMServer],
) -> None:
    k, _ = kernel

    @k.register
    async def confused_agent(query: str) -> str:
        return "Lyon is the capital of France."

    with pytest.raises(VerificationFailed, match="the capital of France is Paris") as caught:
        await confused_agent("What is the capital of France?")
    assert caught.value.result.verified is False
    assert caught.value.result["model_votes"] == {"gpt-4": False, "claude-3": False, "gemini-pro": False}
    records = await k.recorder.query(event_type="verification")
    assert [r.data["decision"] for r in records] == ["deny"]
    assert records[0].severity == "warning"


async def test_failing_providers_block_the_result(kernel: tuple[KernelSpace, ScriptedLLMServer]) -> None:
    k, llm = kernel
    for n in ("gpt-4", "claude-3", "gemini-pro"):
        llm.script(n, Reply(status=500))

    @k.register
    async def geography_agent(query: str) -> str:
        return "Paris is the capital of France."

    with pytest.raises(VerificationFailed, match="quorum not met"):
        await geography_agent("What is the capital of France?")
