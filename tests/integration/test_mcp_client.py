"""McpTools against a small MCP server made with the SDK (stdio and streamable HTTP): its tools
as ToolDefs, calls through kernel.submit allowed, denied per <server>/<tool>, recorded, and the
hostile cases (unknown tool, bad arguments, oversized result, a server that dies mid-call)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from agent_os import AgentLoop
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import ActionRequest, KernelSpace, Pattern, Policy
from agent_os.control_plane.actions import McpTools, mcp_tool_defs
from agent_os.control_plane.actions.mcp import McpError
from tests.support import wait_until
from tests.support.closing import Closing
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
async def test_tools_listed_called_denied_and_recorded(
    transport: str, http_url: str, closing: Closing
) -> None:
    tools = closing(McpTools({"srv": STDIO if transport == "stdio" else http_url}, timeout=30))
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


async def test_hostile_calls_give_specific_errors(http_url: str, closing: Closing) -> None:
    tools = closing(McpTools({"web": http_url}, timeout=30, max_output=1000))
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


async def test_a_server_that_dies_mid_call_is_an_error_outcome(closing: Closing) -> None:
    tools = closing(McpTools({"local": STDIO}, timeout=30))
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
        assert tools.connections == 2  # the dead server's connection was retired, a new one opened


async def test_an_unreachable_server_is_an_error_not_a_hang(closing: Closing) -> None:
    tools = closing(McpTools({"gone": "http://127.0.0.1:9/mcp"}, timeout=5))
    async with KernelSpace("permissive") as kernel:
        tools.register(kernel.actions)
        kernel.external("agent")
        result = await kernel.submit(ActionRequest("mcp.call", "gone/echo", {}, "agent"))
        assert result.allowed
        assert result.error is not None
        assert "MCP server gone" in result.error


async def test_an_agent_loop_acts_through_mcp_tools_only_by_submit(http_url: str, closing: Closing) -> None:
    """A scripted model calls an MCP tool (allowed, its answer goes back to the model) and one a
    rule denies (the reason goes back as the tool's result); both decisions are recorded."""
    tools = closing(McpTools({"srv": http_url}, timeout=30))
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


# -- connections ----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _pid(tools: McpTools, server: str = "local") -> int:
    output = await tools.run(ActionRequest("mcp.call", f"{server}/pid", {}))
    pid: int = output["result"]
    return pid


async def test_a_stdio_server_is_started_once_and_serves_concurrent_calls() -> None:
    async with McpTools({"local": STDIO}, timeout=30) as tools:
        first = await _pid(tools)
        assert first != os.getpid()
        pids = await asyncio.gather(*(_pid(tools) for _ in range(20)))
        assert set(pids) == {first}
        sums = await asyncio.gather(
            *(tools.run(ActionRequest("mcp.call", "local/add", {"a": i, "b": 1})) for i in range(20))
        )
        assert [s["result"] for s in sums] == [i + 1 for i in range(20)]
        assert tools.connections == 1
        assert _alive(first)
    await wait_until(lambda: not _alive(first), timeout=10)  # closing stopped the server
    async with McpTools({"local": STDIO}, timeout=30) as tools:
        again = await _pid(tools)
        await tools.close()
        await wait_until(lambda: not _alive(again), timeout=10)
        assert await _pid(tools) != again  # a call after close() opens a new connection
        assert tools.connections == 2


# A timeout that still lets a stdio server start: opening one (a Python process importing the
# MCP SDK) counts against it and took 1.8 s on an idle 2-vCPU host, more while the suite runs.
SHORT = 6.0


async def test_a_server_that_does_not_answer_in_time_is_replaced() -> None:
    async with McpTools({"local": STDIO}, timeout=SHORT) as tools:
        wedged = await _pid(tools)
        with pytest.raises(McpError, match=f"did not answer within {SHORT:g}s"):
            await tools.run(ActionRequest("mcp.call", "local/sleep", {"seconds": 30}))
        await wait_until(lambda: not _alive(wedged), timeout=10)  # retired, then stopped
        fresh = await _pid(tools)
        assert fresh != wedged
        assert tools.connections == 2


async def test_a_call_in_flight_outlives_the_failure_of_another_on_its_connection() -> None:
    # The slow call fails at its deadline (SHORT); the other, started SHORT / 2 later and
    # answered at 1.25 SHORT, is still on the retired connection then: it gets its answer, and
    # only after it has the server is stopped. Each edge has SHORT / 4 to spare.
    async with McpTools({"local": STDIO}, timeout=SHORT) as tools:
        pid = await _pid(tools)
        connection = tools._open["local"]
        slow = asyncio.create_task(tools.run(ActionRequest("mcp.call", "local/sleep", {"seconds": 30})))
        await wait_until(lambda: connection._calls == 1, timeout=10)
        await asyncio.sleep(SHORT / 2)  # the scenario's timeline: the other call starts halfway
        other = await tools.run(ActionRequest("mcp.call", "local/sleep", {"seconds": SHORT * 0.75}))
        assert other == {"result": pid}
        assert slow.done()  # it failed before the other's answer came
        with pytest.raises(McpError, match="did not answer"):
            await slow
        await wait_until(lambda: not _alive(pid), timeout=10)
        assert await _pid(tools) != pid


async def test_a_cancelled_caller_leaves_the_connection_open() -> None:
    async with McpTools({"local": STDIO}, timeout=30) as tools:
        pid = await _pid(tools)
        call = asyncio.create_task(tools.run(ActionRequest("mcp.call", "local/sleep", {"seconds": 10})))
        connection = tools._open["local"]
        await wait_until(lambda: connection._calls == 1, timeout=10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await _pid(tools) == pid
        assert tools.connections == 1


async def test_closing_the_kernel_stops_its_mcp_servers() -> None:
    async with McpTools({"local": STDIO}, timeout=30) as tools, KernelSpace("permissive") as kernel:
        tools.register(kernel.actions)
        kernel.external("agent")
        result = await kernel.submit(ActionRequest("mcp.call", "local/pid", {}, "agent"))
        assert result.ok
        pid = result.output["result"]
        assert _alive(pid)
        await kernel.close()
        await wait_until(lambda: not _alive(pid), timeout=10)


# -- connections against a misbehaving server (tests/support/mcp_raw_server.py) -------------------

RAW = [sys.executable, "-m", "tests.support.mcp_raw_server"]


async def _raw_pid(tools: McpTools, server: str = "raw") -> int:
    return int(await tools.run(ActionRequest("mcp.call", f"{server}/pid", {})))


async def test_close_while_a_connection_is_opening_stops_its_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    spec = [*RAW, "--pid-file", str(pid_file), "--slow-start", "1"]
    async with McpTools({"raw": spec}, timeout=30) as tools:
        call = asyncio.create_task(_raw_pid(tools))
        await wait_until(pid_file.exists, timeout=10)
        pid = int(pid_file.read_text())
        await tools.close()
        assert not _alive(pid)  # close() waited for the connection being opened
        outcome = (await asyncio.gather(call, return_exceptions=True))[0]
        assert isinstance(outcome, McpError)
        assert not tools._live


async def test_an_error_the_server_answers_with_keeps_the_connection() -> None:
    async with McpTools({"raw": RAW}, timeout=10) as tools:
        pid = await _raw_pid(tools)
        with pytest.raises(McpError, match="Invalid params"):
            await tools.run(ActionRequest("mcp.call", "raw/rpcerr", {}))
        assert await _raw_pid(tools) == pid
        assert tools.connections == 1


async def test_a_wedged_server_is_replaced_even_when_its_callers_give_up_first() -> None:
    # The caller's own deadline (1 s) comes before McpTools' (2 s): the cancelled call starts a
    # probe of the connection, which gets no answer within the timeout and retires it.
    async with McpTools({"raw": RAW}, timeout=2) as tools:
        pid = await _raw_pid(tools)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tools.run(ActionRequest("mcp.call", "raw/wedge", {})), 1)
        await wait_until(lambda: not _alive(pid), timeout=15)
        assert await _raw_pid(tools) != pid


async def test_a_line_that_is_not_utf8_does_not_wedge_the_connection() -> None:
    async with McpTools({"raw": RAW}, timeout=5) as tools:
        pid = int(await tools.run(ActionRequest("mcp.call", "raw/stray", {})))
        assert await _raw_pid(tools) == pid


async def test_connections_that_ended_are_not_kept() -> None:
    async with McpTools({"local": STDIO}, timeout=10) as tools:
        for _ in range(3):
            with pytest.raises(McpError, match="failed"):
                await tools.run(ActionRequest("mcp.call", "local/die", {}))
            await tools.close()
            assert not tools._live


def test_the_same_tools_serve_a_second_event_loop() -> None:
    tools = McpTools({"local": STDIO}, timeout=30)

    async def session() -> set[int]:
        try:
            return set(await asyncio.gather(*(_pid(tools) for _ in range(3))))
        finally:
            await tools.close()

    first, second = asyncio.run(session()), asyncio.run(session())
    assert len(first) == len(second) == 1
    assert first != second
