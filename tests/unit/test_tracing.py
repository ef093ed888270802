"""Tracing with the OpenTelemetry SDK's in-memory exporter: the bus's spans and W3C trace
context, the spans of verification, policy, holds, signals, actions, EMK, CMVK and the agent
loop; nothing when tracing is off; the setup from ``OTEL_*`` variables. (Hostile trace headers:
``tests/hostile/test_trace_headers.py``.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_os import AgentLoop
from agent_os.amb import AMB, Metadata, tracing
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call, verdict
from agent_os.control_plane import BUILTIN_TOOLS, ActionRequest, AgentSignal, KernelSpace, Pattern, Policy
from agent_os.emk import EMK
from tests.support import Collector, memory_url, wait_until
from tests.support.closing import Closing
from tests.support.holds import deploy
from tests.support.identities import identities
from tests.support.tracing import MemorySpans, traced

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]")  # sampled (and random, W3C level 2)


async def _pair(closing: Closing, **options: Any) -> tuple[AMB, AMB, Collector]:
    """Two clients on a broker of their own; the second collects ``tasks.*``."""
    url = memory_url("trace")
    a = closing(AMB("memory", url, agent_id="alice", **options))
    b = closing(AMB("memory", url, agent_id="bob"))
    got = Collector()
    await b.subscribe("tasks.*", got)
    await a.connect()
    return a, b, got


async def test_off_no_spans_and_no_trace_header(closing: Closing) -> None:
    """Tracing off: no layer, no header; a client connected before tracing was enabled stays
    untraced, so the switch is decided per client at connect."""
    assert not tracing.active
    a, _, got = await _pair(closing)
    await a.publish("tasks.one", 1)
    await got.wait_for(1)
    assert "traceparent" not in got.metadata[0].headers
    assert a._tracing is None
    assert a._publish_chain is None
    with traced() as memory:
        await a.publish("tasks.two", 2)  # connected before: untraced
        await got.wait_for(2)
        assert "traceparent" not in got.metadata[1].headers
        assert memory.finished().all == []


async def test_publish_and_delivery_are_producer_and_consumer_spans(
    spans: MemorySpans, closing: Closing
) -> None:
    a, _, got = await _pair(closing)
    message_id = await a.publish("tasks.work", {"n": 1}, headers={"content-type": "x"})
    await got.wait_for(1)
    found = spans.finished()
    send, process = found.one("send tasks.work"), found.one("process tasks.*")
    assert (send.kind, process.kind) == ("producer", "consumer")
    assert send.parent_id is None
    assert process.parent_id == send.span_id
    assert process.trace_id == send.trace_id
    header = got.metadata[0].headers["traceparent"]
    assert TRACEPARENT.fullmatch(header) is not None
    assert header.startswith(f"00-{send.trace_id}-{send.span_id}-")
    assert got.metadata[0].headers["content-type"] == "x"
    assert send.attributes == {
        "messaging.system": "memory",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": "tasks.work",
        "messaging.message.id": message_id,
        "messaging.client.id": "alice",
        "agent_os.message.sender": "alice",
    }
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.destination.template"] == "tasks.*"
    assert process.attributes["messaging.client.id"] == "bob"


async def test_request_and_reply_are_one_trace(spans: MemorySpans, closing: Closing) -> None:
    url = memory_url("trace")
    a = closing(AMB("memory", url, agent_id="alice"))
    b = closing(AMB("memory", url, agent_id="bob"))

    async def answer(message: Any, metadata: Metadata) -> None:
        await b.reply(metadata, message + 1)

    await b.subscribe("calc.inc", answer, queue="calc")
    assert await a.request("calc.inc", 41, recipient="bob") == 42
    found = spans.finished()
    request = found.one("request calc.inc")
    send = found.one("send calc.inc")
    served = found.one("process calc.inc")
    reply = found.one("send (temporary)")
    back = found.one("process (temporary)")
    assert request.kind == "client"
    assert request.parent_id is None
    assert found.parent(send) == request
    assert found.parent(served) == send
    assert found.parent(reply) == served
    assert found.parent(back) == reply
    assert len({s.trace_id for s in found.all}) == 1
    assert served.attributes["messaging.consumer.group.name"] == "calc"
    assert reply.attributes["messaging.destination.temporary"] is True
    assert reply.attributes["messaging.message.conversation_id"] == send.attributes["messaging.message.id"]
    assert request.attributes["agent_os.message.recipient"] == "bob"


async def test_a_failed_request_ends_its_span_with_the_error(spans: MemorySpans, closing: Closing) -> None:
    a = closing(AMB("memory", memory_url("trace"), agent_id="alice"))
    with pytest.raises(Exception, match="no reply"):
        await a.request("nobody.home", 1, timeout=0.05)
    request = spans.finished().one("request nobody.home")
    assert request.status == "error"
    assert "exception" in request.events


async def test_verification_and_policy_spans_sit_in_the_delivery(
    spans: MemorySpans, closing: Closing
) -> None:
    keys = await identities("unused", "alice", "bob")
    policy = Policy("trace", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"), name="publish-tasks")
    policy.add_rule("allow", Pattern("deliver", "tasks.*"), name="deliver-tasks")
    kernel = closing(KernelSpace(policy=policy))
    url = memory_url("trace")
    a = closing(AMB("memory", url, agent_id="alice", middleware=[keys["alice"].middleware()]))
    b = closing(AMB("memory", url, agent_id="bob", middleware=[keys["bob"].middleware()]))
    kernel.attach(a)
    kernel.attach(b)
    got = Collector()
    await b.subscribe("tasks.*", got)
    await a.publish("tasks.work", "hi")
    await got.wait_for(1)
    found = spans.finished()
    send, process = found.one("send tasks.work"), found.one("process tasks.*")
    verify = found.one("iatp.verify")
    published, delivered = found.one("policy publish"), found.one("policy deliver")
    assert found.parent(published) == send
    assert found.parent(verify) == process
    assert found.parent(delivered) == process
    assert verify.attributes["agent_os.iatp.outcome"] == "verified"
    assert verify.attributes["agent_os.iatp.sender"] == "alice"
    assert verify.status == "unset"
    assert delivered.attributes["agent_os.policy.rule"] == "deliver-tasks"
    assert delivered.attributes["agent_os.policy.action"] == "allow"
    assert delivered.attributes["agent_os.policy.name"] == "trace"
    assert delivered.attributes["agent_os.agent.id"] == "bob"
    assert delivered.events == ("flight_recorder.append",)
    assert published.attributes["agent_os.policy.rule"] == "publish-tasks"


async def test_a_rejected_message_has_a_failed_verification_span(
    spans: MemorySpans, closing: Closing
) -> None:
    keys = await identities("unused", "bob")
    url = memory_url("trace")
    mallory = closing(AMB("memory", url, agent_id="mallory"))  # signs nothing
    b = closing(AMB("memory", url, agent_id="bob", middleware=[keys["bob"].middleware()]))
    got, dead = Collector(), Collector()
    await b.subscribe("tasks.*", got)
    watcher = closing(AMB("memory", url))
    await watcher.subscribe("_DLQ.>", dead)
    await mallory.publish("tasks.x", "forged")
    await dead.wait_for(1)
    assert dead.metadata[0].headers[DLQ_REASON] == "unsigned"
    found = spans.finished()
    verify, process = found.one("iatp.verify"), found.one("process tasks.*")
    assert verify.attributes["agent_os.iatp.outcome"] == "rejected"
    assert verify.attributes["agent_os.iatp.reason"] == "unsigned"
    assert verify.status == "error"
    assert process.status == "error"
    assert found.parent(verify) == process
    assert got.messages == []


async def test_a_held_message_is_a_hold_span_then_a_release(spans: MemorySpans) -> None:
    d = await deploy("memory", memory_url("holds"))
    a_id = d.a.agent_id
    assert a_id is not None
    try:
        await d.kernel.send_signal(a_id, AgentSignal.SIGSTOP)
        await d.a.publish(d.to("tasks.work"), "held")
        await wait_until(lambda: d.kernel.get_agent(a_id).held == 1)
        await d.kernel.send_signal(a_id, AgentSignal.SIGCONT)
        await d.got.wait_for(1)
    finally:
        await d.close()
    found = spans.finished()
    assert {s.name for s in found.all} >= {"signal SIGSTOP", "signal SIGCONT"}
    stop = found.one("signal SIGSTOP")
    assert stop.attributes["agent_os.signal.took_effect"] is True
    assert stop.events == ("flight_recorder.append",)
    hold, release = found.one("hold deliver"), found.one("release deliver")
    process = found.parent(hold)
    assert process is not None
    assert process.name == f"process {d.ingress}.>"
    assert release.parent_id == hold.parent_id  # beside the hold, in the message's trace
    assert hold.attributes["agent_os.hold.outcome"] == "released"
    forward = [s for s in found.all if s.name.startswith(f"send {d.delivery}.")]
    assert len(forward) == 1
    assert found.parent(forward[0]) == release
    delivered = found.children(release)
    assert "policy publish" in {s.name for s in delivered}


async def test_a_forward_carries_the_services_own_span(spans: MemorySpans) -> None:
    d = await deploy("memory", memory_url("forward"))
    try:
        await d.a.publish(d.to("tasks.work"), "hello")
        await d.got.wait_for(1)
    finally:
        await d.close()
    found = spans.finished()
    send = found.one(f"send {d.ingress}.tasks.work")
    forward = next(s for s in found.all if s.name.startswith(f"send {d.delivery}."))
    received = found.one(f"process {d.delivery}.>")
    assert found.parent(received) == forward
    assert len(found.trace(send.trace_id).all) == len(found.all)
    assert d.got.metadata[0].headers["traceparent"].startswith(f"00-{forward.trace_id}-{forward.span_id}-")


async def test_submit_is_an_action_span_with_its_decision(spans: MemorySpans, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        proc = kernel.external("reader")
        proc.permissions = frozenset({"read"})
        result = await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="reader"))
        denied = await kernel.submit(ActionRequest("fs.write", "b.txt", {"content": "x"}, agent_id="reader"))
    assert result.ok
    assert not denied.allowed
    found = spans.finished()
    read, write = found.one("action fs.read"), found.one("action fs.write")
    assert read.attributes["agent_os.action.allowed"] is True
    assert read.events == ("flight_recorder.append",)  # the outcome record
    assert write.attributes["agent_os.action.allowed"] is False
    assert write.status == "unset"  # a denial is an answer, not a failure
    decisions = found.children(read)
    assert [s.name for s in decisions] == ["policy read"]
    assert decisions[0].attributes["agent_os.action.name"] == "fs.read"
    assert found.children(write)[0].attributes["agent_os.policy.action"] == "deny"


async def test_emk_store_and_search_spans() -> None:
    with traced() as memory:
        async with EMK(storage="memory", embedding_model="hashing") as emk:
            await emk.store("alice", "Traces follow requests.")
            found = await emk.search("alice", "requests")
    assert len(found) == 1
    spans = memory.finished()
    store, search = spans.one("emk.store"), spans.one("emk.search")
    assert store.attributes["agent_os.emk.records"] == 1
    assert store.attributes["agent_os.agent.id"] == "alice"
    assert search.attributes["agent_os.emk.results"] == 1
    embeds = spans.named("emk.embed")
    assert [spans.parent(e) for e in embeds] == [store, search]
    assert embeds[0].attributes["gen_ai.request.model"].startswith("hashing")


async def test_cmvk_verify_has_a_span_per_model_call(spans: MemorySpans) -> None:
    def mock(name: str, reply: Any) -> ModelSpec:
        return ModelSpec(name, model=f"openai/{name}", params={"mock_response": reply})

    cmvk = CMVK([mock("a", verdict("supported")), mock("b", verdict("supported")), mock("c", "no verdict")])
    result = await cmvk.verify("What is 6 x 7?", "42")
    assert result.verified
    found = spans.finished()
    verify = found.one("cmvk.verify")
    calls = found.children(verify)
    assert sorted(s.name for s in calls) == ["chat openai/a", "chat openai/b", "chat openai/c"]
    assert all(s.kind == "client" and s.attributes["gen_ai.operation.name"] == "chat" for s in calls)
    assert verify.attributes["agent_os.cmvk.verified"] is True
    assert verify.attributes["agent_os.cmvk.models"] == 3


async def test_agent_loop_turns_model_calls_and_actions(spans: MemorySpans, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    async with KernelSpace("permissive", workspace=tmp_path) as kernel, ScriptedLLMServer() as server:
        server.script(
            "scripted",
            [Reply(tool_calls=[tool_call("read_file", {"path": "a.txt"})]), Reply(content="It says hello.")],
        )
        loop = AgentLoop(
            kernel.submit, [BUILTIN_TOOLS["fs.read"]], "openai/scripted", api_base=server.url, api_key="k"
        )
        agent = kernel.register(loop.run, name="assistant", permissions=["read"])
        result = await kernel.execute(agent, "What does a.txt say?")
    assert result.turns == 2
    found = spans.finished()
    run = found.one("agent_loop.run")
    turns = found.named("agent_loop.turn")
    assert [found.parent(t) for t in turns] == [run, run]
    assert [t.attributes["agent_os.agent_loop.turn"] for t in turns] == [1, 2]
    first = {s.name for s in found.children(turns[0])}
    assert first == {"chat openai/scripted", "action fs.read"}
    assert run.attributes["agent_os.agent_loop.finish"] == "stop"


def test_tracing_is_not_configured_without_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configure_from_env("agent-os-test") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.configure_from_env("agent-os-test") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure_from_env("agent-os-test") is None
    assert not tracing.active


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin", "'zipkin' is not one of otlp, console, none"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "only http/protobuf is supported"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json", "only http/protobuf is supported"),
    ],
)
def test_a_tracing_configuration_it_cannot_serve_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, error: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=error):
        tracing.configure_from_env("agent-os-test")
    assert not tracing.active


def test_the_environment_configures_an_otlp_exporter_in_a_process() -> None:
    """In a process of its own (the global tracer provider is set once per process): the
    endpoint alone configures OTLP/HTTP; the service name is the default unless
    OTEL_SERVICE_NAME names one."""
    code = (
        "from agent_os.amb import tracing\n"
        "setup = tracing.configure_from_env('agent-os-default')\n"
        "processor = setup.provider._active_span_processor._span_processors[0]\n"
        "exporter = processor._batch_processor._exporter\n"
        "name = setup.provider.resource.attributes['service.name']\n"
        "print(type(exporter).__module__, name, tracing.active)\n"
        "setup.shutdown()\n"
        "print(tracing.active)\n"
    )
    for extra, name in (({}, "agent-os-default"), ({"OTEL_SERVICE_NAME": "mine"}, "mine")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **extra})
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True
        ).stdout.split()
        assert out == ["opentelemetry.exporter.otlp.proto.http.trace_exporter", name, "True", "False"]


def test_the_bus_and_the_control_plane_import_no_opentelemetry() -> None:
    code = (
        "import sys, agent_os.amb, agent_os.control_plane, agent_os.iatp, agent_os.emk, agent_os.cmvk\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
