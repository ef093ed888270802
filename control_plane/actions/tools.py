"""Tools an LLM may call: :class:`ToolDef`, metadata only, and the built-in ones.

A ToolDef names a tool for the model (name, description, JSON-schema parameters) and says
which action a call of it is and how the model's arguments become the action's target and
params. It holds no code: what a call does is the action's provider, reached only through
``kernel.submit`` (:mod:`agent_os.control_plane.actions.loop`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from agent_os.control_plane.actions.request import ActionRequest
from agent_os.control_plane.errors import KernelError

_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolArgumentError(ValueError):
    """The model's arguments for a tool cannot make an action request (missing target, an
    argument the tool does not take ...). The loop sends the message back to the model."""


@dataclass(frozen=True, slots=True)
class ToolDef:
    """A tool for the model, mapped to an action.

    ``name`` (what the model calls: letters, digits, ``_`` and ``-``, at most 64),
    ``description``, ``parameters`` (a JSON schema of type ``object``), ``action`` (the
    registered action a call submits), ``target`` (the argument that is the action's target),
    ``params`` (argument -> action param name; None: every other argument under its own
    name), ``fixed`` (params every call gets; the model cannot override them).
    Raises KernelError for a bad name, a schema that is not an object, or a ``target`` the
    schema does not list as a required string."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    action: str
    target: str
    params: Mapping[str, str] | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    fixed_target: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _TOOL_NAME.fullmatch(self.name) is None:
            raise KernelError(f"a tool name is 1-64 letters, digits, '_' or '-', got {self.name!r}")
        schema = self.parameters
        if not isinstance(schema, Mapping) or schema.get("type") != "object":
            raise KernelError(f"tool {self.name}: parameters must be a JSON schema of type 'object'")
        props = schema.get("properties") or {}
        if self.fixed_target is not None:
            if self.target or not isinstance(self.fixed_target, str) or not self.fixed_target:
                raise KernelError(f"tool {self.name}: a fixed_target is a non-empty string, with target ''")
        elif self.target not in props or self.target not in (schema.get("required") or ()):
            raise KernelError(f"tool {self.name}: target {self.target!r} must be a required property")
        if self.params is not None and self.target in self.params:
            raise KernelError(f"tool {self.name}: the target {self.target!r} is not also a param")
        object.__setattr__(self, "parameters", MappingProxyType(dict(schema)))
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))
        if self.params is not None:
            object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def to_openai(self) -> dict[str, Any]:
        """The tool as OpenAI's (and litellm's) ``tools`` list takes it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": _plain(self.parameters),
            },
        }

    def request(self, arguments: Mapping[str, Any], agent_id: str | None = None) -> ActionRequest:
        """The action request of a call with the model's ``arguments`` (already parsed JSON).

        Raises ToolArgumentError for arguments that are not an object, a missing required
        argument, a target that is not a string, or an argument the tool does not take."""
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(f"the arguments of {self.name} must be a JSON object")
        missing = [r for r in self.parameters.get("required") or () if r not in arguments]
        if missing:
            raise ToolArgumentError(f"{self.name}: missing required argument(s): {', '.join(missing)}")
        target = self.fixed_target if self.fixed_target is not None else arguments[self.target]
        if not isinstance(target, str):
            raise ToolArgumentError(f"{self.name}: {self.target} must be a string")
        known = self.parameters.get("properties") or {}
        params: dict[str, Any] = {}
        for key, value in arguments.items():
            if key == self.target and self.fixed_target is None:
                continue
            if key not in known or (self.params is not None and key not in self.params):
                raise ToolArgumentError(f"{self.name} takes no argument {str(key)[:80]!r}")
            params[self.params[key] if self.params is not None else key] = value
        params.update(self.fixed)
        return ActionRequest(self.action, target, params, agent_id)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _schema(
    required: Mapping[str, tuple[str, str]], optional: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, Any]:
    props = {k: {"type": t, "description": d} for k, (t, d) in {**required, **(optional or {})}.items()}
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_PATH = ("string", "A path relative to the workspace")

BUILTIN_TOOLS: Final[Mapping[str, ToolDef]] = MappingProxyType(
    {
        "fs.read": ToolDef(
            "read_file",
            "Read a UTF-8 text file of the workspace.",
            _schema({"path": _PATH}),
            "fs.read",
            "path",
        ),
        "fs.write": ToolDef(
            "write_file",
            "Write a UTF-8 text file of the workspace (replacing it; missing directories are made).",
            _schema({"path": _PATH, "content": ("string", "The text to write")}),
            "fs.write",
            "path",
            fixed={"parents": True},
        ),
        "fs.list": ToolDef(
            "list_files",
            "List a directory of the workspace: name, type and size of each entry.",
            _schema({"path": ("string", "A directory relative to the workspace ('.' is the root)")}),
            "fs.list",
            "path",
        ),
        "bus.request": ToolDef(
            "ask_agent",
            "Ask another agent on the bus and wait for its answer.",
            _schema(
                {
                    "subject": ("string", "The subject the agent listens on"),
                    "message": ("string", "What to ask"),
                }
            ),
            "bus.request",
            "subject",
            params={"message": "payload"},
        ),
        "bus.publish": ToolDef(
            "tell_agent",
            "Send a message to another agent on the bus without waiting for an answer.",
            _schema(
                {
                    "subject": ("string", "The subject the agent listens on"),
                    "message": ("string", "The message"),
                }
            ),
            "bus.publish",
            "subject",
            params={"message": "payload"},
        ),
    }
)
"""Tools of the built-in actions, by action name (``BUILTIN_TOOLS["fs.read"]`` is
``read_file``). The ``fs.write`` tool makes missing directories (``parents``)."""
