"""The recursive pattern: code reads a large input in chunks and asks the model about each chunk
with ask_llm(), every question a governed, recorded action.

The code is what a model would write (the AgentKernel seed's "recursive language model"): it
never puts the whole log in one prompt. It runs on the Monty backend (backend="cpython" runs
the same code in a bubblewrap sandbox). A content rule of the policy denies a prompt holding a
card number: that one call raises PermissionError in the code, which skips the chunk. The
"model" is ScriptedLLMServer (no paid API, no network); for a real provider drop the server
and give LLM a litellm model id ("openai/gpt-4o-mini") with its key in the environment.
"""

import asyncio
import re
from typing import Any

from agent_os import KernelSpace, Policy
from agent_os.cmvk.testing import Reply, ScriptedLLMServer
from agent_os.control_plane.actions import LLM
from agent_os.control_plane.policy.patterns import ContentPattern

CODE = """
lines = log.splitlines()
failed = []
skipped = 0
for start in range(0, len(lines), chunk):
    part = "\\n".join(lines[start:start + chunk])
    try:
        answer = ask_llm("Which orders failed to pay? Answer with their numbers.\\n" + part)
    except PermissionError as exc:
        skipped += 1
        print("skipped lines", start, "to", start + chunk - 1, "-", exc)
        continue
    failed += [int(n) for n in answer.split(",") if n.strip()]
{"failed": sorted(failed), "questions": len(lines) // chunk, "skipped": skipped}
"""


def make_log() -> str:
    """2,000 lines of a shop's log; six orders fail to pay, one line leaks a card number."""
    lines = [f"12:{n // 60:02d}:{n % 60:02d} order {1000 + n} paid" for n in range(2000)]
    for n in (17, 404, 405, 1203, 1650, 1999):
        lines[n] = f"12:00:00 order {1000 + n} payment failed"
    lines[1710] = "12:00:00 customer note: my card is 4111 1111 1111 1111"
    return "\n".join(lines)


def model(body: dict[str, Any]) -> Reply:
    """A scripted model that reads the chunk it is given: the failed orders' numbers."""
    prompt = body["messages"][-1]["content"]
    return Reply(",".join(re.findall(r"order (\d+) payment failed", prompt)))


def card_number(text: str) -> str | None:
    return "a card number" if re.search(r"\b(?:\d[ -]?){13,16}\b", text) else None


async def main() -> None:
    policy = Policy("no-card-numbers", default_action="allow")
    policy.add_rule(
        "deny", ContentPattern("llm", card_number, "card numbers"), reason="a card number in a prompt"
    )
    async with ScriptedLLMServer({"reader": model}) as server, KernelSpace(policy) as kernel:
        LLM("openai/reader", api_base=server.url, api_key="local").register(kernel.actions)

        async def analyst(log: str) -> Any:
            return await kernel.run_code(CODE, inputs={"log": log, "chunk": 250})

        agent = kernel.register(analyst, name="analyst", permissions=["execute", "network"])
        result = await kernel.execute(agent, make_log())

        print(result.stdout, end="")
        print("value:", result.value)
        calls = len(result.tool_calls)
        allowed = sum(1 for call in result.tool_calls if call.allowed)
        print(f"ask_llm calls: {calls}, allowed {allowed}, denied {calls - allowed}")
        asked = await kernel.recorder.query(event_type="action_outcome")
        print("recorded outcomes:", sorted({r.data["action"] for r in asked}), len(asked))
        denied = await kernel.recorder.query(event_type="policy_violation")
        print("recorded denials:", [(r.data["action"], r.data["reason"]) for r in denied])
        print("recorder verified:", (await kernel.recorder.verify()).ok)


if __name__ == "__main__":
    asyncio.run(main())
