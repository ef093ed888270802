"""The ``code.run`` provider (:class:`CodeRunner`): agent-written Python on the Monty or the
CPython backend, each tool a function whose call is ``kernel.submit`` as the same agent.

A request is ``ActionRequest("code.run", backend, {"code": ..., "tools": [ToolDef, ...],
"inputs": {...}, "limits": CodeLimits(...)})`` (``kernel.run_code`` builds it). The resource is
the backend's name; the policy's context has ``code`` (the text), ``content`` (the code, for
content rules), ``backend`` and ``tools`` (their names). How to use it:
``docs/code-execution.md``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from agent_os.amb.numbers import whole
from agent_os.control_plane.actions.code.cpython import CPythonBackend
from agent_os.control_plane.actions.code.job import (
    MAX_CODE,
    CodeLimits,
    CodeResult,
    Job,
    RunOutcome,
    ScriptTool,
    ToolCall,
    ToolDenied,
    ToolFailed,
    check_inputs,
    script_tools,
)
from agent_os.control_plane.actions.code.monty import MontyBackend
from agent_os.control_plane.actions.loop import SubmitFn, ToolCallRecord
from agent_os.control_plane.actions.provider import ActionFailed, ActionRefused
from agent_os.control_plane.actions.tools import ToolArgumentError, ToolDef
from agent_os.control_plane.errors import KernelError, SandboxUnavailable
from agent_os.control_plane.sandbox import check_available

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest, ActionResult

Backend = Literal["monty", "cpython"]
BACKENDS: Final = ("monty", "cpython")


class CodeBackend(Protocol):
    """What runs code: :class:`MontyBackend`, :class:`CPythonBackend`."""

    @property
    def name(self) -> str: ...

    async def run(self, job: Job, call: ToolCall) -> RunOutcome: ...

    async def close(self) -> None: ...


class CodeRunner:
    """The ``code.run`` action (permission ``execute``).

    ``submit``: what tool calls go through (``kernel.submit``); ``limits``: the default limits
    of a run and the most one may ask for; ``pool_size``: Monty workers and CPython sandboxes
    kept warm (each backend starts on its first run); ``default_tools``: ToolDefs every run
    gets unless it brings one of the same name (a sequence, or a callable asked on each run:
    the kernel's gives ``ask_llm`` while ``llm.ask`` is registered). :meth:`close` stops
    both backends. Raises KernelError for a negative ``pool_size``."""

    ACTION: Final = "code.run"
    PERMISSION: Final = "execute"

    def __init__(
        self,
        submit: SubmitFn,
        *,
        limits: CodeLimits | None = None,
        pool_size: int = 2,
        default_tools: Sequence[ToolDef] | Callable[[], Sequence[ToolDef]] = (),
    ) -> None:
        whole(pool_size, "pool_size", 0, error=KernelError)
        self.submit = submit
        self.limits = limits or CodeLimits()
        self.default_tools = default_tools
        self.backends: dict[str, CodeBackend] = {
            "cpython": CPythonBackend(self.limits, pool_size=pool_size),
            "monty": MontyBackend(pool_size=max(pool_size, 1)),
        }

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``code.run`` (permission ``execute``) in ``registry``."""
        registry.register(self.ACTION, self, self.PERMISSION, replace=replace)

    async def close(self) -> None:
        """Stop the Monty workers and close the pooled sandboxes; idempotent."""
        for backend in self.backends.values():
            await backend.close()

    # -- the provider -----------------------------------------------------------------------------

    def resource(self, request: ActionRequest) -> str:
        """The backend's name. Refuses an unknown backend, CPython where the host cannot
        sandbox (never unsandboxed), code that is not a string or is over :data:`MAX_CODE`
        characters, tools that cannot be functions, inputs that are not plain data, and limits
        above the provider's."""
        self._prepare(request)
        return request.target

    def context(self, request: ActionRequest) -> dict[str, Any]:
        """``code``, ``content`` (``(code,)``: content rules judge the code), ``backend`` and
        ``tools`` (the names the code can call)."""
        code, tools, _, _ = self._prepare(request)
        return {"code": code, "content": (code,), "backend": request.target, "tools": sorted(tools)}

    async def run(self, request: ActionRequest) -> CodeResult:
        """Run the code; its :class:`CodeResult`. A failure of the code (an exception, a limit)
        raises ActionFailed carrying the result (what it printed and the tool calls made),
        so the outcome is recorded with the error."""
        code, tools, inputs, limits = self._prepare(request)
        records: list[ToolCallRecord] = []
        # Tool calls act in this run's context (the running agent, the trace), whichever task
        # serves them: a pooled sandbox's channel was opened in another agent's context.
        call = _Caller(self.submit, tools, request.agent_id, records, contextvars.copy_context())
        job = Job(code, inputs, {name: t.parameters for name, t in tools.items()}, limits)
        outcome = await self.backends[request.target].run(job, call)
        result = CodeResult(
            outcome.value,
            outcome.stdout,
            MappingProxyType(dict(outcome.artifacts)),
            outcome.error,
            tuple(records),
            request.target,
        )
        if outcome.error is not None:
            raise ActionFailed(outcome.error, result)
        return result

    def _prepare(
        self, request: ActionRequest
    ) -> tuple[str, dict[str, ScriptTool], dict[str, Any], CodeLimits]:
        if request.target not in BACKENDS:
            raise ActionRefused(f"unknown code backend {request.target!r} (monty or cpython)")
        if request.target == "cpython":
            try:
                check_available()
            except SandboxUnavailable as exc:
                raise ActionRefused(f"the cpython backend needs a sandbox: {exc}") from None
        params = request.params
        code = params.get("code")
        if not isinstance(code, str):
            raise ActionRefused("params['code'] must be the code as a string")
        if len(code) > MAX_CODE:
            raise ActionRefused(f"code of {len(code)} characters is over the limit of {MAX_CODE}")
        given = params.get("tools", ())
        if isinstance(given, ToolDef | str) or not isinstance(given, Sequence):
            raise ActionRefused("params['tools'] must be a list of ToolDef")
        tools = list(given)
        extra = self.default_tools() if callable(self.default_tools) else self.default_tools
        names = {t.name for t in tools if isinstance(t, ToolDef)}
        tools += [t for t in extra if isinstance(t, ToolDef) and t.name not in names]
        limits = params.get("limits") or self.limits
        if not isinstance(limits, CodeLimits):
            raise ActionRefused("params['limits'] must be a CodeLimits")
        limits.within(self.limits)
        functions, inputs = script_tools(tools), check_inputs(params.get("inputs"))
        clash = sorted(set(functions) & set(inputs))
        if clash:
            raise ActionRefused(f"input {clash[0]!r} has the name of a tool")
        return code, functions, inputs, limits


_BRIEF: Final = 200


def _brief(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments as a record keeps them: a text or bytes over 200 characters as its start
    and its length (a run of many large calls must not hold them all)."""
    kept: dict[str, Any] = {}
    for key, value in arguments.items():
        if isinstance(value, str | bytes) and len(value) > _BRIEF:
            kept[key] = (
                f"{value[:_BRIEF]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
            )
        else:
            kept[key] = value
    return kept


class _Caller:
    """A tool call from the code: the tool's ActionRequest through ``submit`` as the agent of
    the run, with its record kept for the result."""

    def __init__(
        self,
        submit: SubmitFn,
        tools: Mapping[str, ScriptTool],
        agent_id: str | None,
        records: list[ToolCallRecord],
        context: contextvars.Context,
    ) -> None:
        self.submit = submit
        self.tools = tools
        self.agent_id = agent_id
        self.records = records
        self.context = context

    async def __call__(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        call_id = f"call_{len(self.records)}"
        tool = self.tools.get(name)
        if tool is None:
            raise ToolArgumentError(f"unknown tool {name[:80]!r}")
        try:
            arguments = tool.arguments(args, kwargs)
            request = tool.tool.request(arguments, self.agent_id)
        except ToolArgumentError as exc:
            self.records.append(
                ToolCallRecord(call_id, name, dict(kwargs), None, None, False, None, str(exc), None)
            )
            raise
        submitting = asyncio.get_running_loop().create_task(self._submit(request), context=self.context)
        result = await submitting  # cancelling this call cancels the submit too
        self.records.append(
            ToolCallRecord(
                call_id,
                name,
                _brief(arguments),
                request.action,
                request.target,
                result.allowed,
                None,  # the code got the output; a run's records must not hold every one of them
                result.error,
                result.record_id,
            )
        )
        if not result.allowed:
            raise ToolDenied(f"{name} denied: {result.error}")
        if result.error is not None:
            raise ToolFailed(f"{name} failed: {result.error}")
        return result.output

    async def _submit(self, request: ActionRequest) -> ActionResult:
        return await self.submit(request)
