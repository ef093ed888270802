"""ToolDef: metadata only; the model's arguments to an ActionRequest; the OpenAI tools form."""

from __future__ import annotations

from typing import Any

import pytest

from agent_os import ActionRequest, ToolDef
from agent_os.control_plane import BUILTIN_TOOLS, KernelError
from agent_os.control_plane.actions import ToolArgumentError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"customer": {"type": "string"}, "fields": {"type": "array"}, "limit": {"type": "integer"}},
    "required": ["customer"],
}


def test_arguments_map_to_target_and_params() -> None:
    tool = ToolDef("lookup", "Look a customer up", SCHEMA, "crm.lookup", "customer")
    request = tool.request({"customer": "c-1", "limit": 3}, agent_id="a")
    assert request == ActionRequest("crm.lookup", "c-1", {"limit": 3}, "a")

    renamed = ToolDef(
        "lookup", "", SCHEMA, "crm.lookup", "customer", params={"fields": "columns"}, fixed={"source": "tool"}
    )
    assert renamed.request({"customer": "c", "fields": ["name"]}).params == {
        "columns": ["name"],
        "source": "tool",
    }
    with pytest.raises(ToolArgumentError, match="takes no argument 'limit'"):
        renamed.request({"customer": "c", "limit": 1})
    # fixed params win over the model's
    fixed = ToolDef("lookup", "", SCHEMA, "crm.lookup", "customer", fixed={"limit": 1})
    assert fixed.request({"customer": "c", "limit": 99}).params == {"limit": 1}


@pytest.mark.parametrize(
    ("arguments", "why"),
    [
        ([], "JSON object"),
        ({}, "missing required argument"),
        ({"customer": 1}, "must be a string"),
        ({"customer": "c", "extra": 1}, "takes no argument 'extra'"),
    ],
)
def test_bad_arguments_are_refused(arguments: Any, why: str) -> None:
    tool = ToolDef("lookup", "", SCHEMA, "crm.lookup", "customer")
    with pytest.raises(ToolArgumentError, match=why):
        tool.request(arguments)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"name": "has space"}, "tool name"),
        ({"name": "x" * 65}, "tool name"),
        ({"parameters": {"type": "string"}}, "type 'object'"),
        ({"target": "limit"}, "required property"),
        ({"target": "nope"}, "required property"),
        ({"params": {"customer": "c"}}, "not also a param"),
    ],
)
def test_bad_definitions_are_refused(kwargs: dict[str, Any], why: str) -> None:
    base: dict[str, Any] = {
        "name": "lookup",
        "description": "",
        "parameters": SCHEMA,
        "action": "crm.lookup",
        "target": "customer",
    }
    with pytest.raises(KernelError, match=why):
        ToolDef(**{**base, **kwargs})


def test_to_openai_is_the_tools_list_entry_litellm_takes() -> None:
    tool = ToolDef("lookup", "Look a customer up", SCHEMA, "crm.lookup", "customer")
    assert tool.to_openai() == {
        "type": "function",
        "function": {"name": "lookup", "description": "Look a customer up", "parameters": SCHEMA},
    }


def test_builtin_tools_cover_the_builtin_actions() -> None:
    assert {t.action for t in BUILTIN_TOOLS.values()} == set(BUILTIN_TOOLS)
    assert set(BUILTIN_TOOLS) == {"fs.read", "fs.write", "fs.list", "bus.request", "bus.publish"}
    write = BUILTIN_TOOLS["fs.write"].request({"path": "a/b.txt", "content": "x"})
    assert write == ActionRequest("fs.write", "a/b.txt", {"content": "x", "parents": True})
    ask = BUILTIN_TOOLS["bus.request"].request({"subject": "expert.ask", "message": "hi"})
    assert ask == ActionRequest("bus.request", "expert.ask", {"payload": "hi"})
    for tool in BUILTIN_TOOLS.values():
        entry = tool.to_openai()["function"]
        assert entry["parameters"]["additionalProperties"] is False
        assert entry["description"]


def test_a_fixed_target_makes_every_argument_a_param() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    tool = ToolDef("srv__search", "Search.", schema, "mcp.call", "", fixed_target="srv/search")
    request = tool.request({"q": "x"}, "a")
    assert (request.target, dict(request.params)) == ("srv/search", {"q": "x"})
    with pytest.raises(KernelError, match="fixed_target"):
        ToolDef("t", "T.", schema, "mcp.call", "q", fixed_target="srv/search")
