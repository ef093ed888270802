"""The LLM agent scenario, embedded in one process: a scripted model reads a file of its
workspace, is denied a write outside it, asks another agent over the bus and answers with what
it heard; the flight recorder holds every decision and outcome, and its chain verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent_os import AgentLoop, AgentLoopResult
from agent_os.amb import AMB, Metadata
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import BUILTIN_TOOLS, DECISION_EVENTS, BusActions, KernelSpace
from tests.support import memory_url
from tests.support.closing import Closing

TOOLS = [BUILTIN_TOOLS[a] for a in ("fs.read", "fs.write", "bus.request")]


def _answer(body: dict[str, Any]) -> Reply:
    """The last turn: answer with what the other agent said (the last tool result)."""
    heard = json.loads(body["messages"][-1]["content"])["output"]
    return Reply(content=f"The expert says {heard}.")


async def test_an_llm_agent_reads_is_denied_asks_and_answers(tmp_path: Path, closing: Closing) -> None:
    (tmp_path / "question.txt").write_text("What is six times seven?")
    url = memory_url("scenario")
    replies = iter(
        [
            Reply(tool_calls=[tool_call("read_file", {"path": "question.txt"})]),
            Reply(tool_calls=[tool_call("write_file", {"path": "/etc/cron.d/evil", "content": "x"})]),
            Reply(
                tool_calls=[
                    tool_call("ask_agent", {"subject": "expert.ask", "message": "What is six times seven?"})
                ]
            ),
        ]
    )

    def script(body: dict[str, Any]) -> Reply:
        return next(replies, None) or _answer(body)

    async with (
        KernelSpace("permissive", workspace=tmp_path) as kernel,
        ScriptedLLMServer({"assistant": script}) as server,
    ):
        client = closing(AMB("memory", url, agent_id="assistant"))
        expert = closing(AMB("memory", url, agent_id="expert"))
        kernel.attach(client)
        kernel.attach(expert)
        BusActions(client).register(kernel.actions)

        @expert.subscribe("expert.ask")
        async def on_ask(question: str, metadata: Metadata) -> None:
            await expert.reply(metadata, "42" if "seven" in question else "?")

        async with client, expert:
            loop = AgentLoop(kernel.submit, TOOLS, "openai/assistant", api_base=server.url, api_key="k")
            agent = kernel.register(loop.run, name="assistant", permissions=["read", "write"])
            result: AgentLoopResult = await kernel.execute(agent, "Answer the question in question.txt")

        assert result.text == "The expert says 42."
        read, write, ask = result.tool_calls
        assert read.ok
        assert read.output == "What is six times seven?"
        assert not write.allowed
        assert ask.ok
        assert ask.output == "42"

        records = await kernel.recorder.query()
        by_id = {r.id: r for r in records}
        assert by_id[read.record_id].event_type == "action_outcome"  # type: ignore[index]
        assert by_id[write.record_id].event_type == "action_blocked"  # type: ignore[index]
        assert by_id[ask.record_id].event_type == "action_outcome"  # type: ignore[index]
        actions = [
            (r.event_type, r.data.get("action"))
            for r in records
            if r.event_type in (*DECISION_EVENTS, "action_outcome") and r.data.get("action")
        ]
        assert actions == [
            ("policy_decision", "fs.read"),
            ("action_outcome", "fs.read"),
            ("action_blocked", "fs.write"),
            ("policy_decision", "bus.request"),
            ("action_outcome", "bus.request"),
        ]
        # the conversation on the bus: the request out of the assistant, in to the expert,
        # the reply out of the expert and in to the assistant, each decided and recorded
        messages = [
            (r.data["operation"], r.data["direction"], r.data["decision"])
            for r in records
            if r.event_type == "policy_decision" and "direction" in r.data
        ]
        assert ("request", "out", "allow") in messages
        assert ("reply", "out", "allow") in messages
        assert sum(1 for m in messages if m[1] == "in") >= 2
        assert (await kernel.recorder.verify()).ok
