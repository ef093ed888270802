"""The original project's CMVK example (``docs/api-reference.md``, CMVK), run against a local
OpenAI-compatible server.

The three "models" are scripted by ScriptedLLMServer (no paid API, no network): each one
knows that Paris is the capital of France. Requests go through litellm over real HTTP.
To use real providers, drop the server and pass litellm model ids and keys instead.
"""

import asyncio
from typing import Any

from agent_os.cmvk import ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.control_plane import KernelSpace, VerificationFailed
from agent_os.modules import CMVK

MODELS = ["gpt-4", "claude-3", "gemini-pro"]


def fact_checker(body: dict[str, Any]) -> Reply:
    """A scripted model: checks the RESPONSE block, or answers a question."""
    user = body["messages"][-1]["content"]
    if "RESPONSE:" not in user:  # generation mode: answer the question
        answers = {"gpt-4": "Paris.", "claude-3": "The capital of France is Paris.", "gemini-pro": "Lyon."}
        return Reply(answers[body["model"]])
    if "Paris" in user.split("RESPONSE:", 1)[1]:
        return Reply(verdict("supported", 0.95, "Paris is the capital of France"))
    return Reply(verdict("contradicted", 0.9, "the capital of France is Paris"))


async def main() -> None:
    async with ScriptedLLMServer({m: fact_checker for m in MODELS}) as server:
        cmvk = CMVK(
            models=[ModelSpec(m, model=f"openai/{m}") for m in MODELS],
            consensus_threshold=0.8,  # 80% agreement required
            voting_strategy="majority",  # "majority" | "unanimous" | "weighted"
            timeout=30.0,
            api_base=server.url,
            api_key="local",
        )

        # Verify a response
        result = await cmvk.verify(
            prompt="What is the capital of France?",
            response="Paris is the capital of France.",
            context={"domain": "geography"},
        )
        print(result)

        # Generation mode: every model answers, answers are compared by meaning
        check = await cmvk.cross_check("What is the capital of France?")
        print(f"majority: {check.majority_answer!r} from {check.majority}; dissenters: {check.dissenters}")

        # Integrate with kernel
        kernel = KernelSpace(policy="strict")
        kernel.add_module(cmvk)

        @kernel.register
        async def verified_agent(query: str) -> str:
            return "Lyon is the capital of France."  # a hallucination

        try:
            await verified_agent("What is the capital of France?")
        except VerificationFailed as blocked:
            print("blocked:", blocked.result.reason)


asyncio.run(main())
