"""The MCP service: the kernel's governed tools and read-only flight-recorder queries for MCP
hosts (Claude Desktop, Cursor, any MCP client), over stdio or streamable HTTP.

Every tool call is ``kernel.submit`` as one configured agent (``--agent-id``, ``--permissions``):
policy decides it and the recorder keeps the decision and the outcome. Run it with ``agent-os
serve mcp`` or ``python -m agent_os.services.mcp_service``; ``docs/services.md``, "The MCP service".
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Mapping
from typing import Any, Final

import click

from agent_os.control_plane import ControlPlaneError, KernelSpace
from agent_os.control_plane.actions import BUILTIN_TOOLS, ToolArgumentError, ToolDef
from agent_os.services._metrics import (
    METRICS_PORTS,
    MetricsOptions,
    metrics_endpoint,
    metrics_from_options,
    metrics_options,
    ready_line,
    require_metrics,
    service_registry,
)
from agent_os.services._process import log_level_option, run, stop_signals
from agent_os.services.control_plane_service._options import (
    kernel_options,
    recorder_from_spec,
)

log = logging.getLogger("agent_os.services.mcp")

QUERY_TOOL: Final = "query_records"
MAX_RECORDS: Final = 200
"""The most records one ``query_records`` call returns."""
MAX_OUTPUT: Final = 100_000
"""Characters of an action's output (its JSON) a tool result carries; more is an error result."""
INSTALL_HINT: Final = "the MCP service needs the official SDK: pip install 'agent-os[mcp]'"

_QUERY_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "event_type": {"type": "string", "description": "Only records of this event type"},
        "agent": {"type": "string", "description": "Only records of this agent id"},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_RECORDS, "description": "Newest N"},
    },
    "additionalProperties": False,
}


def kernel_tools(kernel: KernelSpace) -> dict[str, ToolDef]:
    """The tools the service offers for ``kernel``'s registered actions, by tool name: each
    action's :data:`BUILTIN_TOOLS` entry (actions without one are not offered)."""
    return {
        BUILTIN_TOOLS[s.name].name: BUILTIN_TOOLS[s.name] for s in kernel.actions if s.name in BUILTIN_TOOLS
    }


class McpGateway:
    """The MCP server's handlers: tool calls through ``kernel.submit`` as ``agent_id``, and
    ``query_records`` on the kernel's recorder. Errors are tool results with ``is_error``."""

    def __init__(self, kernel: KernelSpace, agent_id: str) -> None:
        self.kernel = kernel
        self.agent_id = agent_id
        self.tools = kernel_tools(kernel)

    def server(self) -> Any:
        """The SDK's low-level ``Server`` with the list and call handlers."""
        from mcp.server import Server

        return Server("agent-os", on_list_tools=self._list_tools, on_call_tool=self._call_tool)

    async def _list_tools(self, _ctx: Any, _params: Any) -> Any:
        import mcp_types as types

        tools = [
            types.Tool(
                name=t.name,
                description=t.description,
                input_schema=dict(t.to_openai()["function"]["parameters"]),
            )
            for t in self.tools.values()
        ]
        tools.append(
            types.Tool(
                name=QUERY_TOOL,
                description="Read flight-recorder records (newest first): event_type, agent, limit.",
                input_schema=_QUERY_SCHEMA,
            )
        )
        return types.ListToolsResult(tools=tools)

    async def _call_tool(self, _ctx: Any, params: Any) -> Any:
        arguments = params.arguments or {}
        if params.name == QUERY_TOOL:
            return await self._query(arguments)
        tool = self.tools.get(params.name)
        if tool is None:
            return _error(
                f"unknown tool {params.name[:80]!r} (tools: {', '.join([*self.tools, QUERY_TOOL])})"
            )
        try:
            request = tool.request(arguments, self.agent_id)
        except ToolArgumentError as exc:
            return _error(f"invalid arguments: {exc}")
        result = await self.kernel.submit(request)
        if not result.allowed:
            return _error(f"denied: {result.error} (record {result.record_id})")
        if result.error is not None:
            return _error(f"failed: {result.error} (record {result.record_id})")
        return _ok({"output": result.output, "record_id": result.record_id})

    async def _query(self, arguments: Mapping[str, Any]) -> Any:
        unknown = set(arguments) - {"event_type", "agent", "limit"}
        limit = arguments.get("limit", 50)
        event_type, agent = arguments.get("event_type"), arguments.get("agent")
        if unknown or isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RECORDS:
            return _error(f"invalid arguments: event_type, agent (strings), limit (1-{MAX_RECORDS})")
        if not all(v is None or isinstance(v, str) for v in (event_type, agent)):
            return _error("invalid arguments: event_type and agent are strings")
        records = await self.kernel.recorder.query(
            event_type=event_type, agent_id=agent, limit=limit, order="desc"
        )
        rows = [
            {
                "id": r.id,
                "seq": r.seq,
                "ts": r.ts,
                "event_type": r.event_type,
                "agent_id": r.agent_id,
                "data": r.data,
            }
            for r in records
        ]
        return _ok({"records": rows})


def _ok(output: Mapping[str, Any]) -> Any:
    import mcp_types as types

    text = json.dumps(output, default=str, ensure_ascii=False)
    if len(text) > MAX_OUTPUT:
        return _error(f"the output is {len(text)} characters, over the limit of {MAX_OUTPUT}")
    plain = json.loads(text)
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content=plain)


def _error(message: str) -> Any:
    import mcp_types as types

    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


async def serve_stdio(server: Any) -> None:
    """Serve ``server`` on this process's stdin and stdout until stdin closes."""
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


async def serve_http(server: Any, host: str, port: int, path: str, metrics_url: str | None = None) -> None:
    """Serve ``server`` over streamable HTTP at ``http://host:port<path>`` until SIGINT/SIGTERM;
    prints ``ready mcp url=<url>`` (and `` metrics=<url>``) on stdout once it listens."""
    import uvicorn

    app = server.streamable_http_app(streamable_http_path=path, host=host)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by the accepted connections (uvicorn, given the socket, does not set it): without
    # it each answer on a kept-alive connection waited for the client's delayed ACK, about
    # 40 ms a call (docs/services.md, "The MCP service").
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        async with stop_signals() as stop:
            task = asyncio.create_task(web.serve(sockets=[sock]))
            bound = sock.getsockname()[1]
            print(ready_line(f"ready mcp url=http://{host}:{bound}{path}", metrics_url), flush=True)
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            web.should_exit = True
            stopped.cancel()
            await task
    finally:
        sock.close()


def _registry(kernel: KernelSpace, metrics: MetricsOptions | None) -> Any:
    """The metrics of the process and of the kernel's decisions and agents (no bus: this
    service has no broker connection, so ``/healthz`` is healthy while it serves)."""
    if metrics is None:
        return None
    from agent_os.control_plane.kernel.metrics import KernelMetrics

    return service_registry([], KernelMetrics(kernel))


@click.command()
@click.option(
    "--transport",
    type=click.Choice(["stdio", "http"]),
    default="stdio",
    show_default=True,
    help="stdio (for a host that starts this process) or streamable HTTP (a listener).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP: the address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="HTTP: the port (0: any free one; the ready line names it).",
)
@click.option("--path", default="/mcp", show_default=True, help="HTTP: the endpoint's path.")
@click.option("--agent-id", default="mcp", show_default=True, help="The agent every call acts as.")
@kernel_options
@metrics_options(METRICS_PORTS["mcp"])
@log_level_option
def main(
    transport: str,
    host: str,
    port: int,
    path: str,
    agent_id: str,
    permissions: frozenset[str] | None,
    policy: Any,
    workspace: str,
    recorder: str,
    metrics_host: str,
    metrics_port: int,
    metrics_token: str | None,
    no_metrics: bool,
    log_level: str,
) -> None:
    """Serve the kernel's governed tools and query_records to MCP hosts; every call passes
    policy as --agent-id and is recorded."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise click.ClickException(INSTALL_HINT) from None
    metrics = metrics_from_options(no_metrics, metrics_host, metrics_port, metrics_token)
    if metrics is not None:
        try:
            require_metrics()
        except ImportError as exc:
            raise click.ClickException(str(exc)) from None

    async def serve() -> None:
        flight_recorder = recorder_from_spec(recorder, retention_days=None)
        async with KernelSpace(policy, flight_recorder=flight_recorder, workspace=workspace) as kernel:
            kernel.external(agent_id).permissions = permissions
            server = McpGateway(kernel, agent_id).server()
            log.info(
                "mcp service: agent %s, %s, tools: %s", agent_id, transport, ", ".join(kernel_tools(kernel))
            )
            async with metrics_endpoint(metrics, _registry(kernel, metrics), lambda: True) as url:
                if url is not None:
                    log.info("mcp service: metrics on %s/metrics", url)  # stdout is MCP's on stdio
                if transport == "stdio":
                    await serve_stdio(server)
                else:
                    await serve_http(server, host, port, path, url)

    run(serve, log_level=log_level, errors=(ControlPlaneError, OSError), name="mcp")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
