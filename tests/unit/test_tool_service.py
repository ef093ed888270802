"""Actions across processes on the in-memory broker: the control-plane service decides an
agent's action request with the kernel's action gate (one record), answers a denial itself,
forwards an allowed one to the tool service and records its outcome when the reply passes."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import AMB, RequestTimeout
from agent_os.control_plane import (
    DECISION_EVENTS,
    VIOLATION_EVENTS,
    ActionRequest,
    ActionResult,
    AgentSignal,
    FlightRecorder,
    KernelSpace,
    Mediator,
    Pattern,
    Policy,
)
from agent_os.control_plane.actions import ActionRegistry, FileSystem
from agent_os.control_plane.errors import KernelError
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    ReplyViaService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
)
from agent_os.services.tool_service import ToolClient, ToolService
from tests.support import wait_until


def action_policy(root: Path) -> Policy:
    policy = Policy("actions", default_action="deny")
    policy.add_rule("allow", Pattern("read", f"{root}/*"))
    policy.add_rule("deny", Pattern("write", f"{root}/locked/*"), reason="locked")
    policy.add_rule("allow", Pattern("write", f"{root}/*"))
    policy.add_rule("allow", Pattern("read", "crm://*"))
    return policy


class Failing:
    """A provider whose run fails: its error is the outcome."""

    def resource(self, request: ActionRequest) -> str:
        return f"crm://{request.target}"

    async def run(self, request: ActionRequest) -> Any:
        raise RuntimeError("the crm is down")


@dataclass
class Mediated:
    kernel: KernelSpace
    service: ControlPlaneService
    tools: ToolService
    agent: AMB
    client: ToolClient
    where: str


@asynccontextmanager
async def mediated(root: Path, *, timeout: float = 5.0) -> AsyncIterator[Mediated]:
    """The control-plane service (trusting the in-process bus), a tool service rooted at
    ``root`` and an agent ``alice`` with a ToolClient, all on one memory broker."""
    where = f"memory://tools-{uuid.uuid4().hex}"
    registry = ActionRegistry()
    FileSystem(root).register(registry)
    registry.register("crm.fail", Failing(), "read")
    async with (
        KernelSpace(policy=action_policy(root), workspace=root) as kernel,
        ControlPlaneService(
            AMB("memory", where, agent_id="control-plane"), kernel, trust_bus=True, agents=["alice"]
        ) as service,
        ToolService(
            AMB("memory", where, agent_id="tools", middleware=[ReplyViaService()]), registry, trust_bus=True
        ) as tools,
        AMB("memory", where, agent_id="alice", inbox_prefix=agent_inbox("alice")) as agent,
    ):
        kernel.actions.register("crm.fail", Failing(), "read")
        try:
            yield Mediated(kernel, service, tools, agent, ToolClient(agent, timeout=timeout), where)
        finally:
            await tools.client.close()


async def wait_for_records(recorder: FlightRecorder, event: str, n: int) -> list[Any]:
    async def enough() -> bool:
        return len(await recorder.query(event_type=event)) >= n

    await wait_until(enough)
    return await recorder.query(event_type=event)


async def _records(recorder: FlightRecorder) -> list[tuple[str, Any, Any]]:
    records = await recorder.query(event_type=[*DECISION_EVENTS, "action_outcome"])
    return [
        (r.event_type, r.data.get("action"), r.data.get("status", r.data.get("decision"))) for r in records
    ]


async def test_an_allowed_action_runs_at_the_tool_service_and_both_records_are_here(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    async with mediated(tmp_path) as m:
        read = await m.client.submit(ActionRequest("fs.read", "notes.txt"))
        assert read == ActionResult(True, "hello", None, None)
        write = ActionRequest("fs.write", "out/a.txt", {"content": "hi", "parents": True})
        wrote = await m.client.submit(write)
        assert wrote.ok
        assert wrote.output == {"path": str(tmp_path / "out/a.txt"), "bytes": 2}
        assert (tmp_path / "out/a.txt").read_text() == "hi"
        await _wait_outcomes(m, 2)
        assert await _records(m.kernel.recorder) == [
            ("policy_decision", "fs.read", "allow"),
            ("action_outcome", "fs.read", "ok"),
            ("policy_decision", "fs.write", "allow"),
            ("action_outcome", "fs.write", "ok"),
        ]
        decision, outcome = (await m.kernel.recorder.query(agent_id="alice"))[:2]
        assert decision.data["resource"] == str(tmp_path / "notes.txt")
        assert outcome.data["decision_id"] == decision.id
        assert m.tools.stats.done == 2
        assert m.service.actions.forwarded == 2


async def _wait_outcomes(m: Mediated, n: int) -> None:
    # The outcome is recorded when the reply passes the service, just before it is forwarded:
    # the agent has its answer by then, so this holds at once.
    assert m.service.actions.outcomes == n


async def test_a_denied_action_is_answered_by_the_service_and_never_reaches_the_tools(tmp_path: Path) -> None:
    async with mediated(tmp_path) as m:
        outside = await m.client.submit(ActionRequest("fs.write", "/etc/agent-os-test", {"content": "x"}))
        locked = await m.client.submit(ActionRequest("fs.write", "locked/a.txt", {"content": "x"}))
        unknown = await m.client.submit(ActionRequest("fs.chmod", "a.txt"))
        other = await m.client.submit(ActionRequest("fs.read", "a.txt", agent_id="bob"))
        for result in (outside, locked, unknown, other):
            assert not result.allowed
            assert result.record_id is not None
        assert "outside" in str(outside.error) or "workspace" in str(outside.error)
        assert locked.error == "locked"
        assert unknown.error == "unknown action 'fs.chmod'"
        assert other.error == "agent alice cannot act as 'bob'"
        violations = await m.kernel.recorder.query(event_type=VIOLATION_EVENTS)
        assert [v.id for v in violations] == [r.record_id for r in (outside, locked, unknown, other)]
        assert await m.kernel.recorder.query(event_type=["policy_decision", "action_outcome"]) == []
        assert m.tools.stats.requests == 0
        assert not (tmp_path / "locked").exists()


async def test_a_malformed_action_request_is_denied_and_recorded(tmp_path: Path) -> None:
    async with mediated(tmp_path) as m:
        subject = ingress_subject("action.fs.read")
        for payload, why in (
            ("notes.txt", "an action request is a map, got str"),
            ({"target": 3}, "an action's target is a string, got int"),
            ({"target": "a", "params": [1]}, "an action's params are a map, got list"),
            ({"target": "a", "rm": True}, "unknown action request fields: rm"),
        ):
            answer = await m.agent.request(subject, payload, timeout=5)
            assert answer["allowed"] is False
            assert answer["error"] == why
        # Addressed to another agent: denied; its client drops the service's answer (a request
        # to bob is answered by bob or not at all), so it times out.
        with pytest.raises(RequestTimeout):
            await m.agent.request(subject, {"target": "a"}, recipient="bob", timeout=0.5)
        violations = await m.kernel.recorder.query(event_type=VIOLATION_EVENTS)
        assert len(violations) == 5
        assert violations[-1].data["reason"] == "an action goes to the tool service 'tools', not 'bob'"
        # Not a request: the mediator denies it as a message (one record), nothing is decided.
        await m.agent.publish(subject, {"target": "a"})
        # a mediated-mode refusal, after the five action denials above (all kernel pre-checks)
        denied = await wait_for_records(m.kernel.recorder, "action_blocked", 6)
        assert denied[-1].data["reason"] == "an action is a request: it needs a reply_to"
        assert m.tools.stats.requests == 0


async def test_a_provider_failure_is_the_recorded_outcome(tmp_path: Path) -> None:
    async with mediated(tmp_path) as m:
        failed = await m.client.submit(ActionRequest("crm.fail", "acme"))
        assert failed == ActionResult(True, None, "the crm is down", None)
        missing = await m.client.submit(ActionRequest("fs.read", "nope.txt"))
        assert missing.allowed
        assert missing.error == "'nope.txt': no such file or directory"
        outcomes = await m.kernel.recorder.query(event_type="action_outcome")
        assert [(o.data["status"], o.data["error"]) for o in outcomes] == [
            ("error", "the crm is down"),
            ("error", "'nope.txt': no such file or directory"),
        ]


async def test_an_action_with_no_answer_times_out_as_unknown(tmp_path: Path) -> None:
    async with mediated(tmp_path, timeout=0.3) as m:
        await m.tools.stop()  # nobody takes the forwarded request
        result = await m.client.submit(ActionRequest("fs.read", "notes.txt"))
        assert not result.allowed
        assert result.error == "no answer within 0.3s: whether fs.read ran is unknown"
        assert [r.event_type for r in await m.kernel.recorder.query(agent_id="alice")] == ["policy_decision"]


async def test_the_tool_service_acts_only_for_the_action_a_request_was_signed_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    caplog.set_level(logging.WARNING, logger="agent_os.services.tools")  # another test may raise it
    async with mediated(tmp_path) as m:
        # On this bus anyone may publish to the tool service's subjects (under the generated
        # NATS permissions only the control-plane service can): its own checks still hold.
        # Its answers go through the service, which drops them: no request of mallory's waits.
        async with AMB("memory", m.where, agent_id="mallory") as mallory:
            reply_to = agent_inbox("mallory") + ".1"
            write = {"target": "x.txt", "params": {"content": "x"}}
            tools = delivery_subject("action.fs.write", agent="tools")
            await mallory.publish(tools, write, reply_to=reply_to)
            read = {"target": "notes.txt", "agent_id": "alice"}
            await mallory.publish(delivery_subject("action.fs.read", agent="tools"), read, reply_to=reply_to)
            await wait_until(lambda: m.tools.stats.refused == 2)
        assert m.tools.stats.done == 0
        assert not (tmp_path / "x.txt").exists()
        assert m.tools.stats.refused == 2
        refusals = [r.getMessage() for r in caplog.records if r.name == "agent_os.services.tools"]
        assert len(refusals) == 2
        assert all("the request was signed for 'deliver.tools.action.fs." in r for r in refusals)


async def test_tool_client_and_service_refuse_bad_arguments(tmp_path: Path) -> None:
    async with AMB("memory", f"memory://tools-{uuid.uuid4().hex}", agent_id="x") as bus:
        with pytest.raises(ValueError, match="timeout"):
            ToolClient(bus, timeout=0)
        with pytest.raises(TypeError, match="ActionRequest"):
            await ToolClient(bus).submit("fs.read")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="sender verification"):
            ToolService(bus, ActionRegistry())
        with pytest.raises(ValueError, match="agent id"):
            ToolService(bus, ActionRegistry(), agent_id="a.b", trust_bus=True)


async def test_decide_action_and_record_outcome_split_submit(tmp_path: Path) -> None:
    async with KernelSpace(policy=action_policy(tmp_path), workspace=tmp_path) as kernel:
        kernel.external("alice")
        decided = await kernel.decide_action(ActionRequest("fs.read", "a.txt", agent_id="alice"))
        assert decided.allowed
        assert decided.data["resource"] == str(tmp_path / "a.txt")
        done = await kernel.record_action_outcome(decided, "it broke")
        assert done.data["decision_id"] == decided.record_id
        assert done.data["status"] == "error"
        read = ActionRequest("fs.read", "a.txt", agent_id="alice")
        refused = await kernel.decide_action(read, refusal="no")
        assert refused.denial() == ActionResult(False, None, "no", refused.record_id)
        with pytest.raises(KernelError, match="only an allowed action runs"):
            await kernel._submitter.run(refused)
        kernel.external("alice").kill()
        killed = await kernel.decide_action(ActionRequest("fs.read", "a.txt", agent_id="alice"))
        assert killed.denial().error == "agent alice was killed or has finished"


async def test_a_stopped_agents_action_waits_for_sigcont_and_a_killed_ones_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    async with mediated(tmp_path, timeout=0.5) as m:
        await m.kernel.send_signal("alice", AgentSignal.SIGSTOP)
        held = asyncio.ensure_future(
            ToolClient(m.agent, timeout=5).submit(ActionRequest("fs.read", "notes.txt"))
        )
        await wait_for_records(m.kernel.recorder, "message_held", 1)
        assert m.tools.stats.requests == 0
        await m.kernel.send_signal("alice", AgentSignal.SIGCONT)
        assert (await held).output == "hello"
        await m.kernel.send_signal("alice", AgentSignal.SIGKILL)
        dropped = await m.client.submit(ActionRequest("fs.read", "notes.txt"))
        assert not dropped.allowed
        assert dropped.error is not None
        assert dropped.error.startswith("no answer within")
        assert len(await m.kernel.recorder.query(event_type="message_dropped")) == 1
        assert len(await m.kernel.recorder.query(event_type="policy_decision")) == 1


def test_the_mediator_takes_actions_on_ingress_subjects_only() -> None:
    kernel = KernelSpace()
    with pytest.raises(KernelError, match="inbound_prefix"):
        Mediator(kernel, kernel.external("svc"), action_prefix="action")


async def test_bus_actions_are_the_agents_own_messages_through_the_control_plane(tmp_path: Path) -> None:
    # bus.* actions of a ToolClient go out on alice's own client under the ingress prefix; the
    # control plane decides on them as messages (its policy has no rule for them: denied, so
    # the request is dead-lettered and gets no answer).
    async with mediated(tmp_path, timeout=0.5) as m:
        reserved = await m.client.submit(ActionRequest("bus.request", "_INBOX.bob.1", {"payload": 1}))
        assert not reserved.allowed
        assert "platform's own" in str(reserved.error)
        bad = await m.client.submit(ActionRequest("bus.request", "ask.bob", {"timeout": "soon"}))
        assert not bad.allowed
        unanswered = await m.client.submit(
            ActionRequest("bus.request", "ask.bob", {"payload": "6 x 7", "timeout": 0.5})
        )
        assert not unanswered.allowed
        assert str(unanswered.error).startswith("no answer to ask.bob")
        denied = await wait_for_records(m.kernel.recorder, "policy_violation", 1)
        assert [(r.data["operation"], r.data["resource"]) for r in denied] == [("request", "ask.bob")]
        assert m.tools.stats.requests == 0  # never the tool service's work
