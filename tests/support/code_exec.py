"""Code execution scenarios both backends run (tests/unit for Monty, tests/integration for
CPython in a real sandbox): a kernel with a workspace, ``llm.ask`` on the scripted model, and
the script that calls two tools and ``ask_llm()``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent_os.cmvk.testing import Reply, ScriptedLLMServer
from agent_os.control_plane import BUILTIN_TOOLS, KernelSpace
from agent_os.control_plane.actions import LLM, CodeLimits, CodeResult

MODEL = "openai/scripted"
TOOLS = [BUILTIN_TOOLS["fs.read"], BUILTIN_TOOLS["fs.write"], BUILTIN_TOOLS["fs.list"]]

SCRIPT = """
text = read_file("notes.txt")
names = [entry["name"] for entry in list_files(".")]
summary = ask_llm("Summarize: " + text)
try:
    write_file("report.txt", summary)
    denied = None
except PermissionError as exc:
    denied = str(exc)
print("read", len(text), "bytes")
{"names": names, "summary": summary, "denied": denied}
"""


@asynccontextmanager
async def code_kernel(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[KernelSpace, ScriptedLLMServer]]:
    """A permissive kernel on ``tmp_path`` (holding ``notes.txt``) with ``llm.ask`` on the
    scripted model, and the server; both closed on exit."""
    (tmp_path / "notes.txt").write_text("the launch moved to friday")
    async with (
        ScriptedLLMServer({"scripted": Reply(content="launch on friday")}) as server,
        KernelSpace("permissive", workspace=tmp_path, **options) as kernel,
    ):
        LLM(MODEL, api_base=server.url, api_key="k", retries=0).register(kernel.actions)
        yield kernel, server


async def run_as_agent(kernel: KernelSpace, code: str, **options: Any) -> CodeResult:
    """``kernel.run_code(code, **options)`` inside an execution of the agent ``coder``
    (permissions read, execute and network: it may not write)."""

    async def coder() -> CodeResult:
        return await kernel.run_code(code, **options)

    agent = kernel.register(coder, name="coder", permissions=["read", "execute", "network"])
    result: CodeResult = await kernel.execute(agent)
    return result


async def check_tools_and_records(kernel: KernelSpace, server: ScriptedLLMServer, result: CodeResult) -> None:
    """The script's result, and every tool call and the run in the flight recorder."""
    assert result.ok, result.error
    assert result.value["names"] == ["notes.txt"]
    assert result.value["summary"] == "launch on friday"
    assert "write_file denied" in result.value["denied"]
    assert "lacks permission for write" in result.value["denied"]
    assert result.stdout == "read 26 bytes\n"
    assert server.requests[-1].messages[-1]["content"] == "Summarize: the launch moved to friday"
    calls = [(c.name, c.action, c.allowed) for c in result.tool_calls]
    assert calls == [
        ("read_file", "fs.read", True),
        ("list_files", "fs.list", True),
        ("ask_llm", "llm.ask", True),
        ("write_file", "fs.write", False),
    ]
    outcomes = {r.id: r for r in await kernel.recorder.query(event_type="action_outcome")}
    for call in result.tool_calls[:3]:
        record = outcomes[call.record_id or ""]
        assert (record.data["action"], record.data["status"], record.data["agent_name"]) == (
            call.action,
            "ok",
            "coder",
        )
    denial = await kernel.recorder.query(event_type="permission_denied")
    assert [d.id for d in denial] == [result.tool_calls[3].record_id]
    run = outcomes[result.record_id or ""]
    assert (run.data["action"], run.data["resource"], run.data["status"]) == (
        "code.run",
        result.backend,
        "ok",
    )
    decisions = [
        r for r in await kernel.recorder.query(event_type="policy_decision") if r.data["action"] == "code.run"
    ]
    assert [d.id for d in decisions] == [run.data["decision_id"]]
    assert (await kernel.recorder.verify()).ok


SMALL = CodeLimits(timeout=3.0, memory=64 << 20, max_output=10_000, max_tool_calls=5, max_artifacts=1 << 20)
"""Limits the hostile tests run under."""
