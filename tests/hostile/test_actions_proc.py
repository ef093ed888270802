"""proc.exec against hostile requests: shell metacharacters stay literal arguments, programs off
the allow-list are refused, a hang is killed with its grandchildren, an output flood is cut,
the environment and the working directory cannot be chosen freely."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import KernelSpace, Pattern, Policy
from agent_os.control_plane.actions import ActionRefused, Process
from agent_os.control_plane.errors import KernelError
from tests.support import wait_until

ECHO = os.path.realpath("/bin/echo")
SH = shutil.which("sh") or "/bin/sh"


async def _submit(
    kernel: KernelSpace, *requests: ActionRequest, permissions: list[str] | None = None
) -> list[ActionResult]:
    @kernel.register(name="runner", permissions=permissions or ["execute"])
    async def agent() -> list[ActionResult]:
        return [await kernel.submit(r) for r in requests]

    results: list[ActionResult] = await kernel.execute(agent)
    return results


async def test_echo_runs_and_shell_syntax_stays_literal(tmp_path: Path) -> None:
    hostile = ["$(touch pwned)", "`touch pwned`", "; touch pwned", "&& touch pwned", "| cat", "*", "$HOME"]
    async with KernelSpace("permissive") as kernel:
        Process(["echo"], workspace=tmp_path).register(kernel.actions)
        plain, injected, by_path = await _submit(
            kernel,
            ActionRequest("proc.exec", "echo", {"args": ["hello", "world"]}),
            ActionRequest("proc.exec", "echo", {"args": hostile}),
            ActionRequest("proc.exec", ECHO, {"args": ["x"]}),
        )
        assert plain.ok, plain.error
        assert plain.output == {"exit_code": 0, "stdout": "hello world\n", "stderr": ""}
        assert injected.output["stdout"] == " ".join(hostile) + "\n"
        assert by_path.output["stdout"] == "x\n"
        decision = (await kernel.recorder.query(event_type="policy_decision"))[0]
        assert decision.data["operation"] == "execute"
        assert decision.data["resource"] == ECHO
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "target", ["sh", "/bin/sh", "bash", "./echo", "../../bin/echo", "/bin/../bin/echo", "echo ", "ECHO", ""]
)
async def test_a_program_off_the_allow_list_is_refused(target: str) -> None:
    async with KernelSpace("permissive") as kernel:
        Process(["echo"]).register(kernel.actions)
        [result] = await _submit(kernel, ActionRequest("proc.exec", target))
        assert not result.allowed
        assert result.error is not None
        assert "not on the allow-list" in result.error
        assert await kernel.recorder.query(event_type="action_outcome") == []


async def test_an_agent_without_execute_is_denied() -> None:
    async with KernelSpace("permissive") as kernel:
        Process(["echo"]).register(kernel.actions)
        [result] = await _submit(kernel, ActionRequest("proc.exec", "echo"), permissions=["read", "write"])
        assert result.error == "agent runner lacks permission for execute"


async def test_a_timeout_kills_the_child_and_its_grandchildren(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; sleep 30"
    async with KernelSpace("permissive") as kernel:
        Process([SH], timeout=1.0).register(kernel.actions)
        [result] = await _submit(kernel, ActionRequest("proc.exec", SH, {"args": ["-c", script]}))
        assert result.allowed
        assert result.error is not None
        assert "timed out after 1.0s" in result.error
        [outcome] = await kernel.recorder.query(event_type="action_outcome")
        assert outcome.data["status"] == "error"
    grandchild = int(pids.read_text())

    def gone() -> bool:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return True
        # a zombie of another parent is dead too
        with open(f"/proc/{grandchild}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")

    await wait_until(gone, timeout=5)


async def test_an_output_flood_is_cut() -> None:
    async with KernelSpace("permissive") as kernel:
        Process([SH], max_output=10_000, timeout=20).register(kernel.actions)
        out, err = await _submit(
            kernel,
            ActionRequest("proc.exec", SH, {"args": ["-c", "while :; do echo flood; done"]}),
            ActionRequest("proc.exec", SH, {"args": ["-c", "while :; do echo flood >&2; done"]}),
        )
        assert out.error is not None
        assert "stdout over 10000 bytes" in out.error
        assert err.error is not None
        assert "stderr over 10000 bytes" in err.error


async def test_env_is_minimal_and_only_allow_listed_names_pass(tmp_path: Path) -> None:
    os.environ["AGENT_OS_TEST_SECRET"] = "leak"
    try:
        async with KernelSpace("permissive") as kernel:
            Process(["env"], pass_env=["GREETING"]).register(kernel.actions)
            plain, greeting, refused = await _submit(
                kernel,
                ActionRequest("proc.exec", "env"),
                ActionRequest("proc.exec", "env", {"env": {"GREETING": "hi"}}),
                ActionRequest("proc.exec", "env", {"env": {"LD_PRELOAD": "/tmp/evil.so"}}),
            )
            assert sorted(plain.output["stdout"].splitlines()) == [
                "LANG=C.UTF-8",
                "PATH=/usr/local/bin:/usr/bin:/bin",
            ]
            assert "GREETING=hi" in greeting.output["stdout"].splitlines()
            assert not refused.allowed
            assert refused.error is not None
            assert "LD_PRELOAD" in refused.error
    finally:
        del os.environ["AGENT_OS_TEST_SECRET"]


async def test_cwd_stays_in_the_workspace_and_stdin_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    proc = Process(["pwd", "cat"], workspace=tmp_path, max_stdin=100)
    assert proc.workspace is not None
    real = proc.workspace.root
    async with KernelSpace("permissive") as kernel:
        proc.register(kernel.actions)
        root, sub, escape, absolute, fed, flood = await _submit(
            kernel,
            ActionRequest("proc.exec", "pwd"),
            ActionRequest("proc.exec", "pwd", {"cwd": "sub"}),
            ActionRequest("proc.exec", "pwd", {"cwd": "../"}),
            ActionRequest("proc.exec", "pwd", {"cwd": "/etc"}),
            ActionRequest("proc.exec", "cat", {"stdin": "piped"}),
            ActionRequest("proc.exec", "cat", {"stdin": "x" * 101}),
        )
        assert root.output["stdout"] == f"{real}\n"
        assert sub.output["stdout"] == f"{real}/sub\n"
        assert not escape.allowed
        assert not absolute.allowed
        assert fed.output["stdout"] == "piped"
        assert not flood.allowed


async def test_argv_is_a_policy_condition() -> None:
    policy = Policy("no-rm-rf", default_action="allow")
    policy.add_rule(
        "deny", Pattern("execute", "*", conditions={"command": {"$regex": "(^| )-rf( |$)"}}), "no -rf"
    )
    async with KernelSpace(policy) as kernel:
        Process(["echo"]).register(kernel.actions)
        ok, denied = await _submit(
            kernel,
            ActionRequest("proc.exec", "echo", {"args": ["-n", "x"]}),
            ActionRequest("proc.exec", "echo", {"args": ["-rf", "/"]}),
        )
        assert ok.ok
        assert not denied.allowed
        assert denied.error == "no -rf"


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"args": "-c ls"}, "list of str"),
        ({"args": [1]}, "str without NUL"),
        ({"args": ["a\0b"]}, "str without NUL"),
        ({"cwd": "/tmp"}, "needs a workspace"),
        ({"env": {"PATH": "/tmp"}}, "not allowed"),
        ({"stdin": 5}, "str or bytes"),
    ],
)
def test_malformed_params_are_refused(params: dict[str, Any], why: str) -> None:
    with pytest.raises(ActionRefused, match=why):
        Process(["echo"]).resource(ActionRequest("proc.exec", "echo", params))


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    for allow in ("echo", ["no-such-program-xyz"], ["bin/echo"], [str(tmp_path)]):
        with pytest.raises(KernelError):
            Process(allow)
    with pytest.raises(KernelError):
        Process(["echo"], timeout=-1)
    assert signal.SIGKILL  # the group kill the provider uses exists here
