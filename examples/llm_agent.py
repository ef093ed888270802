"""An LLM agent that acts only through the kernel, against a local scripted model.

The "model" is scripted by ScriptedLLMServer (no paid API, no network): it reads a file of its
workspace, tries to write outside it (denied), asks another agent on the bus, and answers with
what it heard. Requests go through litellm over real HTTP. For a real provider drop the server
and pass a litellm model id ("openai/gpt-4o-mini") with its key in the environment.
"""

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from agent_os import AgentLoop, KernelSpace
from agent_os.amb import AMB, Metadata
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import BUILTIN_TOOLS, BusActions

PLAN = [
    Reply(tool_calls=[tool_call("read_file", {"path": "question.txt"})]),
    Reply(tool_calls=[tool_call("write_file", {"path": "/etc/motd", "content": "hi"})]),
    Reply(tool_calls=[tool_call("ask_agent", {"subject": "expert.ask", "message": "six times seven?"})]),
]


def model(body: dict[str, Any]) -> Reply:
    """A scripted model: follows PLAN, then answers with the last tool result."""
    turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if turn < len(PLAN):
        return PLAN[turn]
    heard = json.loads(body["messages"][-1]["content"])["output"]
    return Reply(f"The expert says {heard}.")


async def main(workspace: str) -> None:
    async with (
        ScriptedLLMServer({"assistant": model}) as server,
        KernelSpace("permissive", workspace=workspace) as kernel,
        AMB("memory", "memory://example", agent_id="expert") as expert,
    ):
        me = AMB("memory", "memory://example", agent_id="assistant")
        kernel.attach(me)  # its messages are governed and recorded too
        BusActions(me).register(kernel.actions)  # bus.request goes out through it

        @expert.subscribe("expert.ask")
        async def answer(question: str, metadata: Metadata) -> None:
            await expert.reply(metadata, "42")

        async with me:
            loop = AgentLoop(
                kernel.submit,
                [BUILTIN_TOOLS["fs.read"], BUILTIN_TOOLS["fs.write"], BUILTIN_TOOLS["bus.request"]],
                "openai/assistant",
                api_base=server.url,
                api_key="local",
            )
            assistant = kernel.register(loop.run, name="assistant", permissions=["read", "write"])
            result = await kernel.execute(assistant, "Answer the question in question.txt")

        print(result.text)
        for call in result.tool_calls:
            print(f"{call.action} {call.target}: {'ok' if call.ok else 'denied: ' + str(call.error)}")
        print("recorder verified:", (await kernel.recorder.verify()).ok)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as workspace:
        Path(workspace, "question.txt").write_text("What is six times seven?")
        asyncio.run(main(workspace))
