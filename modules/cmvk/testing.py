"""A scripted OpenAI-compatible chat server, for testing CMVK panels without paid APIs.

Point litellm at it with ``api_base=server.url`` and a model id ``"openai/<name>"``: requests
travel the real HTTP path through litellm. Each model name has a script of replies
(content, delay, HTTP status, or a raw body such as malformed JSON)::

    async with ScriptedLLMServer({
        "gpt-4": Reply(verdict("supported"), delay=0.2),
        "claude-3": [Reply(status=500), Reply(verdict("supported"))],  # fails once, then answers
        "gemini-pro": Reply(delay=30),                                  # hangs: a timeout
    }) as server:
        cmvk = CMVK([ModelSpec(n, model=f"openai/{n}") for n in ("gpt-4", "claude-3", "gemini-pro")],
                    api_base=server.url, api_key="test")

A list of replies is played in order, its last entry repeating; a callable receives the
request's JSON body and returns the reply. Unscripted models get ``default`` (HTTP 404 when
None). A reply can carry tool calls (``Reply(tool_calls=[tool_call("read_file", {"path":
"a.txt"})])``, for agent loops), and a request with ``"stream": true`` is answered as OpenAI
streams: server-sent events of deltas, a tool call's arguments in pieces, the usage in a last
chunk when ``stream_options.include_usage`` asks for it, then ``data: [DONE]``. ``GET
/v1/models`` lists the scripted models (a health check). Needs aiohttp (installed with litellm,
the ``llm`` extra).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted reply: ``content`` and ``tool_calls`` (see :func:`tool_call`) after
    ``delay`` seconds with ``status``; ``body`` replaces the whole response body (e.g.
    ``"{not json"``; a streamed request gets it as is, too)."""

    content: str | None = None
    delay: float = 0.0
    status: int = 200
    body: str | None = None
    prompt_tokens: int = 20
    completion_tokens: int = 10
    tool_calls: Sequence[Mapping[str, str]] = ()


_call_ids: Iterator[int] = itertools.count(1)


def tool_call(name: str, arguments: Mapping[str, Any] | str, id: str | None = None) -> dict[str, str]:
    """One tool call of a :class:`Reply`: the tool's ``name`` and its ``arguments`` (a mapping,
    sent as JSON, or the raw text: malformed JSON is allowed); ``id`` defaults to a new one."""
    text = arguments if isinstance(arguments, str) else json.dumps(dict(arguments))
    return {"id": id or f"call_{next(_call_ids)}", "name": name, "arguments": text}


ScriptSpec = Reply | Sequence[Reply] | Callable[[dict[str, Any]], Reply]
"""A model's script: one reply, replies played in order (the last repeats), or a function."""


def verdict(verdict: str, confidence: float = 0.9, reason: str = "checked") -> str:
    """The JSON text of a well-formed CMVK verdict."""
    return json.dumps({"verdict": verdict, "confidence": confidence, "reason": reason})


@dataclass(frozen=True, slots=True)
class Request:
    """A request the server received: the model, the messages, when it arrived and when its
    reply was sent (``time.monotonic()``; ``replied_at`` is None while the reply is pending or
    when the client gave up first), the ``tools`` offered and whether it asked to ``stream``."""

    model: str
    messages: list[dict[str, Any]]
    at: float
    replied_at: float | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool = False


class ScriptedLLMServer:
    """See the module docstring. ``url`` is the ``api_base`` (``http://127.0.0.1:PORT/v1``)
    once started; ``requests`` lists what was received."""

    def __init__(
        self,
        scripts: Mapping[str, ScriptSpec] | None = None,
        default: Reply | None = None,
    ) -> None:
        self._scripts: dict[str, ScriptSpec] = dict(scripts or {})
        self._default = default
        self._served: dict[str, int] = {}
        self.requests: list[Request] = []
        self._runner: Any = None
        self.url = ""

    def script(self, model: str, replies: ScriptSpec) -> None:
        """Replace the script of ``model`` (its played-reply count restarts)."""
        self._scripts[model] = replies
        self._served.pop(model, None)

    def hits(self, model: str) -> int:
        """How many requests ``model`` received."""
        return sum(1 for r in self.requests if r.model == model)

    def _reply_for(self, model: str, body: dict[str, Any]) -> Reply | None:
        script = self._scripts.get(model)
        if script is None:
            return self._default
        if isinstance(script, Reply):
            return script
        if callable(script):
            return script(body)
        n = self._served.get(model, 0)
        self._served[model] = n + 1
        return script[min(n, len(script) - 1)]

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        try:
            body = await request.json()
            model = str(body["model"])
            messages = list(body.get("messages", []))
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": {"message": "bad request", "type": "invalid_request"}}, status=400
            )
        index = len(self.requests)
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        stream = body.get("stream") is True
        self.requests.append(Request(model, messages, time.monotonic(), tools=tools, stream=stream))
        response = await self._respond(model, body, request)  # a client that gave up cancels this
        self.requests[index] = replace(self.requests[index], replied_at=time.monotonic())
        return response

    async def _models(self, request: Any) -> Any:
        """``GET /v1/models``: the scripted models, as OpenAI lists models (a health check)."""
        from aiohttp import web

        data = [{"id": m, "object": "model", "owned_by": "scripted"} for m in self._scripts]
        return web.json_response({"object": "list", "data": data})

    async def _respond(self, model: str, body: dict[str, Any], request: Any) -> Any:
        from aiohttp import web

        reply = self._reply_for(model, body)
        if reply is None:
            return web.json_response(
                {"error": {"message": f"no model {model}", "type": "not_found"}}, status=404
            )
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.body is not None:
            return web.Response(text=reply.body, status=reply.status, content_type="application/json")
        if reply.status != 200:
            error = {"error": {"message": f"scripted failure {reply.status}", "type": "server_error"}}
            return web.json_response(error, status=reply.status)
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, model, reply, usage)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in reply.tool_calls
            ]
        return web.json_response(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": _finish(reply)}],
                "usage": _usage(reply),
            }
        )

    async def _stream(self, request: Any, model: str, reply: Reply, usage: bool) -> Any:
        from aiohttp import web

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        head = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            data = json.dumps({**head, "choices": choices, **extra})
            await response.write(f"data: {data}\n\n".encode())

        def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": d, "finish_reason": finish}]

        await send(delta({"role": "assistant", "content": ""}))
        for piece in _pieces(reply.content or "", 12):
            await send(delta({"content": piece}))
        for i, call in enumerate(reply.tool_calls):
            first = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": ""},
            }
            await send(delta({"tool_calls": [first]}))
            for piece in _pieces(call["arguments"], 8):
                await send(delta({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
        await send(delta({}, _finish(reply)))
        if usage:
            await send([], usage=_usage(reply))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (default: a free port of 127.0.0.1); return ``url``, which
        names 127.0.0.1 when ``host`` is every interface (``0.0.0.0``)."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        # handler_cancellation: a client that gave up (timeout) stops its scripted delay, so
        # close() does not wait for hanging replies.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0][1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{bound}/v1"
        return self.url

    async def close(self) -> None:
        """Stop listening. Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> ScriptedLLMServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _finish(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else "stop"


def _usage(reply: Reply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
