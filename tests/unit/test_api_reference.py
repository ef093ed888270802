"""``docs/api-reference.md`` against the code: every exported name is on the page, and every
signature entry on it matches what ``inspect.signature`` says.

Signature entries live in fenced blocks whose info string is ``python signature``. An entry
starts on an unindented line and continues on indented ones; its forms are

    [async |classmethod ]Qual.name(params)[ -> return]   a callable (a class: its constructor)
    Qual.name: type                                        an attribute or property
    Qual.MEMBER = value                                    an enum member

``Qual`` is a dotted name: ``agent_os.x.y`` is imported, anything else is looked up in the
modules of ``_LOOKUP``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"

# The modules whose __all__ the page documents, and where unqualified names are looked up.
_DOCUMENTED = ("agent_os", "agent_os.modules", "agent_os.control_plane")
_LOOKUP = ("agent_os.control_plane", "agent_os.modules")
# Classes whose every public attribute must have an entry (KernelSpace is left out: besides its
# API it has methods the mediator calls, which are not part of the API).
_COMPLETE = (
    "AMB",
    "IATP",
    "EMK",
    "CMVK",
    "Policy",
    "SignalDispatcher",
    "FlightRecorder",
    "AgentSignal",
)

_ENTRY = re.compile(
    r"^(?P<prefix>(?:async |classmethod )*)(?P<name>[A-Za-z_][\w.]*)"
    r"(?:(?P<params>\(.*)|: (?P<type>.+)| = (?P<value>.+))?$"
)


def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r" ([)\]])", r"\1", text)
    return text.replace(", )", ")")


def _entries(markdown: str) -> list[str]:
    """Every signature entry on the page, continuation lines joined."""
    entries: list[str] = []
    block: list[str] | None = None
    for line in markdown.splitlines():
        if block is None:
            if line.strip() == "```python signature":
                block = []
            continue
        if line.strip() == "```":
            entries.extend(_normalize(e) for e in block)
            block = None
        elif line[:1].isspace() and block:
            block[-1] += " " + line.strip()
        elif line.strip():
            block.append(line)
    assert block is None, "an unclosed signature block"
    return entries


def _resolve(dotted: str) -> tuple[Any, Any, str]:
    """(owner, object, last name) for a dotted name."""
    parts = dotted.split(".")
    if parts[0] == "agent_os":
        for cut in range(len(parts) - 1, 0, -1):
            try:
                owner: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            rest = parts[cut:]
            break
        else:
            raise AssertionError(f"cannot import any module of {dotted}")
    else:
        found = [m for m in map(importlib.import_module, _LOOKUP) if hasattr(m, parts[0])]
        assert found, f"{parts[0]} is not exported by any of {_LOOKUP}"
        owner, rest = found[0], parts
    for name in rest[:-1]:
        owner = getattr(owner, name)
    assert hasattr(owner, rest[-1]), f"{dotted} does not exist"
    return owner, getattr(owner, rest[-1]), rest[-1]


def _annotation(value: Any) -> str:
    if isinstance(value, typing.ForwardRef):  # a NamedTuple's fields under postponed annotations
        return value.__forward_arg__
    return value if isinstance(value, str) else inspect.formatannotation(value)


def _default(value: Any) -> str:
    if (inspect.isfunction(value) or inspect.isbuiltin(value)) and getattr(value, "__module__", None):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def render(obj: Any) -> str:
    """``(params) -> return`` of ``obj`` as the page writes it (constructors without the return)."""
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    parts: list[str] = []
    star = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        star = star or p.kind is p.VAR_POSITIONAL
        stars: dict[inspect._ParameterKind, str] = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}
        text = stars.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += ": " + _annotation(p.annotation)
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _default(p.default)
        parts.append(text)
        last_positional = i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY
        if p.kind is p.POSITIONAL_ONLY and last_positional:
            parts.append("/")
    out = "(" + ", ".join(parts) + ")"
    if sig.return_annotation is not sig.empty and not inspect.isclass(obj):
        out += " -> " + _annotation(sig.return_annotation)
    return out


def _attribute_type(owner: Any, name: str) -> str | None:
    """The declared type of ``owner.name`` (a property's return, a field's annotation), if any."""
    raw = inspect.getattr_static(owner, name, None)
    if isinstance(raw, property) and raw.fget is not None:
        ret = inspect.signature(raw.fget).return_annotation
        return None if ret is inspect.Signature.empty else _annotation(ret)
    for cls in getattr(owner, "__mro__", ()):
        hints = inspect.get_annotations(cls)
        if name in hints:
            return _annotation(hints[name])
    return None


def check_entry(entry: str) -> str | None:
    """Why ``entry`` does not match the code, or None when it does."""
    m = _ENTRY.match(entry)
    if m is None:
        return f"not an entry: {entry!r}"
    owner, obj, name = _resolve(m["name"])
    prefix = m["prefix"]
    if m["params"] is not None:
        if "async " in prefix and not inspect.iscoroutinefunction(obj):
            return f"{m['name']} is not a coroutine function"
        if "async " not in prefix and inspect.iscoroutinefunction(obj):
            return f"{m['name']} is a coroutine function: write 'async'"
        is_classmethod = isinstance(inspect.getattr_static(owner, name), classmethod)
        if ("classmethod " in prefix) != is_classmethod:
            return f"{m['name']}: 'classmethod' does not match the code"
        expected = _normalize(render(obj))
        if _normalize(m["params"]) != expected:
            return f"{m['name']}: the page says {m['params']}, the code says {expected}"
        return None
    if m["value"] is not None:
        actual = obj.value if isinstance(obj, enum.Enum) else obj
        if m["value"] != repr(actual):
            return f"{m['name']}: the page says {m['value']}, the code says {actual!r}"
        return None
    if m["type"] is not None:
        declared = _attribute_type(owner, name)
        if declared is not None and _normalize(declared) != m["type"]:
            return f"{m['name']}: the page says {m['type']}, the code says {declared}"
    return None


def _documented_heads(markdown: str) -> set[str]:
    """Names the page documents: entry heads (``KernelSpace`` of ``KernelSpace.execute``, the
    last part of ``agent_os.__version__``) and names opening a table row (`` | `Name` ``)."""
    heads = set()
    for entry in _entries(markdown):
        m = _ENTRY.match(entry)
        if m is not None:
            parts = m["name"].split(".")
            heads.add(parts[-1] if parts[0] == "agent_os" else parts[0])
    for row in re.findall(r"^\| *(`[^|]+)\|", markdown, re.M):
        heads.update(re.findall(r"`(\w+)`", row))
    return heads


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_the_page_has_signature_entries(page: str) -> None:
    assert len(_entries(page)) > 150


@pytest.mark.parametrize("module", _DOCUMENTED)
def test_every_exported_name_is_documented(page: str, module: str) -> None:
    exported = set(importlib.import_module(module).__all__)
    missing = sorted(exported - _documented_heads(page))
    assert not missing, f"{module} exports names docs/api-reference.md does not document: {missing}"


@pytest.mark.parametrize("class_name", _COMPLETE)
def test_every_public_attribute_of_the_main_classes_is_documented(page: str, class_name: str) -> None:
    _, cls, _ = _resolve(class_name)
    documented = {e.split("(")[0].split(":")[0].split(" = ")[0].split(" ")[-1] for e in _entries(page)}
    public = {n for n in dir(cls) if not n.startswith("_")}
    missing = sorted(n for n in public if f"{class_name}.{n}" not in documented)
    assert not missing, f"{class_name} has public attributes the page does not document: {missing}"


def test_every_signature_entry_matches_the_code(page: str) -> None:
    problems = [p for p in map(check_entry, _entries(page)) if p is not None]
    assert not problems, "docs/api-reference.md has drifted from the code:\n" + "\n".join(problems)


def test_a_drifted_entry_is_caught() -> None:
    # The checker itself: a wrong default, a missing 'async', a wrong enum value or type, an
    # unknown name.
    dispatcher = (
        "SignalDispatcher(kernel: SignalHost | None = None, queue_size: int = {}, "
        "async_delivery: bool = True)"
    )
    execute = (
        "KernelSpace.execute(agent: Callable[..., Any], *args: Any, timeout: float | None = None, "
        "context: Mapping[str, Any] | None = None, **kwargs: Any) -> Any"
    )
    assert check_entry("KernelSpace.get_agent_status(agent_id: str) -> AgentStatus") is None
    assert check_entry("AgentSignal.SIGKILL = 9") is None
    assert check_entry("Decision.allowed: bool") is None
    assert check_entry(dispatcher.format(1000)) is None
    assert check_entry("async " + execute) is None
    assert check_entry(dispatcher.format(10)) is not None
    assert check_entry(execute) is not None
    assert check_entry("AgentSignal.SIGKILL = 15") is not None
    assert check_entry("Decision.allowed: str") is not None
    with pytest.raises(AssertionError):
        check_entry("KernelSpace.no_such_method() -> None")


def test_dataclass_fields_and_typing_forms_render() -> None:
    # The renderer on the shapes the page uses: keyword-only markers and string annotations.
    @dataclasses.dataclass
    class Sample:
        a: int
        b: typing.Literal["x", "y"] = "x"

    assert render(Sample) == "(a: int, b: typing.Literal['x', 'y'] = 'x')"
