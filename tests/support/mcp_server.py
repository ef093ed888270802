"""A small MCP server made with the SDK's ``MCPServer`` (FastMCP in mcp 1.x), for the tests of
:class:`agent_os.control_plane.actions.McpTools`: ``python -m tests.support.mcp_server`` serves
it on stdio (``--http``: over streamable HTTP on a free port, its URL printed first);
:func:`serving_http` serves it over streamable HTTP inside a test."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


def build() -> Any:
    """The server: ``echo(text)``, ``add(a, b)``, ``big(size)`` (a text of ``size`` characters),
    ``pid()`` (the server's process id), ``sleep(seconds)`` (then its process id) and ``die()``
    (the process exits in the middle of the call)."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("test-tools")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="A text of size characters.")
    def big(size: int) -> str:
        return "x" * size

    @server.tool(description="The server's process id.")
    def pid() -> int:
        return os.getpid()

    @server.tool(description="Wait this many seconds, then answer with the process id.")
    async def sleep(seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    @server.tool(description="The server process dies in the middle of the call.")
    def die() -> str:
        os._exit(3)

    return server


@asynccontextmanager
async def serving_http() -> AsyncIterator[str]:
    """The server over streamable HTTP on a free local port; yields its URL."""
    import uvicorn

    app = build().streamable_http_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the MCP service does
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(web.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    finally:
        web.should_exit = True
        await task
        sock.close()


async def _serve_http_forever() -> None:
    async with serving_http() as url:
        print(url, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--http"]:  # streamable HTTP on a free port; prints its URL
        asyncio.run(_serve_http_forever())
    else:
        build().run("stdio")
