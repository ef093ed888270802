"""AgentLoop through litellm against the scripted OpenAI-compatible server: tool calls (streamed
and not), denials and bad arguments back to the model, model errors, logs, signals; and the
structural check that a tool call acts only through submit."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent_os import ActionRequest, ActionResult, AgentLoop, AgentLoopResult, ToolDef, run_agent_loop
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import (
    BUILTIN_TOOLS,
    DECISION_EVENTS,
    AgentSignal,
    AgentStoppedError,
    KernelSpace,
    LLMError,
    SignalDispatcher,
)
from agent_os.control_plane.actions import loop as loop_module
from tests.support import wait_until

MODEL = "openai/scripted"
FS_TOOLS = [BUILTIN_TOOLS["fs.read"], BUILTIN_TOOLS["fs.write"], BUILTIN_TOOLS["fs.list"]]


def test_a_tool_call_acts_only_through_submit() -> None:
    """The seed's structural test: parse the loop's source; the method that runs a tool call
    calls ``self._submit`` exactly once (awaited) and otherwise only the pure helpers that
    build the request and the record."""
    tree = ast.parse(inspect.getsource(loop_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AgentLoop")
    method = next(
        n for n in cls.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "_execute_tool_call"
    )
    calls = [n for n in ast.walk(method) if isinstance(n, ast.Call)]
    names = [ast.unparse(c.func) for c in calls]
    assert names.count("self._submit") == 1
    assert set(names) <= {"self._submit", "self._request_for", "_refused", "_record", "str"}
    awaited = [ast.unparse(n.value) for n in ast.walk(method) if isinstance(n, ast.Await)]
    assert awaited == ["self._submit(request)"]
    # the request builder is pure: no awaits, nothing that acts
    builder = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_request_for")
    built = {ast.unparse(n.func) for n in ast.walk(builder) if isinstance(n, ast.Call)}
    assert built <= {
        "self.tools.get",
        "json.loads",
        "text.strip",
        "tool.request",
        "ToolArgumentError",
        "', '.join",
    }
    # and the module has no other way to act: no OS, process or socket modules, no providers
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"os", "subprocess", "shutil", "socket", "pathlib", "io"}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attributes & {"provider", "actions", "run_in_executor", "to_thread"}


async def _kernel(tmp_path: Path, **kwargs: Any) -> KernelSpace:
    (tmp_path / "a.txt").write_text("hello")
    return KernelSpace("permissive", workspace=tmp_path, **kwargs)


def _script(server: ScriptedLLMServer) -> None:
    server.script(
        "scripted",
        [
            Reply(
                tool_calls=[tool_call("read_file", {"path": "a.txt"})], prompt_tokens=11, completion_tokens=3
            ),
            Reply(
                tool_calls=[
                    tool_call("write_file", {"path": "/etc/agent-os-never", "content": "x"}),
                    tool_call("list_files", {"path": "."}),
                ]
            ),
            Reply(content="The file says hello."),
        ],
    )


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_tool_calls_run_through_submit_and_results_go_back(tmp_path: Path, stream: bool) -> None:
    async with await _kernel(tmp_path) as kernel, ScriptedLLMServer() as server:
        _script(server)
        loop = AgentLoop(kernel.submit, FS_TOOLS, MODEL, api_base=server.url, api_key="k", stream=stream)
        agent = kernel.register(loop.run, name="assistant", permissions=["read", "write"])
        result: AgentLoopResult = await kernel.execute(agent, "What does a.txt say?")

        assert result.text == "The file says hello."
        assert result.finish_reason == "stop"
        assert result.turns == 3
        assert result.usage.prompt_tokens == 11 + 20 + 20
        assert result.usage.completion_tokens == 3 + 10 + 10
        read, write, listed = result.tool_calls
        assert (read.name, read.action, read.target, read.ok, read.output) == (
            "read_file",
            "fs.read",
            "a.txt",
            True,
            "hello",
        )
        assert read.arguments == {"path": "a.txt"}
        assert not write.allowed
        assert "outside" in (write.error or "") or "workspace" in (write.error or "")
        assert listed.ok
        assert [e["name"] for e in listed.output] == ["a.txt"]
        assert all(r.stream is stream for r in server.requests)
        assert server.requests[0].tools is not None
        assert {t["function"]["name"] for t in server.requests[0].tools} == {
            "read_file",
            "write_file",
            "list_files",
        }
        second = server.requests[1].messages
        assert second[-2]["role"] == "assistant"
        assert second[-2]["tool_calls"][0]["function"]["name"] == "read_file"
        assert second[-1] == {
            "role": "tool",
            "tool_call_id": read.id,
            "content": json.dumps({"ok": True, "output": "hello"}),
        }
        denial = json.loads(server.requests[2].messages[-2]["content"])
        assert denial["denied"] is True
        assert denial["error"] == write.error

        # every decision and outcome is recorded, and the chain verifies
        violations = await kernel.recorder.query(event_type="action_blocked")  # outside the workspace
        assert [v.id for v in violations] == [write.record_id]
        outcomes = await kernel.recorder.query(event_type="action_outcome")
        assert [o.id for o in outcomes] == [read.record_id, listed.record_id]
        assert (await kernel.recorder.verify()).ok


async def test_malformed_tool_calls_go_back_as_errors(tmp_path: Path) -> None:
    async with await _kernel(tmp_path) as kernel, ScriptedLLMServer() as server:
        server.script(
            "scripted",
            [
                Reply(
                    tool_calls=[
                        tool_call("read_file", "{not json"),
                        tool_call("rm_rf", {"path": "/"}),
                        tool_call("read_file", {}),
                        tool_call("read_file", {"path": 3}),
                        tool_call("read_file", {"path": "a.txt", "mode": "x"}),
                        tool_call("read_file", "[1, 2]"),
                    ]
                ),
                Reply(content="sorry"),
            ],
        )
        agent = kernel.register(
            AgentLoop(kernel.submit, FS_TOOLS, MODEL, api_base=server.url, api_key="k").run, name="clumsy"
        )
        result = await kernel.execute(agent, "go")
        assert result.text == "sorry"
        errors = [r.error or "" for r in result.tool_calls]
        assert "not JSON" in errors[0]
        assert "unknown tool 'rm_rf'" in errors[1]
        assert "missing required argument(s): path" in errors[2]
        assert "path must be a string" in errors[3]
        assert "takes no argument 'mode'" in errors[4]
        assert "JSON object" in errors[5]
        assert all(r.record_id is None and r.action is None for r in result.tool_calls[:2])
        assert result.tool_calls[0].arguments == "{not json"
        tool_messages = [m for m in server.requests[1].messages if m["role"] == "tool"]
        assert len(tool_messages) == 6
        assert all(json.loads(m["content"])["ok"] is False for m in tool_messages)
        assert await kernel.recorder.query(event_type=DECISION_EVENTS) == []


async def test_model_errors_are_retried_by_the_rule_then_raised(tmp_path: Path) -> None:
    async with await _kernel(tmp_path) as kernel, ScriptedLLMServer() as server:

        async def ask(model: str, **options: Any) -> AgentLoopResult:
            options.setdefault("retries", 0)
            return await run_agent_loop(
                kernel.submit,
                "hi",
                FS_TOOLS,
                f"openai/{model}",
                api_base=server.url,
                api_key="k",
                backoff=0.01,
                **options,
            )

        server.script("flaky", [Reply(status=503), Reply(content="fine")])
        assert (await ask("flaky", retries=1)).text == "fine"
        assert server.hits("flaky") == 2

        server.script("down", Reply(status=500))
        with pytest.raises(LLMError) as down:
            await ask("down", retries=2)
        assert down.value.attempts == 3
        assert server.hits("down") == 3

        server.script("bad", Reply(status=400))
        with pytest.raises(LLMError) as bad:
            await ask("bad", retries=3)
        assert bad.value.attempts == 1  # not transient: no retry

        server.script("garbled", Reply(body="{not json"))
        with pytest.raises(LLMError):
            await ask("garbled")

        server.script("slow", Reply(content="late", delay=5))
        with pytest.raises(LLMError) as slow:
            await ask("slow", timeout=0.3, retries=1)
        assert slow.value.attempts == 2

        server.script("empty", Reply(body=json.dumps({"id": "x", "choices": []})))
        with pytest.raises(LLMError):
            await ask("empty")

        server.script("down-streaming", Reply(status=502))
        with pytest.raises(LLMError) as streamed:
            await ask("down-streaming", stream=True, retries=1)
        assert streamed.value.attempts == 2


async def test_tool_calls_past_the_cap_are_not_submitted(tmp_path: Path) -> None:
    async with await _kernel(tmp_path) as kernel, ScriptedLLMServer() as server:
        many = [tool_call("list_files", {"path": "."}) for _ in range(5)]
        server.script("greedy", [Reply(tool_calls=many), Reply(content="ok")])
        loop = AgentLoop(
            kernel.submit, FS_TOOLS, "openai/greedy", api_base=server.url, api_key="k", max_tool_calls=2
        )
        result = await kernel.execute(kernel.register(loop.run, name="greedy"), "go")
        assert [c.ok for c in result.tool_calls] == [True, True, False, False, False]
        assert "more than 2 tool calls" in (result.tool_calls[-1].error or "")
        assert len(await kernel.recorder.query(event_type="action_outcome")) == 2


async def test_max_turns_stops_a_model_that_keeps_calling_tools(tmp_path: Path) -> None:
    async with await _kernel(tmp_path) as kernel, ScriptedLLMServer() as server:
        server.script("looping", Reply(tool_calls=[tool_call("list_files", {"path": "."})]))
        agent = kernel.register(
            AgentLoop(
                kernel.submit, FS_TOOLS, "openai/looping", api_base=server.url, api_key="k", max_turns=2
            ).run,
            name="looper",
        )
        result = await kernel.execute(agent, "go")
        assert result.finish_reason == "max_turns"
        assert result.turns == 2
        assert len(result.tool_calls) == 2
        assert server.hits("looping") == 2


async def test_structured_logs_per_turn_and_per_tool_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await _kernel(tmp_path) as kernel, ScriptedLLMServer() as server:
        _script(server)
        agent = kernel.register(
            AgentLoop(kernel.submit, FS_TOOLS, MODEL, api_base=server.url, api_key="k").run, name="logged"
        )
        with caplog.at_level(logging.INFO, logger=loop_module.__name__):
            result = await kernel.execute(agent, "go")
        events = [getattr(r, "event", None) for r in caplog.records if r.name == loop_module.__name__]
        assert events == [
            "agent_loop.start",
            "agent_loop.turn",
            "agent_loop.tool_call",
            "agent_loop.turn",
            "agent_loop.tool_call",
            "agent_loop.tool_call",
            "agent_loop.turn",
            "agent_loop.done",
        ]
        calls = [r for r in caplog.records if getattr(r, "event", None) == "agent_loop.tool_call"]
        assert [getattr(r, "record_id", None) for r in calls] == [c.record_id for c in result.tool_calls]
        assert [getattr(r, "allowed", None) for r in calls] == [True, False, True]
        assert calls[1].levelno == logging.WARNING
        turns = [r for r in caplog.records if getattr(r, "event", None) == "agent_loop.turn"]
        assert [getattr(r, "turn", None) for r in turns] == [1, 2, 3]
        assert getattr(turns[0], "tool_calls", None) == ["read_file"]


async def test_sigstop_holds_the_llm_agent_at_its_next_action(tmp_path: Path) -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with await _kernel(tmp_path, signal_dispatcher=dispatcher) as kernel, ScriptedLLMServer() as server:
        server.script(
            "slow",
            [Reply(tool_calls=[tool_call("read_file", {"path": "a.txt"})], delay=0.3), Reply(content="done")],
        )
        agent = kernel.register(
            AgentLoop(kernel.submit, FS_TOOLS, "openai/slow", api_base=server.url, api_key="k").run,
            name="slowpoke",
        )
        run = asyncio.create_task(kernel.execute(agent, "go"))
        try:
            await wait_until(lambda: server.hits("slow") == 1, what="the first model call")
            proc = next(p for p in kernel.processes if p.name == "slowpoke")
            assert await kernel.send_signal(proc.id, AgentSignal.SIGSTOP)
            # the model's reply arrives; the tool call waits in submit, before any decision
            await wait_until(lambda: len(proc._continue._waiters) > 0, what="submit waits")
            assert await kernel.recorder.query(event_type=["policy_decision", "action_outcome"]) == []
            assert server.hits("slow") == 1
            assert await kernel.send_signal(proc.id, AgentSignal.SIGCONT)
            result = await asyncio.wait_for(run, 10)
        finally:
            run.cancel()
        assert result.text == "done"
        assert result.tool_calls[0].output == "hello"


async def test_sigkill_cancels_the_llm_call_in_progress(tmp_path: Path) -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with await _kernel(tmp_path, signal_dispatcher=dispatcher) as kernel, ScriptedLLMServer() as server:
        server.script("hang", Reply(content="never", delay=30))
        agent = kernel.register(
            AgentLoop(kernel.submit, FS_TOOLS, "openai/hang", api_base=server.url, api_key="k").run,
            name="hung",
        )
        run = asyncio.create_task(kernel.execute(agent, "go"))
        try:
            await wait_until(lambda: server.hits("hang") == 1, what="the model call")
            proc = next(p for p in kernel.processes if p.name == "hung")
            assert await kernel.send_signal(proc.id, AgentSignal.SIGKILL)
            with pytest.raises(AgentStoppedError):
                await asyncio.wait_for(run, 5)
        finally:
            run.cancel()
        # the client gave up long before the scripted 30 s: the server never sent its reply
        assert server.requests[0].replied_at is None


async def test_sigkill_cancels_the_action_in_progress() -> None:
    started = asyncio.Event()

    class Slow:
        def resource(self, request: ActionRequest) -> str:
            return request.target

        async def run(self, request: ActionRequest) -> Any:
            started.set()
            await asyncio.sleep(30)

    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with (
        KernelSpace("permissive", signal_dispatcher=dispatcher) as kernel,
        ScriptedLLMServer() as server,
    ):
        kernel.actions.register("slow.op", Slow(), "read")
        tool = ToolDef(
            "slow_op",
            "slow",
            {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
            "slow.op",
            "x",
        )
        server.script("m", Reply(tool_calls=[tool_call("slow_op", {"x": "y"})]))
        agent = kernel.register(
            AgentLoop(kernel.submit, [tool], "openai/m", api_base=server.url, api_key="k").run, name="busy"
        )
        run = asyncio.create_task(kernel.execute(agent, "go"))
        try:
            await asyncio.wait_for(started.wait(), 10)
            proc = next(p for p in kernel.processes if p.name == "busy")
            assert await kernel.send_signal(proc.id, AgentSignal.SIGKILL)
            with pytest.raises(AgentStoppedError):
                await asyncio.wait_for(run, 5)
        finally:
            run.cancel()
        assert await kernel.recorder.query(event_type="action_outcome") == []


async def test_without_litellm_the_error_names_the_llm_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    async def missing() -> Any:
        raise ImportError("CMVK calls models through litellm: pip install 'agent-os[cmvk]'")

    monkeypatch.setattr("agent_os.cmvk._client.ensure_client", missing)

    async def submit(request: ActionRequest) -> ActionResult:
        raise AssertionError("not reached")

    with pytest.raises(ImportError, match=r"agent-os\[llm\]"):
        await run_agent_loop(submit, "hi", [], MODEL)
