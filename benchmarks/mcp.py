"""MCP benchmark: a tool call through ``kernel.submit`` (``mcp.call``) against the SDK's client
calling the same tool on a connection of its own, in the same rounds.

    .venv/bin/python -m benchmarks.mcp [--quick]

The server is the test suite's small MCP server (``tests/support/mcp_server.py``, the SDK's
``MCPServer``) in a process of its own, over stdio and over streamable HTTP; the call is
``add(a, b)``. Each round times N sequential calls through ``kernel.submit`` (permissive
policy, in-memory recorder, :class:`McpTools` keeping its connection) and N on the SDK's
``mcp.Client`` held open (the baseline), in turn. For scale, a call that opens its own
connection (what ``McpTools`` did before it kept one: a stdio server started per call) is
timed a few times. Writes the section "mcp" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from typing import Any

import mcp

from agent_os import ActionRequest
from agent_os.control_plane import FlightRecorder, KernelSpace
from agent_os.control_plane.actions import McpTools
from benchmarks._report import write_section

STDIO = [sys.executable, "-m", "tests.support.mcp_server"]


async def http_server() -> tuple[asyncio.subprocess.Process, str]:
    """The server over streamable HTTP in a process of its own, and its URL."""
    proc = await asyncio.create_subprocess_exec(
        *STDIO, "--http", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    if not url.startswith("http"):
        raise RuntimeError(f"the MCP server did not start: {url!r}")
    return proc, url


def target_of(spec: str | list[str]) -> Any:
    return spec if isinstance(spec, str) else mcp.StdioServerParameters(command=spec[0], args=spec[1:])


async def per_call(n: int, kernel: KernelSpace) -> float:
    """Seconds per call through kernel.submit."""
    start = time.perf_counter()
    for i in range(n):
        result = await kernel.submit(ActionRequest("mcp.call", "srv/add", {"a": i, "b": 1}, "bench"))
        assert result.ok, result.error
    return (time.perf_counter() - start) / n


async def per_call_raw(n: int, client: Any) -> float:
    """Seconds per call on the SDK's client, its connection held open."""
    start = time.perf_counter()
    for i in range(n):
        result = await client.call_tool("add", {"a": i, "b": 1})
        assert not result.is_error
    return (time.perf_counter() - start) / n


async def per_connection(n: int, spec: str | list[str]) -> float:
    """Seconds per call that opens (and closes) a connection of its own."""
    start = time.perf_counter()
    for i in range(n):
        async with mcp.Client(target_of(spec), read_timeout_seconds=30, cache=None) as client:
            await client.call_tool("add", {"a": i, "b": 1})
    return (time.perf_counter() - start) / n


async def measure(spec: str | list[str], rounds: int, n: int, fresh: int) -> dict[str, Any]:
    async with (
        McpTools({"srv": spec}, timeout=30) as tools,
        KernelSpace("permissive", flight_recorder=FlightRecorder("memory")) as kernel,
        mcp.Client(target_of(spec), read_timeout_seconds=30, cache=None) as client,
    ):
        tools.register(kernel.actions)
        kernel.external("bench")
        await per_call(20, kernel)  # warm: the connection, the listing, the server's caches
        await per_call_raw(20, client)
        ours, raw, ratios = [], [], []
        for i in range(rounds):
            if i % 2:
                r = await per_call_raw(n, client)
                o = await per_call(n, kernel)
            else:
                o = await per_call(n, kernel)
                r = await per_call_raw(n, client)
            ours.append(o)
            raw.append(r)
            ratios.append(o / r)
        assert tools.connections == 1, tools.connections
    return {
        "ours": statistics.median(ours) * 1e3,
        "raw": statistics.median(raw) * 1e3,
        "ratio": statistics.median(ratios),
        "lo": min(ratios),
        "hi": max(ratios),
        "fresh": await per_connection(fresh, spec) * 1e3,
    }


async def main(quick: bool) -> None:
    rounds, n, fresh = (3, 50, 2) if quick else (7, 300, 5)
    load_before = os.getloadavg()[0]
    proc, url = await http_server()
    try:
        results = {
            "stdio": await measure(STDIO, rounds, n, fresh),
            "http": await measure(url, rounds, n, fresh),
        }
    finally:
        proc.terminate()
        await proc.wait()
    load_after = os.getloadavg()[0]
    rows = [
        f"| {name} | {r['ours']:.2f} | {r['raw']:.2f} | {r['ratio']:.2f}× ({r['lo']:.2f}–{r['hi']:.2f}) "
        f"| {r['fresh']:.1f} |"
        for name, r in results.items()
    ]
    body = f"""
`add(a, b)` on the test suite's MCP server (the SDK's `MCPServer`, a process of its own):
{rounds} rounds of {n} sequential calls through `kernel.submit` (`mcp.call`, permissive policy,
`memory` recorder; `McpTools` keeps one connection per server) and {n} on the SDK's `mcp.Client`
with its connection held open (the baseline), in turn. Medians over rounds; the ratio is the
median of the per-round ratios, with the range. The last column: a call that opens its own
connection (as `McpTools` did before it kept one; stdio starts the server for it), {fresh} calls.
Load average {load_before:.1f} before the run, {load_after:.1f} after (2 cores shared).

| transport | `kernel.submit` ms/call | SDK client, connection held, ms/call | ratio (range) | a connection per call, ms |
|---|---|---|---|---|
{chr(10).join(rows)}

`kernel.submit` adds the governance path (identity, permissions, policy, two records) and
McpTools' own work per call: the argument check against the tool's input schema (compiled once
per tool) and the size check of the result. The HTTP server's connections have `TCP_NODELAY`,
as `agent-os serve mcp`'s do: without it, every answer on the client's kept-alive connection
waited for a delayed acknowledgement, about 43 ms a call on both sides.
"""
    print(body)
    write_section("mcp", "python -m benchmarks.mcp" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    args = parser.parse_args()
    logging.getLogger("mcp").setLevel(logging.WARNING)
    asyncio.run(main(args.quick))
