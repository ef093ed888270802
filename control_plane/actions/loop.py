"""The agent loop: an LLM (any litellm provider) that acts only through ``kernel.submit``.

:class:`AgentLoop` asks the model, turns each tool call into an :class:`ActionRequest` through
its :class:`ToolDef` and hands it to ``submit`` (the kernel's): that is the only way a tool call
does anything (``tests/unit/test_agent_loop.py`` checks the method's source). Denials and bad
arguments go back to the model as the tool's result; model errors are retried by a fixed rule,
then raised as :class:`LLMError`. How to run one as a kernel agent, and the rules: ``docs/agents.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agent_os.amb import tracing as _tracing
from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.actions.tools import ToolArgumentError, ToolDef
from agent_os.control_plane.errors import ControlPlaneError, KernelError

log = logging.getLogger(__name__)

SubmitFn = Callable[[ActionRequest], Awaitable[ActionResult]]
"""What the loop acts through: ``kernel.submit`` (or a callable with its contract)."""

INSTALL_HINT: Final = "AgentLoop calls models through litellm: pip install 'agent-os[llm]'"
MAX_TOOL_OUTPUT: Final = 20_000
MAX_TOOL_CALLS: Final = 32
_RESERVED: Final = frozenset({"model", "messages", "tools", "stream", "stream_options", "timeout"})


class LLMError(ControlPlaneError):
    """The model could not be asked: a non-transient error (HTTP 4xx, a malformed reply), or a
    transient one (HTTP 429 or 5xx, a timeout, a connection error) on every attempt.
    ``attempts``: how many were made; the provider's error is chained (``__cause__``)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens the model's replies counted, summed over the turns."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One tool call the model made: its ``id``, tool ``name`` and ``arguments`` (the raw text
    when it was not JSON), the ``action`` and ``target`` it became (None when the arguments
    could not make a request), whether the kernel ``allowed`` it, its ``output``, its ``error``
    (the denial's reason, the action's failure, or why the arguments were refused) and the
    flight-recorder ``record_id`` of its outcome or denial (None: never submitted)."""

    id: str
    name: str
    arguments: Any
    action: str | None
    target: str | None
    allowed: bool
    output: Any
    error: str | None
    record_id: str | None

    @property
    def ok(self) -> bool:
        return self.allowed and self.error is None


@dataclass(frozen=True, slots=True)
class AgentLoopResult:
    """What a run came to: the model's final ``text``, every ``tool_calls`` record in order,
    the ``turns`` (model calls) made, the token ``usage``, the whole conversation
    (``messages``) and ``finish_reason``: ``"stop"`` (the model answered) or ``"max_turns"``
    (it still called tools when the turns ran out; ``text`` is then its last content, often
    empty)."""

    text: str
    tool_calls: tuple[ToolCallRecord, ...]
    turns: int
    usage: TokenUsage
    messages: tuple[dict[str, Any], ...]
    finish_reason: Literal["stop", "max_turns"]


@dataclass(slots=True)
class _Reply:
    content: str | None
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class AgentLoop:
    """A model with tools whose calls go through ``submit``.

    Args: ``submit`` (``kernel.submit``), ``tools`` (the :class:`ToolDef` s offered), ``model``
    (a litellm model id: ``"openai/gpt-4o-mini"``, ``"anthropic/claude-3-5-haiku-latest"``,
    ``"ollama/llama3"`` ...), ``system`` (a system prompt), ``max_turns`` (model calls per
    run), ``stream`` (ask for a streamed reply), ``api_base``, ``api_key``, ``params`` (more
    ``litellm.acompletion`` arguments: ``temperature`` ...), ``timeout`` (seconds per model
    call), ``retries`` and ``backoff`` (the retry rule of :meth:`run`), ``agent_id`` (put in
    every request; None: the running agent), ``max_tool_output`` (characters of a tool's
    result the model gets), ``max_tool_calls`` (tool calls of one reply that are submitted; the
    rest get an error result). Raises KernelError for two tools of one name, ``max_turns`` < 1,
    negative ``retries``, or ``params`` naming what the loop sets itself."""

    def __init__(
        self,
        submit: SubmitFn,
        tools: Sequence[ToolDef],
        model: str,
        *,
        system: str | None = None,
        max_turns: int = 10,
        stream: bool = False,
        api_base: str | None = None,
        api_key: str | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        agent_id: str | None = None,
        max_tool_output: int = MAX_TOOL_OUTPUT,
        max_tool_calls: int = MAX_TOOL_CALLS,
    ) -> None:
        self.tools: dict[str, ToolDef] = {}
        for tool in tools:
            if not isinstance(tool, ToolDef):
                raise KernelError(f"tools must be ToolDef objects, got {type(tool).__name__}")
            if tool.name in self.tools:
                raise KernelError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        whole(max_turns, "max_turns", error=KernelError)
        whole(retries, "retries", 0, error=KernelError)
        seconds(timeout, "timeout", error=KernelError)
        whole(max_tool_output, "max_tool_output", error=KernelError)
        whole(max_tool_calls, "max_tool_calls", error=KernelError)
        clash = _RESERVED & set(params or {})
        if clash:
            raise KernelError(f"params may not set {', '.join(sorted(clash))}: the loop sets them")
        self._submit = submit
        self.model = model
        self.system = system
        self.max_turns = max_turns
        self.stream = stream
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.agent_id = agent_id
        self.max_tool_output = max_tool_output
        self.max_tool_calls = max_tool_calls
        self._params: dict[str, Any] = dict(params or {})
        if api_base is not None:
            self._params["api_base"] = api_base
        if api_key is not None:
            self._params["api_key"] = api_key
        self._openai_tools = [t.to_openai() for t in self.tools.values()]

    def __repr__(self) -> str:
        return f"AgentLoop(model={self.model!r}, tools={list(self.tools)!r})"

    async def run(self, task: str | Sequence[Mapping[str, Any]]) -> AgentLoopResult:
        """Run the conversation from ``task`` (the user's message, or a list of messages) until
        the model answers without calling a tool, or ``max_turns`` model calls were made.

        Each tool call is submitted in the order the model made it; a denied or failed call,
        and arguments that make no request (bad JSON, an unknown tool, a missing target), are
        the tool's result for the model, never an exception. Retry rule: a transient model
        error (HTTP 429 or 5xx, a timeout, a connection error) is retried ``retries`` times,
        waiting ``backoff`` seconds, doubled each time; another error is not.
        Raises LLMError when a model call fails for good, ImportError (naming the ``llm``
        extra) without litellm, RecorderError from ``submit``, and CancelledError when the
        task is cancelled (a SIGKILL of the agent running it): the model call or the action
        in progress is cancelled with it."""
        with _tracing.span(
            "agent_loop.run", {"gen_ai.request.model": self.model, "agent_os.agent.id": self.agent_id}
        ) as span:
            result = await self._run(task)
            if span is not None:
                span.set_attributes(
                    {
                        "agent_os.agent_loop.turns": result.turns,
                        "agent_os.agent_loop.finish": result.finish_reason,
                    }
                )
            return result

    async def _run(self, task: str | Sequence[Mapping[str, Any]]) -> AgentLoopResult:
        messages = self._start(task)
        attributes = {"gen_ai.request.model": self.model}
        records: list[ToolCallRecord] = []
        usage = TokenUsage()
        extra = {"event": "agent_loop.start", "model": self.model, "max_turns": self.max_turns}
        log.info("agent loop start: %s, %d tools", self.model, len(self.tools), extra=extra)
        reply = _Reply(None)
        for turn in range(1, self.max_turns + 1):
            with _tracing.span("agent_loop.turn", {**attributes, "agent_os.agent_loop.turn": turn}):
                reply = await self._complete(messages, turn)
                usage = TokenUsage(
                    usage.prompt_tokens + reply.prompt_tokens,
                    usage.completion_tokens + reply.completion_tokens,
                )
                messages.append(_assistant(reply))
                log.info(
                    "agent loop turn %d: %d tool calls",
                    turn,
                    len(reply.calls),
                    extra={
                        "event": "agent_loop.turn",
                        "model": self.model,
                        "turn": turn,
                        "tool_calls": [c[1] for c in reply.calls],
                        "prompt_tokens": reply.prompt_tokens,
                        "completion_tokens": reply.completion_tokens,
                    },
                )
                if not reply.calls:
                    return self._done(reply, records, turn, usage, messages, "stop")
                for n, call in enumerate(reply.calls):
                    if n < self.max_tool_calls:
                        record = await self._execute_tool_call(call)
                    else:  # a reply asking for hundreds of actions gets only the first ones done
                        record = _refused(call, f"more than {self.max_tool_calls} tool calls in one reply")
                    records.append(record)
                    self._log_call(turn, record)
                    messages.append(
                        {"role": "tool", "tool_call_id": record.id, "content": self._content(record)}
                    )
        log.warning(
            "agent loop stopped after %d turns with tool calls pending",
            self.max_turns,
            extra={"event": "agent_loop.max_turns", "model": self.model, "turn": self.max_turns},
        )
        return self._done(reply, records, self.max_turns, usage, messages, "max_turns")

    async def _execute_tool_call(self, call: tuple[str, str, str]) -> ToolCallRecord:
        """The one way a tool call acts: an ActionRequest through ``submit``."""
        try:
            request = self._request_for(call)
        except ToolArgumentError as exc:
            return _refused(call, str(exc))
        result = await self._submit(request)
        return _record(call, request, result)

    def _request_for(self, call: tuple[str, str, str]) -> ActionRequest:
        _, name, text = call
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            raise ToolArgumentError(f"unknown tool {name[:80]!r} (tools: {known})")
        try:
            arguments = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise ToolArgumentError(f"the arguments of {name} are not JSON: {exc}") from None
        return tool.request(arguments, self.agent_id)

    def _content(self, record: ToolCallRecord) -> str:
        if record.ok:
            body: dict[str, Any] = {"ok": True, "output": record.output}
        elif not record.allowed and record.record_id is not None:
            body = {"ok": False, "denied": True, "error": record.error}
        else:
            body = {"ok": False, "error": record.error}
        text = json.dumps(body, default=_jsonable, ensure_ascii=False)
        if len(text) > self.max_tool_output:
            cut = len(text) - self.max_tool_output
            text = text[: self.max_tool_output] + f"... [{cut} more characters cut]"
        return text

    def _start(self, task: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system})
        if isinstance(task, str):
            messages.append({"role": "user", "content": task})
        else:
            messages.extend(dict(m) for m in task)
        if not messages:
            raise KernelError("an agent loop needs a task (a message or a list of messages)")
        return messages

    def _done(
        self,
        reply: _Reply,
        records: list[ToolCallRecord],
        turns: int,
        usage: TokenUsage,
        messages: list[dict[str, Any]],
        finish: Literal["stop", "max_turns"],
    ) -> AgentLoopResult:
        extra = {
            "event": "agent_loop.done",
            "model": self.model,
            "turns": turns,
            "finish_reason": finish,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        }
        log.info("agent loop done after %d turns (%s)", turns, finish, extra=extra)
        return AgentLoopResult(reply.content or "", tuple(records), turns, usage, tuple(messages), finish)

    def _log_call(self, turn: int, record: ToolCallRecord) -> None:
        extra = {
            "event": "agent_loop.tool_call",
            "model": self.model,
            "turn": turn,
            "tool": record.name,
            "action": record.action,
            "target": record.target,
            "allowed": record.allowed,
            "error": record.error,
            "record_id": record.record_id,
        }
        level = logging.INFO if record.ok else logging.WARNING
        log.log(level, "agent loop tool call %s: %s", record.name, _status(record), extra=extra)

    # -- the model -----------------------------------------------------------------------------

    async def _complete(self, messages: list[dict[str, Any]], turn: int) -> _Reply:
        litellm = await _litellm()
        from agent_os.cmvk._calls import chat_attributes, transient

        with _tracing.span(f"chat {self.model}", chat_attributes(self.model), kind="client") as span:
            reply = await self._complete_with_retries(litellm, messages, turn, transient)
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.usage.input_tokens": reply.prompt_tokens,
                        "gen_ai.usage.output_tokens": reply.completion_tokens,
                        "agent_os.agent_loop.tool_calls": len(reply.calls),
                    }
                )
            return reply

    async def _complete_with_retries(
        self,
        litellm: Any,
        messages: list[dict[str, Any]],
        turn: int,
        transient: Callable[[BaseException], bool],
    ) -> _Reply:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._ask(litellm, messages)
            except Exception as exc:  # every provider error is classified, never leaks raw
                retry = isinstance(exc, TimeoutError) or transient(exc)
                what = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                extra = {
                    "event": "agent_loop.llm_error",
                    "model": self.model,
                    "turn": turn,
                    "attempt": attempt,
                    "retry": retry and attempt <= self.retries,
                    "error": what,
                }
                log.error("agent loop model error (attempt %d): %s", attempt, what, extra=extra)
                if not retry or attempt > self.retries:
                    raise LLMError(f"{self.model}: {what} (after {attempt} attempt(s))", attempt) from exc
            await asyncio.sleep(self.backoff * 2 ** (attempt - 1))

    async def _ask(self, litellm: Any, messages: list[dict[str, Any]]) -> _Reply:
        kwargs: dict[str, Any] = dict(self._params)
        if self._openai_tools:
            kwargs["tools"] = self._openai_tools
        started = time.monotonic()
        if self.stream:
            stream = await litellm.acompletion(
                model=self.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                timeout=self.timeout,
                max_retries=0,
                **kwargs,
            )
            chunks = [chunk async for chunk in stream]
            response = litellm.stream_chunk_builder(chunks, messages=messages)
        else:
            response = await litellm.acompletion(
                model=self.model, messages=messages, timeout=self.timeout, max_retries=0, **kwargs
            )
        log.debug("model replied in %.3fs", time.monotonic() - started)
        return _parse(response)


async def run_agent_loop(
    submit: SubmitFn,
    task: str | Sequence[Mapping[str, Any]],
    tools: Sequence[ToolDef],
    model: str,
    **options: Any,
) -> AgentLoopResult:
    """Run one task through a new :class:`AgentLoop` (``options``: its keyword arguments) and
    return its result. Raises what :meth:`AgentLoop.run` raises."""
    return await AgentLoop(submit, tools, model, **options).run(task)


async def _litellm() -> Any:
    from agent_os.cmvk._client import ensure_client

    try:
        return await ensure_client()
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def _parse(response: Any) -> _Reply:
    try:
        message = response.choices[0].message
    except (AttributeError, IndexError, TypeError):
        raise ValueError("the model's reply has no message") from None
    content = getattr(message, "content", None)
    reply = _Reply(content if isinstance(content, str) else None)
    for n, call in enumerate(getattr(message, "tool_calls", None) or ()):
        function = getattr(call, "function", None)
        name = getattr(function, "name", None)
        if not isinstance(name, str):
            raise ValueError("a tool call of the model's reply has no function name")
        arguments = getattr(function, "arguments", None)
        call_id = getattr(call, "id", None)
        reply.calls.append(
            (
                call_id if isinstance(call_id, str) and call_id else f"call_{n}",
                name,
                arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
            )
        )
    usage = getattr(response, "usage", None)
    for key in ("prompt_tokens", "completion_tokens"):
        value = getattr(usage, key, None)
        if isinstance(value, int):
            setattr(reply, key, value)
    return reply


def _assistant(reply: _Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in reply.calls
        ]
    return message


def _refused(call: tuple[str, str, str], error: str) -> ToolCallRecord:
    call_id, name, text = call
    return ToolCallRecord(call_id, name, text, None, None, False, None, error, None)


def _record(call: tuple[str, str, str], request: ActionRequest, result: ActionResult) -> ToolCallRecord:
    call_id, name, text = call
    try:
        arguments: Any = json.loads(text) if text.strip() else {}
    except ValueError:  # pragma: no cover - parsed once already
        arguments = text
    return ToolCallRecord(
        call_id,
        name,
        arguments,
        request.action,
        request.target,
        result.allowed,
        result.output,
        result.error,
        result.record_id,
    )


def _status(record: ToolCallRecord) -> str:
    if record.ok:
        return "ok"
    if record.record_id is None:
        return f"refused: {record.error}"
    return f"denied: {record.error}" if not record.allowed else f"failed: {record.error}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)
