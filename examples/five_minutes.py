"""The README's "What You'll Build in 5 Minutes", run as written: three policies, an agent, and
the kernel deciding on what the agent is given. Only ``llm.generate`` is a stand-in (no model
is called), and the top-level ``await``s run inside ``main()``.

.venv/bin/python examples/five_minutes.py
"""

from __future__ import annotations

import asyncio

from agent_os import KernelSpace, Policy, PolicyViolationError


class StandInLLM:
    """Stands in for the README's ``llm``: answers without calling a model."""

    async def generate(self, prompt: str) -> str:
        return f"(model) {prompt}: north 41%, south 33%, west 26%"


llm = StandInLLM()

# 1. Define safety policies (not prompts - actual enforcement)
kernel = KernelSpace(policies=[
    Policy.no_destructive_sql(),      # Block DROP, DELETE without WHERE
    Policy.file_access("/workspace"), # Restrict file access
    Policy.rate_limit(100, "1m"),     # Max 100 calls/minute
])  # fmt: skip


# 2. Your agent code runs in user space
@kernel.register
async def data_analyst(query: str):
    result = await llm.generate(f"Analyze: {query}")
    return result


async def main() -> None:
    # 3. Kernel intercepts and validates EVERY action
    result = await kernel.execute(data_analyst, "revenue by region")
    print("allowed:", result)  # Safe queries execute
    try:
        await kernel.execute(data_analyst, "DROP TABLE users")
    except PolicyViolationError as exc:  # "DROP TABLE users" -> BLOCKED (not by prompt, by kernel)
        print("blocked:", exc)
    (denial,) = await kernel.recorder.query(event_type="policy_violation")
    print("recorded:", denial.event_type, denial.data["resource"], denial.data["rule"])
    await kernel.close()


if __name__ == "__main__":
    asyncio.run(main())
