"""MCP servers' tools as governed actions: :class:`McpTools`, the ``mcp.call`` provider, and
:func:`mcp_tool_defs`, their tools as :class:`ToolDef` s for the agent loop.

A call is ``ActionRequest("mcp.call", "<server>/<tool>", arguments)``: policy judges the resource
``<server>/<tool>`` (permission and operation ``execute``), so rules apply per server and tool.
The official ``mcp`` SDK (``pip install 'agent-os[mcp]'``) is imported on first use. How to use
it and its limits: ``docs/agents.md``, "Tools of MCP servers".
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.actions.tools import ToolDef
from agent_os.control_plane.errors import ControlPlaneError, KernelError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest

log = logging.getLogger("agent_os.control_plane.actions.mcp")

INSTALL_HINT: Final = "MCP needs the official SDK: pip install 'agent-os[mcp]'"
MAX_OUTPUT: Final = 100_000
"""Characters of a tool's result (its JSON) :class:`McpTools` accepts by default."""
TIMEOUT: Final = 30.0
"""Seconds a connection and call may take by default, the listing included."""
_SERVER: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")

ServerSpec = str | Sequence[str]
"""An MCP server: a URL (``http://`` or ``https://``: streamable HTTP) or a command and its
arguments (stdio: the command is started for each connection, and stopped with it)."""


class McpError(ControlPlaneError):
    """An MCP server could not be reached, listed or called, or its answer is refused (an
    unknown tool, arguments the tool's schema rejects, a result over the limit, a tool error).
    As an action's failure it is the result's ``error``."""


class McpTools:
    """The ``mcp.call`` provider: each tool of each server in ``servers`` (name -> URL or
    command, names of 1-32 letters, digits, ``_`` or ``-``) is the resource ``<server>/<tool>``.

    A call checks the tool exists and the arguments match its input schema, calls it over the
    server's connection, and returns its structured content, else its text (text blocks
    joined; other blocks as their JSON). Everything (connecting, listing and the call) is
    bounded by ``timeout`` seconds, the result by ``max_output`` characters of JSON. Raises
    KernelError for a bad server name, spec or limit.

    **Connections.** Each server has one connection (the SDK's client; a stdio server is one
    process), opened by the first call and kept for the calls after it, concurrent ones
    included. A call that fails on it (the transport or the protocol fails, the server dies
    or does not answer in time; not an error the server answers with) retires it: later calls
    open a new one, and the old one is closed (a stdio server stopped) once the calls still on
    it have ended. A caller that is cancelled leaves it open, but the server must then answer
    a listing within ``timeout``, or the connection is retired. A stdio server's output that
    is not UTF-8 is read with replacement characters (the line is then a logged parse error).
    Used from another event loop, the tools open new connections there. :meth:`close`
    (``async with McpTools(...)``, or closing the kernel it is registered in) closes them all;
    a call after that opens a new one. ``connections`` counts those opened."""

    ACTION: Final = "mcp.call"
    PERMISSION: Final = "execute"

    def __init__(
        self,
        servers: Mapping[str, ServerSpec],
        *,
        timeout: float = TIMEOUT,
        max_output: int = MAX_OUTPUT,
    ) -> None:
        seconds(timeout, "timeout", error=KernelError)
        whole(max_output, "max_output", error=KernelError)
        self.servers: Mapping[str, ServerSpec] = MappingProxyType(
            {k: _spec(k, v) for k, v in servers.items()}
        )
        self.timeout = timeout
        self.max_output = max_output
        self.connections = 0
        self._tools: dict[str, dict[str, Any]] = {}
        self._checks: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {}
        self._open: dict[str, _Connection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._live: set[_Connection] = set()  # every connection whose task has not ended, opening ones too
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> McpTools:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection (stopping stdio servers), waiting for calls still on them;
        a later call opens a new one. Never raises."""
        connections = list(self._live)
        self._open.clear()
        tasks = []
        for connection in connections:
            connection.retire()
            tasks.append(connection.task)
            if connection.probe is not None:
                connection.probe.cancel()
                tasks.append(connection.probe)
        await asyncio.gather(*tasks, return_exceptions=True)

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``mcp.call`` (permission ``execute``) in ``registry``."""
        registry.register(self.ACTION, self, self.PERMISSION, replace=replace)

    # -- listing ----------------------------------------------------------------------------------

    async def list_tools(self, server: str, *, refresh: bool = False) -> Mapping[str, Any]:
        """The tools of ``server``, name -> the SDK's ``Tool`` (kept after the first listing;
        ``refresh`` lists again). Raises McpError when the server cannot be reached or listed
        in time, KernelError for a server not configured."""
        if server not in self.servers:
            raise KernelError(f"unknown MCP server {server!r} (servers: {', '.join(self.servers) or 'none'})")
        if refresh or server not in self._tools:
            listing = await self._with_client(server, _list_all)
            self._tools[server] = {tool.name: tool for tool in listing}
            self._checks = {k: v for k, v in self._checks.items() if k[0] != server}
        return MappingProxyType(self._tools[server])

    # -- the provider ----------------------------------------------------------------------------

    def resource(self, request: ActionRequest) -> str:
        """``<server>/<tool>``; raises ActionRefused for another form or an unknown server."""
        server, sep, tool = request.target.partition("/")
        if not sep or not tool or server not in self.servers:
            known = ", ".join(self.servers) or "none"
            raise ActionRefused(f"an mcp.call target is <server>/<tool> of a known server ({known})")
        return request.target

    async def run(self, request: ActionRequest) -> Any:
        """Call the tool with the request's params as its arguments; its output (see the class).
        Raises McpError for an unknown tool, arguments its schema rejects, a tool error, a
        result over ``max_output``, or a server that fails, dies or does not answer in time."""
        server, _, name = request.target.partition("/")
        tools = await self.list_tools(server)
        tool = tools.get(name)
        if tool is None:
            raise McpError(f"unknown tool {name[:80]!r} on MCP server {server}")
        arguments = dict(request.params)
        check = self._checks.get((server, name))
        if check is None:
            check = self._checks[(server, name)] = _arguments_check(tool.input_schema, request.target)
        check(arguments)

        async def call(client: Any) -> Any:
            return await client.call_tool(name, arguments)

        result = await self._with_client(server, call)
        return self._output(request.target, result)

    # -- internals -------------------------------------------------------------------------------

    async def _with_client(self, server: str, use: Any) -> Any:
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                connection = await self._connection(server)
            return await connection.call(use, deadline)
        except TimeoutError:
            raise McpError(f"MCP server {server} did not answer within {self.timeout:g}s") from None
        except McpError:
            raise
        except Exception as exc:  # the SDK's, the transport's and the process's errors alike
            raise McpError(f"MCP server {server} failed: {_describe(exc)}") from exc

    async def _connection(self, server: str) -> _Connection:
        """The server's open connection, opened now when there is none (one opener at a time)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # locks and connections belong to the loop they were made in
            self._loop, self._opening, self._open = loop, {}, {}
        connection = self._open.get(server)
        if connection is not None and connection.usable:
            return connection
        lock = self._opening.setdefault(server, asyncio.Lock())
        async with lock:
            connection = self._open.get(server)
            if connection is not None and connection.usable:
                return connection
            try:
                import mcp
            except ImportError as exc:
                raise McpError(INSTALL_HINT) from exc
            spec = self.servers[server]
            target: Any
            if isinstance(spec, str):
                target = spec
            else:
                target = mcp.StdioServerParameters(
                    command=spec[0], args=list(spec[1:]), encoding_error_handler="replace"
                )
            client = mcp.Client(target, read_timeout_seconds=self.timeout, cache=None)
            connection = _Connection(client, self._live, self.timeout)
            await connection.opened()  # raises what opening raised; the task is then over
            self._open[server] = connection
            self.connections += 1
            return connection

    def _output(self, target: str, result: Any) -> Any:
        if result.is_error:
            raise McpError(f"{target} returned an error: {_text(result.content)[:2000]}")
        output: Any = result.structured_content
        if output is None:
            output = _text(result.content)
        size = len(json.dumps(output, default=str))
        if size > self.max_output:
            raise McpError(
                f"the result of {target} is {size} characters, over the limit of {self.max_output}"
            )
        return output


class _Connection:
    """One open connection to a server. The SDK's client is entered and left by a task of its
    own (its context must be left by the task that entered it), which holds it open until the
    connection is retired and no call is on it."""

    __slots__ = ("_calls", "_live", "_ready", "_stop", "_timeout", "client", "failed", "probe", "task")

    def __init__(self, client: Any, live: set[_Connection], timeout: float) -> None:
        self.client = client
        self.failed = False
        self._calls = 0
        self._live = live
        self._timeout = timeout
        self.probe: asyncio.Task[None] | None = None  # see call()
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = loop.create_future()
        self.task = loop.create_task(self._hold(), name="mcp connection")
        live.add(self)

    @property
    def usable(self) -> bool:
        return not self.failed and not self.task.done()

    async def opened(self) -> None:
        """Wait until the client is connected; raises what connecting raised. When the caller
        is cancelled (or times out) here, the half-open connection is closed."""
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            self.task.cancel()
            await asyncio.wait([self.task])
            raise

    async def call(self, use: Any, deadline: float) -> Any:
        """``use(client)`` by ``deadline`` (the loop's clock; TimeoutError after it). A failure,
        the timeout included, retires the connection, except an error the server answered with
        (a JSON-RPC error response). A cancelled caller does not retire it, but starts a probe:
        a listing that must be answered within the timeout, or the connection is retired (so a
        wedged server is replaced even when every caller gives up before the timeout)."""
        self._calls += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await use(self.client)
        except Exception as exc:  # the timeout's TimeoutError too: the server did not answer in time
            if not _answered(exc):
                self.failed = True
            raise
        except asyncio.CancelledError:
            if self.probe is None and not self.failed:
                self.probe = asyncio.get_running_loop().create_task(self._ping(), name="mcp probe")
            raise
        finally:
            self._calls -= 1
            if self.failed:
                self.retire()

    def retire(self) -> None:
        """Take no more calls; close once the calls on it have ended."""
        self.failed = True
        if self._calls == 0:
            self._stop.set()

    async def _ping(self) -> None:
        # A listing, not a ping: ping is gone from the 2026-07-28 protocol.
        try:
            async with asyncio.timeout(self._timeout):
                await self.client.list_tools()
        except Exception as exc:
            if not _answered(exc):
                self.retire()
        finally:
            self.probe = None

    async def _hold(self) -> None:
        try:
            async with self.client:
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                if isinstance(exc, asyncio.CancelledError):
                    self._ready.cancel()
                else:
                    self._ready.set_exception(exc)
            elif not isinstance(exc, Exception):
                raise
            else:  # the connection broke while open: its calls have failed already
                log.debug("an MCP connection ended with %s", _describe(exc))
        finally:
            self.failed = True
            self._live.discard(self)


async def mcp_tool_defs(tools: McpTools, servers: Sequence[str] | None = None) -> list[ToolDef]:
    """The tools of ``servers`` (default: all of ``tools``'s) as :class:`ToolDef` s of
    ``mcp.call`` on ``<server>/<tool>``: named ``<server>__<tool>`` (characters outside
    letters, digits, ``_`` and ``-`` become ``_``, cut to 64), with the server's description
    and input schema. Raises McpError when a server cannot be listed, KernelError when two
    tools get one name or a schema cannot be a tool's."""
    defs: list[ToolDef] = []
    names: set[str] = set()
    for server in servers if servers is not None else list(tools.servers):
        for name, tool in (await tools.list_tools(server)).items():
            tool_name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{name}")[:64]
            if tool_name in names:
                raise KernelError(f"two MCP tools are named {tool_name!r}")
            names.add(tool_name)
            schema = dict(tool.input_schema or {})
            schema.setdefault("type", "object")
            description = tool.description or tool.title or f"The tool {name} of the MCP server {server}."
            defs.append(
                ToolDef(tool_name, description, schema, McpTools.ACTION, "", fixed_target=f"{server}/{name}")
            )
    return defs


def _spec(name: str, spec: ServerSpec) -> ServerSpec:
    if not isinstance(name, str) or _SERVER.fullmatch(name) is None:
        raise KernelError(f"an MCP server name is 1-32 letters, digits, '_' or '-', got {name!r}")
    if isinstance(spec, str):
        if not spec.startswith(("http://", "https://")):
            raise KernelError(f"MCP server {name}: a URL is http(s)://..., a command is a list")
        return spec
    command = tuple(spec)
    if not command or not all(isinstance(part, str) and part for part in command):
        raise KernelError(f"MCP server {name}: a command is a non-empty list of strings")
    return command


async def _list_all(client: Any) -> list[Any]:
    tools: list[Any] = []
    cursor: str | None = None
    for _ in range(100):  # a server whose pages never end cannot hang the listing
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _arguments_check(schema: Mapping[str, Any] | None, target: str) -> Callable[[dict[str, Any]], None]:
    """The check of a tool's arguments against its input schema (``jsonschema``; the schema is
    checked and compiled once, not on every call): raises McpError naming what does not match,
    or, on every call, that the schema itself is invalid. The schema is the server's and the
    arguments the model's, so its regexes (``pattern``, ``patternProperties``) run on RE2
    (linear time) rather than Python's backtracking ``re``; one RE2 cannot run fails the call."""
    import jsonschema

    from agent_os.control_plane.errors import PolicyError

    document = dict(schema or {"type": "object"})
    try:
        cls = jsonschema.validators.validator_for(document)
        cls.check_schema(document)
    except jsonschema.SchemaError as exc:
        message = f"{target} has an invalid input schema: {exc.message[:300]}"

        def refuse(arguments: dict[str, Any]) -> None:
            raise McpError(message)

        return refuse
    validator = _with_re2(cls)(document)

    def check(arguments: dict[str, Any]) -> None:
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        except PolicyError as exc:  # a regex of the schema that RE2 cannot run
            raise McpError(f"{target} has an input schema regex that is refused: {exc}") from None
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            raise McpError(
                f"the arguments do not match the schema of {target}: {where}: {error.message[:300]}"
            )

    return check


def _with_re2(cls: Any) -> Any:
    """``cls`` (a jsonschema validator class) with the keywords that run regexes (``pattern``,
    ``patternProperties``, and ``additionalProperties``, which skips the names those match)
    matching by RE2, each pattern compiled once (:func:`compile_regex`; PolicyError for one RE2
    cannot run)."""
    from jsonschema import ValidationError, validators

    from agent_os.control_plane.policy.regex import compile_regex

    compiled: dict[str, Any] = {}

    def search(pattern: str, text: str) -> bool:
        regex = compiled.get(pattern)
        if regex is None:
            regex = compiled[pattern] = compile_regex(pattern)
        return regex.search(text) is not None

    def pattern(validator: Any, regex: str, instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "string") and not search(regex, instance):
            yield ValidationError(f"{instance!r} does not match {regex!r}")

    def pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "object"):
            for regex, subschema in patterns.items():
                for name, value in instance.items():
                    if search(regex, name):
                        yield from validator.descend(value, subschema, path=name, schema_path=regex)

    def additional_properties(validator: Any, extra: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        names = [
            name
            for name in instance
            if name not in known and not any(search(regex, name) for regex in patterns)
        ]
        if validator.is_type(extra, "object"):
            for name in names:
                yield from validator.descend(instance[name], extra, path=name)
        elif not extra and names:
            listed = ", ".join(repr(name) for name in sorted(names))
            yield ValidationError(f"additional properties are not allowed ({listed})")

    keywords = {
        "pattern": pattern,
        "patternProperties": pattern_properties,
        "additionalProperties": additional_properties,
    }
    return validators.extend(cls, keywords)


def _answered(exc: BaseException) -> bool:
    """Whether ``exc`` is an error the server answered with (the connection works), rather than
    the SDK's own for a closed connection or a request that timed out."""
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

    return isinstance(exc, MCPError) and exc.code not in (CONNECTION_CLOSED, REQUEST_TIMEOUT)


def _text(content: Sequence[Any]) -> str:
    parts = []
    for block in content:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else json.dumps(block.model_dump(mode="json")))
    return "\n".join(parts)


def _describe(exc: BaseException) -> str:
    # anyio and the SDK raise exception groups from their task groups: name the first leaf.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]
