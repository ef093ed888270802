"""kernel.run_code on the CPython backend, in real bubblewrap sandboxes: the same script as on
Monty, denials raised in the script, the records, artifacts, the pool, limits and hostile code
(what was not granted fails in the OS), and SIGKILL."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent_os.cmvk.testing import Reply
from agent_os.control_plane import AgentSignal
from agent_os.control_plane.actions import CodeLimits, CodeResult
from agent_os.control_plane.sandbox.bwrap import _pids_of
from tests.support import wait_until
from tests.support.code_exec import SCRIPT, SMALL, TOOLS, check_tools_and_records, code_kernel, run_as_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root (docs/sandbox.md)")


async def test_two_tools_and_ask_llm_run_through_submit(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, server):
        result = await run_as_agent(kernel, SCRIPT, tools=TOOLS, backend="cpython")
        assert result.backend == "cpython"
        await check_tools_and_records(kernel, server, result)


async def test_an_uncaught_denial_is_the_runs_error(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        code = 'print("before")\nwrite_file("x.txt", "data")'
        result = await run_as_agent(kernel, code, tools=TOOLS, backend="cpython")
        assert result.allowed
        assert result.error is not None
        assert result.error.startswith("PermissionError: write_file denied: agent coder lacks permission")
        assert result.stdout == "before\n"
        (outcome,) = await kernel.recorder.query(event_type="action_outcome")
        assert (outcome.id, outcome.data["status"], outcome.data["error"]) == (
            result.record_id,
            "error",
            result.error,
        )


async def test_full_python_inputs_and_artifacts(tmp_path: Path) -> None:
    async with code_kernel(tmp_path) as (kernel, _):
        code = """
import json, os, pathlib
os.makedirs("out", exist_ok=True)
pathlib.Path("out/data.json").write_text(json.dumps({"n": len(rows)}))
os.symlink("/etc/passwd", "link")
class Point:
    pass
print(os.getcwd())
sum(r["v"] for r in rows), Point()
"""
        rows = [{"v": 1}, {"v": 2}]
        result = await run_as_agent(kernel, code, backend="cpython", inputs={"rows": rows})
        assert result.ok, result.error
        assert result.value[0] == 3
        assert result.value[1].startswith("<__main__.Point object")
        assert result.stdout == "/workspace\n"
        assert dict(result.artifacts) == {"out/data.json": b'{"n": 2}'}, "files, never what a link points to"


async def test_each_run_gets_a_sandbox_of_its_own_from_the_pool(tmp_path: Path) -> None:
    async with code_kernel(tmp_path, code_pool=2) as (kernel, _):
        backend = kernel.code.backends["cpython"]
        code = "import os\nopen('mark', 'w').write('x')\n(os.getuid(), sorted(os.listdir('.')))"
        first = await run_as_agent(kernel, code, backend="cpython")
        await wait_until(lambda: len(backend._idle) == 2, timeout=30, what="the pool refilled")  # type: ignore[attr-defined]
        second = await run_as_agent(kernel, code, backend="cpython")
        assert first.ok, first.error
        assert second.ok, second.error
        assert first.value[1] == second.value[1] == ["mark"], "a fresh workspace each time"
        assert first.value[0] != second.value[0], "and a uid of its own"
        assert _pids_of(first.value[0]) == [], "the sandbox of a finished run is gone"
    assert backend._idle == []  # type: ignore[attr-defined]


HOSTILE = [
    ("while True:\n    pass", "TimeoutError: ran past its time limit of 3s"),
    ("import time\ntime.sleep(60)", "TimeoutError: ran past its time limit of 3s"),
    ("x = bytearray(200 << 20)", "MemoryError"),
    ("while True:\n    print('x' * 100)", "OutputLimitExceeded: output over 10000 bytes"),
    ("try:\n    print('x' * 20000)\nexcept BaseException:\n    pass\n1", "OutputLimitExceeded"),
    ("import os\nos.write(1, b'x' * 100000)\n2", None),
    ("for _ in range(10):\n    read_file('notes.txt')", "ToolLimitExceeded: more than 5 tool calls"),
    (
        "import os\nwhile True:\n    os.fork()",
        "BlockingIOError",
    ),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "OSError"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 4222), timeout=2)", "ConnectionRefusedError"),
    ("open('/usr/lib/agent-os-probe', 'w')", "OSError"),
    ("open('/etc/shadow').read()", "PermissionError"),
    ("open('/workspace/big', 'wb').write(b'x' * (2 << 20))", "OSError: [Errno 27] File too large"),
    ("for i in range(3):\n    open(f'f{i}', 'wb').write(b'x' * (600 << 10))", "ArtifactLimitExceeded"),
    ("import os\nos._exit(3)", "ProcessExited"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "ProcessKilled"),
]


@pytest.mark.parametrize(
    ("code", "error"),
    HOSTILE,
    ids=[
        "busy-loop",
        "sleep",
        "memory-bomb",
        "output-flood",
        "output-caught",
        "raw-fd",
        "tool-calls",
        "fork-bomb",
        "internet",
        "host-port",
        "write-outside",
        "shadow",
        "big-file",
        "artifacts",
        "exit",
        "self-kill",
    ],
)
async def test_limits_and_hostile_code_end_the_run_not_the_host(
    tmp_path: Path, code: str, error: str | None
) -> None:
    async with code_kernel(tmp_path, code_pool=0) as (kernel, _):
        started = time.monotonic()
        result = await run_as_agent(kernel, code, tools=TOOLS, backend="cpython", limits=SMALL)
        assert time.monotonic() - started < SMALL.timeout + 10
        if error is None:
            assert result.ok, result.error
            return
        assert result.allowed
        assert result.error is not None
        assert error in result.error, result.error
        runs = [
            r
            for r in await kernel.recorder.query(event_type="action_outcome")
            if r.data["action"] == "code.run"
        ]
        assert [(r.id, r.data["status"]) for r in runs] == [(result.record_id, "error")]
        assert (await run_as_agent(kernel, "6 * 7", backend="cpython")).value == 42, "the next run works"


async def test_tool_time_does_not_count_against_the_time_limit(tmp_path: Path) -> None:
    async with code_kernel(tmp_path, code_pool=0) as (kernel, server):
        server.script("scripted", Reply(content="slow answer", delay=1.5))
        limits = CodeLimits(timeout=1.0)
        result = await run_as_agent(kernel, "ask_llm('a')", backend="cpython", limits=limits)
        assert result.ok, result.error
        assert result.value == "slow answer"


async def test_sigkill_ends_the_run_and_its_sandbox(tmp_path: Path) -> None:
    async with code_kernel(tmp_path, code_pool=0) as (kernel, server):
        limits = CodeLimits(timeout=25)
        code = "import os\nask_llm(str(os.getuid()))\nos.fork()\nwhile True:\n    pass"

        async def spinner() -> CodeResult:
            return await kernel.run_code(code, backend="cpython", limits=limits)

        agent = kernel.register(spinner, name="spinner", permissions=["execute", "network"])
        agent_id = await kernel.spawn(agent)
        await wait_until(lambda: server.hits("scripted") == 1, timeout=30, what="the code said its uid")
        uid = int(server.requests[0].messages[-1]["content"])
        await wait_until(lambda: len(_pids_of(uid)) == 2, timeout=30, what="the code and its child spin")
        started = time.monotonic()
        await kernel.send_signal(agent_id, AgentSignal.SIGKILL)
        with pytest.raises(BaseException):  # noqa: B017, PT011 - the kill's error, whichever it is
            await kernel.wait_all([agent_id])
        await wait_until(lambda: _pids_of(uid) == [], timeout=10, what="every process of the run gone")
        assert time.monotonic() - started < 10


async def test_a_pooled_sandbox_acts_as_the_agent_that_runs_in_it(tmp_path: Path) -> None:
    """The pool's sandboxes are started in whatever context refills the pool: a tool call
    must still act as the agent of the run it serves."""
    async with code_kernel(tmp_path, code_pool=1) as (kernel, _):
        first = await run_as_agent(kernel, "read_file('notes.txt')", tools=TOOLS, backend="cpython")
        assert first.ok, first.error
        backend = kernel.code.backends["cpython"]
        await wait_until(lambda: len(backend._idle) == 1, timeout=30, what="the pool refilled")  # type: ignore[attr-defined]

        async def writer() -> CodeResult:
            return await kernel.run_code("read_file('notes.txt')", tools=TOOLS, backend="cpython")

        agent = kernel.register(writer, name="writer", permissions=["write", "execute"])
        second = await kernel.execute(agent)
        assert not second.ok
        assert "agent writer lacks permission for read" in (second.error or "")
        (denial,) = await kernel.recorder.query(event_type="permission_denied")
        assert denial.data["agent_name"] == "writer"


async def test_sigstop_holds_the_sandboxed_code_at_its_next_tool_call(tmp_path: Path) -> None:
    async with code_kernel(tmp_path, code_pool=0) as (kernel, server):
        server.script("scripted", [Reply(content="first", delay=0.3), Reply(content="second")])

        async def asker() -> CodeResult:
            return await kernel.run_code("[ask_llm('one'), ask_llm('two')]", backend="cpython")

        agent = kernel.register(asker, name="asker", permissions=["execute", "network"])
        agent_id = await kernel.spawn(agent)
        await wait_until(lambda: server.hits("scripted") == 1, timeout=30, what="the first question")
        await kernel.send_signal(agent_id, AgentSignal.SIGSTOP)
        await asyncio.sleep(0.8)  # a measured interval: the first answer (0.3 s) is back by now
        assert server.hits("scripted") == 1, "the second call waits for SIGCONT"
        await kernel.send_signal(agent_id, AgentSignal.SIGCONT)
        (result,) = await kernel.wait_all([agent_id])
        assert result.value == ["first", "second"]
