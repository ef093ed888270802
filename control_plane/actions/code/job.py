"""What a code run is given and gives back: :class:`CodeLimits`, :class:`CodeResult`, the tools
as script functions (:class:`ScriptTool`), and the plain-data rule values cross backends by.

A backend gets a :class:`Job` (the code, its inputs, the tools' script names and parameters,
the limits) and a :data:`ToolCall` function; it gives back a :class:`RunOutcome`. The
``code.run`` provider (:mod:`.provider`) turns that into a :class:`CodeResult`.
"""

from __future__ import annotations

import builtins
import keyword
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from agent_os.amb.numbers import seconds, shown, whole
from agent_os.control_plane.actions.loop import ToolCallRecord
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.actions.request import ActionResult
from agent_os.control_plane.actions.tools import ToolArgumentError, ToolDef
from agent_os.control_plane.errors import ControlPlaneError, KernelError

MAX_CODE: Final = 1 << 20
"""The longest code text (characters) ``code.run`` accepts."""
_MiB: Final = 1 << 20
_MAX_DEPTH: Final = 32


class CodeError(ControlPlaneError):
    """A code run failed (its ``CodeResult.error`` says why); raised by ``CodeResult.unwrap``."""


class ToolDenied(PermissionError):
    """A tool call from code was denied by the kernel (the script sees a PermissionError)."""


class ToolFailed(RuntimeError):
    """A tool call from code was allowed but its action failed (a RuntimeError in the script)."""


_MOST_AMOUNT = 2**61  # within pydantic-monty's and prlimit's 64 bits, with room for the interpreter's share


@dataclass(frozen=True, slots=True)
class CodeLimits:
    """Limits of one run, the same on both backends.

    ``timeout``: seconds the code may run, not counting the time its tool calls take (each is
    an action with its own limits; a SIGSTOP holds the script at a tool call); ``memory``:
    bytes (Monty: its heap; CPython: the address space of each process, so a little more is
    needed for the interpreter itself); ``max_output``: bytes of printed output;
    ``max_tool_calls``: tool calls per run; ``max_artifacts``: bytes of files the code may
    leave in its workspace (CPython); ``processes``: processes and threads (CPython).
    Raises KernelError for a value that is not positive."""

    timeout: float = 30.0
    memory: int = 512 * _MiB
    max_output: int = 1 * _MiB
    max_tool_calls: int = 1000
    max_artifacts: int = 10 * _MiB
    processes: int = 32

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if name == "timeout":
                plain: float = seconds(value, "code limit timeout", error=KernelError)
            else:
                plain = whole(value, f"code limit {name}", error=KernelError)
                if plain > _MOST_AMOUNT:
                    raise KernelError(f"code limit {name} must be at most 2**61, got {shown(value)}")
            object.__setattr__(self, name, plain)  # a plain int or float (NumPy's are taken by value)

    def within(self, ceiling: CodeLimits) -> None:
        """Raise ActionRefused when a limit is above ``ceiling``'s (the provider's)."""
        for name in self.__slots__:
            if getattr(self, name) > getattr(ceiling, name):
                raise ActionRefused(
                    f"code limit {name}={getattr(self, name)} is above this kernel's {getattr(ceiling, name)}"
                )


@dataclass(frozen=True, slots=True)
class CodeResult:
    """What a code run came to (``kernel.run_code``).

    ``value``: the value of the code's last expression statement (plain data: None, bool,
    int, float, str, bytes, lists and dicts; anything else comes back as its ``repr``);
    ``stdout``: what it printed (stdout and stderr, in order); ``artifacts``: files it left in
    its workspace (CPython: relative path -> bytes); ``error``: why the run failed or was
    denied (``"PermissionError: read_file denied: ..."``, a limit, a syntax error), None when
    it succeeded; ``tool_calls``: every tool call it made, in order (each with its own
    flight-recorder ``record_id``; not its ``output``, which the code had, and long texts
    among its arguments cut); ``backend``; ``allowed``: whether the kernel let the run start;
    ``record_id``: the run's ``action_outcome`` record (or its denial's)."""

    value: Any = None
    stdout: str = ""
    artifacts: Mapping[str, bytes] = field(default_factory=dict)
    error: str | None = None
    tool_calls: tuple[ToolCallRecord, ...] = ()
    backend: str = ""
    allowed: bool = True
    record_id: str | None = None

    @property
    def ok(self) -> bool:
        """The run was allowed and the code finished without an error."""
        return self.allowed and self.error is None

    @classmethod
    def of(cls, result: ActionResult, backend: str) -> CodeResult:
        """The CodeResult of ``code.run``'s ActionResult: the provider's (with the outcome's
        record id), or one that only says why (a denial, a failure with no output)."""
        output = result.output
        if isinstance(output, CodeResult):
            return replace(output, error=result.error, allowed=result.allowed, record_id=result.record_id)
        return cls(error=result.error, backend=backend, allowed=result.allowed, record_id=result.record_id)

    def unwrap(self) -> Any:
        """The value; raises CodeError with ``error`` when the run failed or was denied."""
        if not self.ok:
            raise CodeError(self.error or "the code run failed")
        return self.value


@dataclass(frozen=True, slots=True)
class ScriptTool:
    """A tool as the script calls it: ``name`` (a Python identifier: the ToolDef's name with
    ``-`` as ``_``), the ``tool`` and its ``parameters`` in the order positional arguments
    fill them."""

    name: str
    tool: ToolDef
    parameters: tuple[str, ...]

    def arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The tool's arguments from a script call. Raises ToolArgumentError for too many
        positional arguments, one given twice, or a keyword that is not a string."""
        if len(args) > len(self.parameters):
            raise ToolArgumentError(
                f"{self.name}() takes at most {len(self.parameters)} positional arguments ({len(args)} given)"
            )
        arguments = dict(zip(self.parameters, args, strict=False))
        for key, value in kwargs.items():
            if not isinstance(key, str):
                raise ToolArgumentError(f"{self.name}(): keyword names are strings")
            if key in arguments:
                raise ToolArgumentError(f"{self.name}() got multiple values for argument {key!r}")
            arguments[key] = value
        return arguments


def script_tools(tools: Sequence[ToolDef]) -> dict[str, ScriptTool]:
    """The tools by their script names. Raises ActionRefused for something that is not a
    ToolDef, a name that is not an identifier, a Python keyword or builtin, or two tools of
    one script name."""
    found: dict[str, ScriptTool] = {}
    for tool in tools:
        if not isinstance(tool, ToolDef):
            raise ActionRefused(f"tools are ToolDef objects, got {type(tool).__name__}")
        name = tool.name.replace("-", "_")
        if not name.isidentifier() or keyword.iskeyword(name) or hasattr(builtins, name):
            raise ActionRefused(f"tool {tool.name!r} cannot be a Python function name")
        if name in found:
            raise ActionRefused(f"two tools are called {name!r} in code")
        properties = tool.parameters.get("properties") or {}
        required = [p for p in tool.parameters.get("required") or () if p in properties]
        order = (*required, *(p for p in properties if p not in required))
        found[name] = ScriptTool(name, tool, tuple(str(p) for p in order))
    return found


@dataclass(frozen=True, slots=True)
class Job:
    """What a backend runs: ``code``, ``inputs`` (plain data, bound as globals), ``tools`` (script
    name -> parameter order) and ``limits``."""

    code: str
    inputs: Mapping[str, Any]
    tools: Mapping[str, tuple[str, ...]]
    limits: CodeLimits

    def wire(self) -> dict[str, Any]:
        """The job as plain data (for the CPython runner)."""
        limits = {name: getattr(self.limits, name) for name in CodeLimits.__slots__}
        tools = {name: list(params) for name, params in self.tools.items()}
        return {"code": self.code, "inputs": dict(self.inputs), "tools": tools, "limits": limits}


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What a backend gives back: ``value``, ``stdout``, ``artifacts`` and ``error`` (as in
    :class:`CodeResult`)."""

    value: Any = None
    stdout: str = ""
    artifacts: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    error: str | None = None


ToolCall = Callable[[str, Sequence[Any], Mapping[str, Any]], Awaitable[Any]]
"""How a backend calls a tool: ``await call(script_name, args, kwargs)`` returns the action's
output, or raises ToolDenied, ToolFailed or ToolArgumentError (a TypeError in the script)."""


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as plain data (None, bool, int, float, str, bytes, lists, dicts with string
    keys): mappings become dicts, tuples and sets lists, anything else its ``repr``."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if depth >= _MAX_DEPTH:
        return repr(value)[:1000]
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, str) else k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return repr(value)


def check_inputs(inputs: Any) -> dict[str, Any]:
    """The inputs as plain data; raises ActionRefused for a mapping whose keys are not
    identifiers, or values that are not plain data."""
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping):
        raise ActionRefused(f"inputs are a mapping of names to values, got {type(inputs).__name__}")
    for key, value in inputs.items():
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            raise ActionRefused(f"input name {key!r} is not a Python identifier")
        if not _is_plain(value, 0):
            raise ActionRefused(
                f"input {key!r} is not plain data (None, bool, int, float, str, bytes, lists, dicts)"
            )
    return {k: plain(v) for k, v in inputs.items()}


def _is_plain(value: Any, depth: int) -> bool:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return True
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def error_text(kind: str, message: str) -> str:
    """How a run's error reads: ``"<exception type>: <message>"``."""
    return f"{kind}: {message}" if message else kind
