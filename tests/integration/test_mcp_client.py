"""McpTools against a small MCP server made with the SDK (stdio and streamable HTTP): its tools
as ToolDefs, calls through kernel.submit allowed, denied per <server>/<tool>, recorded, and the
hostile cases (unknown tool, bad arguments, oversized result, a server that dies mid-call)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("mcp")

from agent_os import AgentLoop
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import ActionRequest, KernelSpace, Pattern, Policy
from agent_os.control_plane.actions import McpTools, mcp_tool_defs
from tests.support.mcp_server import serving_http

STDIO = [sys.executable, "-m", "tests.support.mcp_server"]


@pytest.fixture
async def http_url() -> AsyncIterator[str]:
    async with serving_http() as url:
        yield url


def _policy() -> Policy:
    policy = Policy("mcp-test", default_action="allow")
    policy.add_rule("deny", Pattern("execute", "*/add"), reason="no adding here")
    return policy


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_tools_listed_called_denied_and_recorded(transport: str, http_url: str) -> None:
    tools = McpTools({"srv": STDIO if transport == "stdio" else http_url}, timeout=30)
    defs = {d.name: d for d in await mcp_tool_defs(tools)}
    assert {"srv__echo", "srv__add", "srv__big", "srv__die"} <= set(defs)
    echo = defs["srv__echo"]
    assert echo.action == "mcp.call"
    assert echo.fixed_target == "srv/echo"
    assert echo.parameters["properties"]["text"]["type"] == "string"
    async with KernelSpace(_policy()) as kernel:
        tools.register(kernel.actions)
        kernel.external("agent").permissions = frozenset({"execute"})
        allowed = await kernel.submit(echo.request({"text": "hi"}, "agent"))
        assert allowed.ok
        assert allowed.output == {"result": "hi"}
        denied = await kernel.submit(defs["srv__add"].request({"a": 1, "b": 2}, "agent"))
        assert not denied.allowed
        assert denied.error is not None
        assert "no adding here" in denied.error
        outcome = await kernel.recorder.query(event_type="action_outcome")
        assert [r.data["resource"] for r in outcome] == ["srv/echo"]
        violations = await kernel.recorder.query(event_type="policy_violation")
        assert [r.data["resource"] for r in violations] == ["srv/add"]


async def test_hostile_calls_give_specific_errors(http_url: str) -> None:
    tools = McpTools({"web": http_url}, timeout=30, max_output=1000)
    async with KernelSpace("permissive") as kernel:
        tools.register(kernel.actions)
        kernel.external("agent")

        async def call(target: str, **params: object) -> str | None:
            result = await kernel.submit(ActionRequest("mcp.call", target, params, "agent"))
            assert not result.ok
            return result.error

        assert "unknown tool 'nope'" in str(await call("web/nope"))
        assert "do not match the schema of web/add: b" in str(await call("web/add", a=1, b="two"))
        assert "over the limit of 1000" in str(await call("web/big", size=5000))
        assert "<server>/<tool>" in str(await call("elsewhere/echo", text="x"))
        assert (await kernel.submit(ActionRequest("mcp.call", "web/big", {"size": 10}, "agent"))).ok


async def test_a_server_that_dies_mid_call_is_an_error_outcome() -> None:
    tools = McpTools({"local": STDIO}, timeout=30)
    async with KernelSpace("permissive") as kernel:
        tools.register(kernel.actions)
        kernel.external("agent")
        result = await kernel.submit(ActionRequest("mcp.call", "local/die", {}, "agent"))
        assert result.allowed
        assert result.error is not None
        assert "MCP server local failed" in result.error
        after = await kernel.submit(ActionRequest("mcp.call", "local/echo", {"text": "still here"}, "agent"))
        assert after.ok
        assert after.output == {"result": "still here"}


async def test_an_unreachable_server_is_an_error_not_a_hang() -> None:
    tools = McpTools({"gone": "http://127.0.0.1:9/mcp"}, timeout=5)
    async with KernelSpace("permissive") as kernel:
        tools.register(kernel.actions)
        kernel.external("agent")
        result = await kernel.submit(ActionRequest("mcp.call", "gone/echo", {}, "agent"))
        assert result.allowed
        assert result.error is not None
        assert "MCP server gone" in result.error


async def test_an_agent_loop_acts_through_mcp_tools_only_by_submit(http_url: str) -> None:
    """A scripted model calls an MCP tool (allowed, its answer goes back to the model) and one a
    rule denies (the reason goes back as the tool's result); both decisions are recorded."""
    tools = McpTools({"srv": http_url}, timeout=30)
    defs = await mcp_tool_defs(tools)
    replies = iter(
        [
            Reply(tool_calls=[tool_call("srv__echo", {"text": "hello"})]),
            Reply(tool_calls=[tool_call("srv__add", {"a": 2, "b": 3})]),
            Reply(content="done"),
        ]
    )
    seen: list[dict[str, Any]] = []

    def script(body: dict[str, Any]) -> Reply:
        seen.append(body)
        return next(replies)

    async with (
        KernelSpace(_policy()) as kernel,
        ScriptedLLMServer({"assistant": script}) as server,
    ):
        tools.register(kernel.actions)
        loop = AgentLoop(kernel.submit, defs, "openai/assistant", api_base=server.url, api_key="k")
        agent = kernel.register(loop.run, name="assistant", permissions=["execute"])
        result = await kernel.execute(agent, "use the tools")
        assert result.text == "done"
        echo, add = result.tool_calls
        assert echo.ok
        assert echo.output == {"result": "hello"}
        assert not add.allowed
        assert "no adding here" in str(add.error)
        told = [m["content"] for m in seen[-1]["messages"] if m["role"] == "tool"]
        assert "hello" in told[0]
        assert "no adding here" in told[1]  # the denial went back to the model as the result
        events = [
            (r.event_type, r.data.get("resource"))
            for r in await kernel.recorder.query()
            if r.data.get("action") == "mcp.call"
        ]
        assert events == [
            ("policy_decision", "srv/echo"),
            ("action_outcome", "srv/echo"),
            ("policy_violation", "srv/add"),
        ]
        assert (await kernel.recorder.verify()).ok
