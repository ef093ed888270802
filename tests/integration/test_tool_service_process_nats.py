"""Actions across processes on a real nats-server whose users and permissions are the generated
ones: the control-plane service and the tool service run as processes (``agent-os serve``),
every message signed with IATP. An agent reads a file in the workspace, is denied a write
outside it, asks another agent over the bus and gets the answer, and all of it is in the
service's flight recorder, whose chain verifies. An agent cannot reach the tool service around
the control plane; two tool-service instances run each action once; a tool service killed
mid-request leaves the agent with a timeout, and nothing hangs; an output over the broker's
payload limit is answered with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent_os import AgentLoop
from agent_os.amb import AMB, Metadata
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import BUILTIN_TOOLS, DECISION_EVENTS, ActionRequest, FlightRecorder, ToolDef
from agent_os.iatp import IATP
from agent_os.services._identity import PASSPHRASE_ENV
from agent_os.services.control_plane_service import (
    ReplyViaService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
    nats_authorization,
    nats_users,
)
from agent_os.services.tool_service import ToolClient
from tests.support import wait_until
from tests.support.closing import Closing
from tests.support.identities import PASSPHRASE, process_identities
from tests.support.nats_private import private_nats
from tests.support.processes import get, start, start_service, stop

pytestmark = pytest.mark.nats

AGENTS = ["alice", "bob", "tools"]
SERVICE = "control-plane"
PASSWORDS = {name: f"pw-{name}" for name in [*AGENTS, SERVICE]}
ENV = {PASSPHRASE_ENV: PASSPHRASE}


@dataclass
class Deployment:
    """A private nats-server with the generated permissions, the key stores of the service
    processes (``keys/<id>``) and the agents' in-memory identities, and the workspace."""

    port: int
    root: Path
    workspace: Path
    keys: dict[str, IATP]
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    def url(self, user: str) -> str:
        return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}"

    def agent(self, name: str) -> AMB:
        return AMB(
            "nats",
            self.url(name),
            agent_id=name,
            inbox_prefix=agent_inbox(name),
            middleware=[self.keys[name].middleware(), ReplyViaService()],
        )

    async def control_plane(self) -> str:
        """Start the control-plane service; return its admin URL."""
        policy = self.root / "policy.yaml"
        policy.write_text(
            "name: fleet\ndefault_action: deny\nrules:\n"
            f"  - {{action: allow, operation: read, resource: '{self.workspace}/*'}}\n"
            f"  - {{action: allow, operation: write, resource: '{self.workspace}/*'}}\n"
            "  - {action: allow, operation: request, resource: 'ask.*'}\n"
            "  - {action: allow, operation: deliver, resource: 'ask.*'}\n"
            "  - {action: allow, operation: reply, resource: 'ask.*'}\n"
        )
        proc, admin = await start_service(
            "--broker",
            self.url(SERVICE),
            "--identities",
            str(self.root / "keys" / SERVICE),
            "--policy",
            str(policy),
            "--recorder",
            f"sqlite:{self.root / 'audit.db'}",
            "--workspace",
            str(self.workspace),
            "--agents",
            "alice,bob",
            env=ENV,
        )
        self.procs.append(proc)
        return admin

    async def tool_service(self, *options: str) -> asyncio.subprocess.Process:
        proc, ready = await start(
            "tools",
            "--broker",
            self.url("tools"),
            "--identities",
            str(self.root / "keys" / "tools"),
            "--workspace",
            str(self.workspace),
            *options,
            env=ENV,
        )
        expected = "ready tools subjects=deliver.tools.action.> broker=" + self.url("tools")
        assert ready.split(" metrics=")[0] == expected
        self.procs.append(proc)
        return proc

    async def records(self) -> FlightRecorder:
        """The service's recorder, once every process has stopped (its last batch written)."""
        for proc in self.procs:
            if proc.returncode is None:
                returncode, log = await stop(proc, signal.SIGTERM)
                assert returncode == 0, log
        return FlightRecorder("sqlite", str(self.root / "audit.db"))


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    stores = await process_identities(tmp_path / "keys", [SERVICE, "tools"], ["alice", "bob"])
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    users = nats_users(["alice", "bob", "tools"], SERVICE, passwords=PASSWORDS)
    async with private_nats(nats_authorization(users), tmp_path) as port:
        d = Deployment(port, tmp_path, workspace, stores)
        try:
            yield d
        finally:
            for proc in d.procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def metric(admin: str, name: str) -> float:
    _, text = await get(admin + "/metrics")
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_an_agent_reads_is_denied_a_write_asks_another_agent_all_recorded(
    tmp_path: Path, closing: Closing
) -> None:
    async with deployment(tmp_path) as d:
        (d.workspace / "notes.txt").write_text("the answer is in bob")
        await d.control_plane()
        await d.tool_service()
        alice, bob = d.agent("alice"), d.agent("bob")
        try:

            async def answer(message: Any, metadata: Metadata) -> None:
                await bob.reply(metadata, f"{message}: 42")

            await bob.subscribe(delivery_subject("ask.>", agent="bob"), answer)
            await alice.connect()
            tools = ToolClient(alice, timeout=10)
            read = await tools.submit(ActionRequest("fs.read", "notes.txt"))
            assert read.ok
            assert read.output == "the answer is in bob"
            outside = tmp_path / "outside.txt"
            write = await tools.submit(ActionRequest("fs.write", str(outside), {"content": "x"}))
            assert not write.allowed
            assert write.record_id is not None
            assert "workspace" in str(write.error)
            said = await alice.request(ingress_subject("ask.bob"), "6 x 7", recipient="bob", timeout=10)
            assert said == "6 x 7: 42"
        finally:
            await alice.close()
            await bob.close()
        assert not outside.exists()
        rec = closing(await d.records())
        actions = await rec.query(event_type=[*DECISION_EVENTS, "action_outcome"])
        kept = [
            (r.event_type, r.agent_id, r.data.get("action") or r.data.get("operation"), r.data.get("status"))
            for r in actions
        ]
        assert kept == [
            ("policy_decision", "alice", "fs.read", None),
            ("action_outcome", "alice", "fs.read", "ok"),
            ("action_blocked", "alice", "fs.write", None),
            ("policy_decision", "alice", "request", None),
            ("policy_decision", "bob", "deliver", None),
            ("policy_decision", "bob", "reply", None),
        ]
        assert actions[2].id == write.record_id
        assert actions[0].data["resource"] == str(d.workspace / "notes.txt")
        assert actions[1].data["decision_id"] == actions[0].id
        assert (await rec.verify()).ok


# An LLM agent's tools across processes: files through the tool service, a question to another
# agent as the agent's own request through the control plane (addressed to that agent).
ASK = ToolDef(
    "ask_agent",
    "Ask another agent and wait for its answer.",
    {
        "type": "object",
        "properties": {
            "agent": {"type": "string", "description": "The agent to ask"},
            "subject": {"type": "string", "description": "The subject it listens on"},
            "message": {"type": "string", "description": "What to ask"},
        },
        "required": ["agent", "subject", "message"],
    },
    "bus.request",
    "subject",
    params={"message": "payload", "agent": "recipient"},
)


async def test_an_llm_agent_reads_is_denied_a_write_asks_another_agent_across_processes(
    tmp_path: Path, closing: Closing
) -> None:
    outside, q = tmp_path / "outside.txt", "6 x 7"
    replies = iter(
        [
            Reply(tool_calls=[tool_call("read_file", {"path": "notes.txt"})]),
            Reply(tool_calls=[tool_call("write_file", {"path": str(outside), "content": "x"})]),
            Reply(tool_calls=[tool_call("ask_agent", {"agent": "bob", "subject": "ask.bob", "message": q})]),
        ]
    )

    def script(body: dict[str, Any]) -> Reply:
        heard = body["messages"][-1].get("content") or ""
        return next(replies, None) or Reply(content=f"Bob answered: {heard}")

    async with deployment(tmp_path) as d, ScriptedLLMServer({"assistant": script}) as server:
        (d.workspace / "notes.txt").write_text("ask bob")
        await d.control_plane()
        await d.tool_service()
        alice, bob = d.agent("alice"), d.agent("bob")
        try:

            async def answer(message: Any, metadata: Metadata) -> None:
                await bob.reply(metadata, f"{message} = 42")

            await bob.subscribe(delivery_subject("ask.>", agent="bob"), answer)
            await alice.connect()
            tools = [BUILTIN_TOOLS["fs.read"], BUILTIN_TOOLS["fs.write"], ASK]
            submit = ToolClient(alice, timeout=10).submit  # the agent's only way to act
            loop = AgentLoop(submit, tools, "openai/assistant", api_base=server.url, api_key="k")
            result = await loop.run("What does the note say to do? Do it.")
        finally:
            await alice.close()
            await bob.close()
        read, write, ask = result.tool_calls
        assert (read.ok, read.output) == (True, "ask bob")
        assert not write.allowed
        assert "workspace" in str(write.error)
        assert (ask.ok, ask.output) == (True, "6 x 7 = 42")
        assert '"6 x 7 = 42"' in result.text
        assert not outside.exists()
        rec = closing(await d.records())
        actions = await rec.query(event_type=[*DECISION_EVENTS, "action_outcome"])
        kept = [(r.event_type, r.agent_id, r.data.get("action") or r.data.get("operation")) for r in actions]
        assert kept == [
            ("policy_decision", "alice", "fs.read"),
            ("action_outcome", "alice", "fs.read"),
            ("action_blocked", "alice", "fs.write"),
            ("policy_decision", "alice", "request"),
            ("policy_decision", "bob", "deliver"),
            ("policy_decision", "bob", "reply"),
        ]
        assert (await rec.verify()).ok


async def test_an_agent_cannot_reach_the_tool_service_around_the_control_plane(tmp_path: Path) -> None:
    import nats

    async with deployment(tmp_path) as d:
        await d.tool_service("--log-level", "debug")
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await nats.connect(d.url("alice"), error_cb=on_error, allow_reconnect=False)
        try:
            await nc.publish(delivery_subject("action.fs.write", agent="tools"), b"\x80")
            await nc.flush()
            await wait_until(lambda: any("permissions violation for publish" in e for e in errors))
        finally:
            await nc.close()
        returncode, log = await stop(d.procs[0], signal.SIGTERM)
        assert returncode == 0
        assert "action request" not in log  # nothing reached it


async def test_two_tool_service_instances_run_each_action_once_and_answer_what_they_cannot_send(
    tmp_path: Path, closing: Closing
) -> None:
    async with deployment(tmp_path) as d:
        await d.control_plane()
        first = await d.tool_service("--log-level", "debug")
        second = await d.tool_service("--log-level", "debug")
        alice = d.agent("alice")
        try:
            tools = ToolClient(alice, timeout=10)
            for i in range(20):
                result = await tools.submit(ActionRequest("fs.write", f"n{i}.txt", {"content": str(i)}))
                assert result.ok, result
            (d.workspace / "big.txt").write_text("x" * 2_000_000)  # over NATS's 1 MiB payload
            big = await tools.submit(ActionRequest("fs.read", "big.txt"))
            assert big.allowed
            assert big.error is not None
            assert big.error.startswith("the output could not be sent"), big.error
        finally:
            await alice.close()
        logs = []
        for proc in (first, second):
            returncode, log = await stop(proc, signal.SIGTERM)
            assert returncode == 0
            logs.append(re.findall(r"action fs\.write of alice on '(n\d+\.txt)' done", log))
        assert sorted(logs[0] + logs[1]) == sorted(f"n{i}.txt" for i in range(20))  # each once
        assert logs[0], "the load is shared"
        assert logs[1], "the load is shared"
        rec = closing(await d.records())
        outcomes = await rec.query(event_type="action_outcome")
        assert [o.data["status"] for o in outcomes] == ["ok"] * 20 + ["error"]
        assert (await rec.verify()).ok


async def test_a_tool_service_killed_mid_request_leaves_a_timeout_and_nothing_hangs(
    tmp_path: Path, closing: Closing
) -> None:
    async with deployment(tmp_path) as d:
        (d.workspace / "notes.txt").write_text("hello")
        admin = await d.control_plane()
        doomed = await d.tool_service()
        alice = d.agent("alice")
        try:
            await alice.connect()
            tools = ToolClient(alice, timeout=3)
            doomed.send_signal(signal.SIGSTOP)  # it takes the request and never answers
            pending = asyncio.ensure_future(tools.submit(ActionRequest("fs.read", "notes.txt")))

            async def forwarded() -> bool:
                return await metric(admin, "agentos_control_plane_actions_forwarded_total") == 1

            await wait_until(forwarded)
            doomed.kill()
            await doomed.wait()
            lost = await asyncio.wait_for(pending, 10)
            assert not lost.allowed
            assert lost.error == "no answer within 3s: whether fs.read ran is unknown"
            await d.tool_service()  # a new instance: the control plane goes on
            again = await tools.submit(ActionRequest("fs.read", "notes.txt"))
            assert again.ok
            assert again.output == "hello"
        finally:
            await alice.close()
        rec = closing(await d.records())
        outcomes = await rec.query(event_type="action_outcome")
        decisions = await rec.query(event_type="policy_decision")
        assert len(decisions) == 2  # the lost one was decided, its outcome never came
        assert [o.data["decision_id"] for o in outcomes] == [decisions[1].id]
        assert (await rec.verify()).ok
