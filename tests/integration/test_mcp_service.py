"""``agent-os serve mcp`` as a process, driven by the SDK's own client over stdio and streamable
HTTP: tools/list, an allowed fs.read in a workspace, a denied call (recorded), recorder queries,
and hostile calls (unknown tool, bad arguments)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

import mcp

from tests.support.processes import AGENT_OS

POLICY = """
name: mcp-test
default_action: allow
rules:
  - action: deny
    operation: read
    resource: "*/secret*"
    reason: secrets stay here
"""


def _args(workspace: Path, transport: str) -> list[str]:
    policy = workspace.parent / "policy.yaml"
    policy.write_text(POLICY)
    return [
        "serve",
        "mcp",
        "--transport",
        transport,
        "--agent-id",
        "host-agent",
        "--permissions",
        "read",
        "--policy",
        str(policy),
        "--workspace",
        str(workspace),
        "--log-level",
        "WARNING",
        "--metrics-port",
        "0",
    ]


@asynccontextmanager
async def _http_service(args: list[str], ready: dict[str, str] | None = None) -> AsyncIterator[str]:
    """The service over HTTP; yields its MCP URL (``ready``, when given, gets every field of
    its ready line: ``url``, ``metrics``)."""
    proc = await asyncio.create_subprocess_exec(
        str(AGENT_OS), *args, "--port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("ready mcp url="), line
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        if ready is not None:
            ready.update(fields)
        yield fields["url"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def _client(transport: str, workspace: Path) -> AsyncIterator[mcp.Client]:
    args = _args(workspace, transport)
    if transport == "stdio":
        params = mcp.StdioServerParameters(command=str(AGENT_OS), args=args, env=dict(os.environ))
        async with mcp.Client(params, cache=None) as client:
            yield client
    else:
        async with _http_service(args) as url, mcp.Client(url, cache=None) as client:
            yield client


def _text(result: Any) -> str:
    block = result.content[0]
    assert isinstance(block, mcp.types.TextContent)
    return block.text


def _json(result: Any) -> Any:
    return json.loads(_text(result))


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_serve_mcp_lists_calls_denies_and_records(transport: str, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("hello")
    (workspace / "secret.txt").write_text("hidden")
    async with _client(transport, workspace) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"read_file", "list_files", "write_file", "query_records"} <= names
        read = await client.call_tool("read_file", {"path": "notes.txt"})
        assert not read.is_error
        assert _json(read)["output"] == "hello"
        denied = await client.call_tool("read_file", {"path": "secret.txt"})
        assert denied.is_error
        assert "denied: secrets stay here" in _text(denied)
        no_write = await client.call_tool("write_file", {"path": "x.txt", "content": "no"})
        assert no_write.is_error
        assert "denied" in _text(no_write)
        assert not (workspace / "x.txt").exists()
        query = await client.call_tool(
            "query_records", {"event_type": "policy_violation", "agent": "host-agent"}
        )
        records = _json(query)["records"]
        assert [r["data"]["resource"] for r in records] == [str(workspace / "secret.txt")]
        outcomes = _json(
            await client.call_tool("query_records", {"event_type": "action_outcome", "limit": 5})
        )
        assert [r["data"]["action"] for r in outcomes["records"]] == ["fs.read"]


async def test_serve_mcp_hostile_calls(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    async with _client("http", workspace) as client:
        unknown = await client.call_tool("rm_rf", {"path": "/"})
        assert unknown.is_error
        assert "unknown tool 'rm_rf'" in _text(unknown)
        extra = await client.call_tool("read_file", {"path": "a", "mode": "w"})
        assert extra.is_error
        assert "invalid arguments" in _text(extra)
        bad_limit = await client.call_tool("query_records", {"limit": 10_000})
        assert bad_limit.is_error
        assert "invalid arguments" in _text(bad_limit)
        bool_limit = await client.call_tool("query_records", {"limit": True})  # JSON true: not a count
        assert bool_limit.is_error
        assert "invalid arguments" in _text(bool_limit)
        escape = await client.call_tool("read_file", {"path": "../../etc/passwd"})
        assert escape.is_error
        assert "denied" in _text(escape)


async def test_serve_mcp_serves_metrics_and_health(tmp_path: Path) -> None:
    """The metrics port: the kernel's decisions as Prometheus metrics, and /healthz."""
    import aiohttp

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "secret.txt").write_text("hidden")
    ready: dict[str, str] = {}
    async with _http_service(_args(workspace, "http"), ready) as url, mcp.Client(url, cache=None) as client:
        assert (await client.call_tool("read_file", {"path": "secret.txt"})).is_error
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{ready['metrics']}/healthz") as health:
                assert health.status == 200
            async with session.get(f"{ready['metrics']}/metrics") as scraped:
                text = await scraped.text()
        assert "agentos_policy_decisions_total{" in text
        assert 'event="policy_violation"' in text


async def test_serve_mcp_answers_kept_alive_connections_without_delay(tmp_path: Path) -> None:
    # The SDK's client keeps its HTTP connection: without TCP_NODELAY on the service's sockets
    # each answer waited for the client's delayed ACK, 40 ms or more a call (Linux's minimum);
    # a local call takes a few milliseconds.
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("x")
    async with _client("http", workspace) as client:
        await client.call_tool("read_file", {"path": "a.txt"})
        times = []
        for _ in range(7):
            start = time.perf_counter()
            result = await client.call_tool("read_file", {"path": "a.txt"})
            times.append(time.perf_counter() - start)
            assert not result.is_error
        assert statistics.median(times) < 0.030, times
