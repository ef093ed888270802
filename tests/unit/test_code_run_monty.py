"""kernel.run_code and the code.run action on the Monty backend (real pydantic-monty workers):
tools as functions through submit, denials raised in the script, the records, limits and
hostile code, signals, and the refusals before anything runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent_os.cmvk.testing import Reply
from agent_os.control_plane import AgentSignal, Pattern, Policy
from agent_os.control_plane.actions import CodeError, CodeLimits, CodeResult, ToolDef
from agent_os.control_plane.actions.code import provider as provider_module
from agent_os.control_plane.errors import SandboxUnavailable
from agent_os.control_plane.policy.patterns import ContentPattern
from tests.support import wait_until
from tests.support.code_exec import SCRIPT, SMALL, TOOLS, check_tools_and_records, code_kernel, run_as_agent


async def test_two_tools_and_ask_llm_run_through_submit(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, server):
        result = await run_as_agent(kernel, SCRIPT, tools=TOOLS)
        assert result.backend == "monty"
        await check_tools_and_records(kernel, server, result)


async def test_an_uncaught_denial_is_the_runs_error_and_recorded(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        code = 'print("before")\nwrite_file("x.txt", "data")\nprint("after")'
        result = await run_as_agent(kernel, code, tools=TOOLS)
        assert not result.ok
        assert result.allowed
        assert result.error is not None
        assert result.error.startswith("PermissionError: write_file denied: agent coder lacks permission")
        assert result.stdout == "before\n"
        assert [c.name for c in result.tool_calls] == ["write_file"]
        with pytest.raises(CodeError, match="write_file denied"):
            result.unwrap()
        (outcome,) = [r for r in await kernel.recorder.query(event_type="action_outcome")]
        assert outcome.id == result.record_id
        assert (outcome.data["action"], outcome.data["status"]) == ("code.run", "error")
        assert outcome.data["error"] == result.error
        assert not (tmp_path / "x.txt").exists()


async def test_inputs_values_and_the_run_outside_agent_code(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        kernel.external("batch")  # outside agent code, a process the kernel knows acts
        code = "[x * 2 for x in numbers] + [len(text), None]"
        result = await kernel.run_code(code, inputs={"numbers": [1, 2], "text": "abc"}, agent_id="batch")
        assert result.value == [2, 4, 3, None]
        assert (await kernel.run_code("f = lambda: 1\nf", agent_id="batch")).value.startswith("<function")
        nobody = await kernel.run_code("1")
        assert not nobody.allowed
        assert "needs an agent_id" in (nobody.error or "")


async def test_tool_arguments_are_checked_like_the_agent_loops(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        code = """
errors = []
calls = [lambda: read_file(), lambda: read_file("a", "b")]
calls += [lambda: read_file(path=3), lambda: read_file("a", path="b")]
for call in calls:
    try:
        call()
    except TypeError as exc:
        errors.append(str(exc))
errors
"""
        result = await run_as_agent(kernel, code, tools=TOOLS)
        assert result.ok, result.error
        assert "missing required argument(s): path" in result.value[0]
        assert "at most 1 positional" in result.value[1]
        assert "path must be a string" in result.value[2]
        assert "multiple values" in result.value[3]


async def test_the_run_itself_is_governed(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):

        async def reader() -> CodeResult:
            return await kernel.run_code("1")

        agent = kernel.register(reader, name="reader", permissions=["read"])
        result = await kernel.execute(agent)
        assert not result.allowed
        assert "lacks permission for execute" in (result.error or "")
        (denial,) = await kernel.recorder.query(event_type="permission_denied")
        assert denial.id == result.record_id
        assert denial.data["action"] == "code.run"

        # the code is content: a content rule judges it
        guard = Policy("no-shell", default_action="allow")
        shell = ContentPattern(
            "execute", lambda text: "subprocess" if "subprocess" in text else None, "shell"
        )
        guard.add_rule("deny", shell, reason="code that starts processes", name="no-subprocess")
        kernel.policy = guard
        blocked = await run_as_agent(kernel, "import subprocess")
        assert not blocked.allowed
        assert blocked.error == "code that starts processes"
        # the backend is the resource
        guard.add_rule("deny", Pattern("execute", "cpython"), reason="monty only", name="monty-only")
        kernel.external("batch")
        refused = await kernel.run_code("1", backend="cpython", agent_id="batch")
        assert not refused.allowed
        assert refused.error == "monty only"


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"backend": "ruby"}, "unknown code backend"),
        ({"limits": CodeLimits(timeout=10_000)}, "above this kernel's"),
        ({"inputs": {"not a name": 1}}, "not a Python identifier"),
        ({"inputs": {"x": object()}}, "not plain data"),
        ({"inputs": {"read_file": 1}, "tools": TOOLS}, "has the name of a tool"),
        (
            {"tools": [ToolDef("print", "p", {"type": "object"}, "fs.read", "", fixed_target="a")]},
            "cannot be",
        ),
        ({"tools": "read_file"}, "list of ToolDef"),
    ],
)
async def test_requests_that_cannot_run_are_refused_before_the_decision(
    tmp_path: Path, options: dict[str, object], why: str
) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        result = await run_as_agent(kernel, "1", **options)
        assert not result.allowed
        assert why in (result.error or "")
        (blocked,) = await kernel.recorder.query(event_type="action_blocked")
        assert blocked.id == result.record_id


async def test_cpython_is_refused_where_the_host_cannot_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> None:
        raise SandboxUnavailable("bwrap is not installed (Debian package bubblewrap)")

    monkeypatch.setattr(provider_module, "check_available", unavailable)
    async with code_kernel(tmp_path) as (kernel, _):
        result = await run_as_agent(kernel, "1", backend="cpython")
        assert not result.allowed
        assert (
            result.error
            == "the cpython backend needs a sandbox: bwrap is not installed (Debian package bubblewrap)"
        )


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("while True:\n    pass", "TimeoutError: feed time limit exceeded"),
        ("x = 'a' * (200 << 20)", "MemoryError"),
        ("blocks = []\nwhile True:\n    blocks.append([0] * 10000)", "MemoryError"),
        ("while True:\n    print('x' * 100)", "OutputLimitExceeded: output over 10000 bytes"),
        ("for _ in range(10):\n    read_file('notes.txt')", "ToolLimitExceeded: more than 5 tool calls"),
        ("def f():\n    return f()\nf()", "RecursionError"),
        ("open('/etc/passwd').read()", "PermissionError"),
        ("import socket", "ModuleNotFoundError"),
        ("import os\nos.listdir('/')", "PermissionError"),
        ("launch_missiles()", "NameError: name 'launch_missiles' is not defined"),
        ("1 +", "SyntaxError"),
    ],
    ids=[
        "busy-loop",
        "big-string",
        "memory-bomb",
        "output-flood",
        "tool-calls",
        "recursion",
        "file",
        "network",
        "os",
        "unknown-function",
        "syntax",
    ],
)
async def test_limits_and_hostile_code_end_the_run_not_the_host(
    tmp_path: Path, code: str, error: str
) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        started = time.monotonic()
        result = await run_as_agent(kernel, code, tools=TOOLS, limits=SMALL)
        assert result.allowed
        assert result.error is not None
        assert error in result.error, result.error
        assert time.monotonic() - started < SMALL.timeout + 5
        (outcome,) = [
            r
            for r in await kernel.recorder.query(event_type="action_outcome")
            if r.data["action"] == "code.run"
        ]
        assert (outcome.id, outcome.data["status"]) == (result.record_id, "error")
        assert (await run_as_agent(kernel, "6 * 7")).value == 42, "the next run works"


async def test_sigkill_ends_a_busy_loop_and_the_pool_goes_on(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):

        async def spinner() -> CodeResult:
            return await kernel.run_code("while True:\n    pass")

        agent = kernel.register(spinner, name="spinner", permissions=["execute"])
        agent_id = await kernel.spawn(agent)
        await wait_until(lambda: bool(kernel.code.backends["monty"]._pool), what="the run started")  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)  # the code is in its loop
        started = time.monotonic()
        await kernel.send_signal(agent_id, AgentSignal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017, PT011 - the kill's error, whichever it is
            await kernel.wait_all([agent_id])
        assert time.monotonic() - started < 5
        result = await run_as_agent(kernel, "1 + 1")
        assert result.value == 2


async def test_sigstop_holds_the_script_at_its_next_tool_call(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, server):
        server.script("scripted", [Reply(content="first", delay=0.3), Reply(content="second")])
        code = "a = ask_llm('one')\nb = ask_llm('two')\n[a, b]"

        async def asker() -> CodeResult:
            return await kernel.run_code(code)

        agent = kernel.register(asker, name="asker", permissions=["execute", "network"])
        agent_id = await kernel.spawn(agent)
        await wait_until(lambda: server.hits("scripted") == 1, what="the first question")
        await kernel.send_signal(agent_id, AgentSignal.SIGSTOP)
        await asyncio.sleep(0.8)  # a measured interval: the first answer (0.3 s) is back by now
        assert server.hits("scripted") == 1, "the second call waits for SIGCONT"
        await kernel.send_signal(agent_id, AgentSignal.SIGCONT)
        (result,) = await kernel.wait_all([agent_id])
        assert result.value == ["first", "second"]


async def test_a_tool_read_as_a_value_is_still_governed(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        code = "f = read_file\n[f('notes.txt'), [read_file(p) for p in ['notes.txt']]]"
        result = await run_as_agent(kernel, code, tools=TOOLS)
        assert result.ok, result.error
        assert result.value == ["the launch moved to friday", ["the launch moved to friday"]]
        assert [c.record_id is not None for c in result.tool_calls] == [True, True]


async def test_the_records_of_a_run_do_not_keep_large_values(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        (tmp_path / "big.txt").write_text("y" * 100_000)
        code = "text = read_file('big.txt')\nfor _ in range(3):\n    ask_llm('x' * 5000)\nlen(text)"
        result = await run_as_agent(kernel, code, tools=TOOLS)
        assert result.value == 100_000
        assert [c.output for c in result.tool_calls] == [None] * 4
        assert result.tool_calls[1].arguments == {"prompt": f"{'x' * 200!r}... (5000 characters)"}
