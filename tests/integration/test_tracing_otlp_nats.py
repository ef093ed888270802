"""One trace across processes: three agents on NATS ask each other through the control-plane
service (a process), and the last one stores a memory in the memory service (a process), all
signed with IATP; the services export their spans with OTLP over HTTP (configured only by
``OTEL_*`` variables), the agents too, to an OTLP/HTTP receiver the test runs, which decodes
them with the ``opentelemetry-proto`` messages. The whole chain arrives as ONE trace, with the
verification and policy spans of the control plane and the memory service in it. A tracing
configuration a service cannot serve stops it at start."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata, tracing
from agent_os.services._identity import PASSPHRASE_ENV
from agent_os.services.control_plane_service import ReplyViaService, agent_inbox
from tests.support import wait_until
from tests.support.identities import PASSPHRASE, process_identities
from tests.support.processes import AGENT_OS, start, start_service, stop
from tests.support.servers import NATS_URL
from tests.support.tracing import OtlpReceiver, Spans


def _agents_provider(endpoint: str) -> Any:
    """The test process's tracer provider: the agents' spans go to the same receiver."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource({"service.name": "agents"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"), schedule_delay_millis=100)
    )
    return provider


@pytest.mark.nats
async def test_a_request_chain_across_three_agents_and_two_services_is_one_trace(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    ingress, delivery, replies, memory_prefix = f"in_{tag}", f"out_{tag}", f"re_{tag}", f"mem_{tag}"
    alice, bob, carol = f"alice-{tag}", f"bob-{tag}", f"carol-{tag}"
    cp_id, memory_id = f"cp-{tag}", f"memory-{tag}"
    keys = await process_identities(tmp_path / "keys", [cp_id, memory_id], [alice, bob, carol])
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: traced\ndefault_action: deny\nrules:\n"
        "  - {action: allow, operation: request, resource: 'ask.*', name: ask}\n"
        "  - {action: allow, operation: deliver, resource: 'ask.*', name: hand-over}\n"
        "  - {action: allow, operation: reply, resource: 'ask.*', name: answer}\n"
    )

    async with OtlpReceiver() as receiver:
        env = {
            PASSPHRASE_ENV: PASSPHRASE,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # all it takes to trace
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        procs: list[asyncio.subprocess.Process] = []
        provider = _agents_provider(receiver.endpoint)
        tracing.enable(provider)
        clients: list[AMB] = []
        try:
            cp, _ = await start_service(
                *("--broker", NATS_URL, "--identities", str(tmp_path / "keys" / cp_id)),
                *("--policy", str(policy), "--recorder", "memory", "--agents", f"{alice},{bob},{carol}"),
                *("--ingress-prefix", ingress, "--delivery-prefix", delivery, "--reply-prefix", replies),
                *("--queue", f"cp_{tag}", "--agent-id", cp_id),
                env=env,
            )
            procs.append(cp)
            memory, _ = await start(
                "memory",
                *("--broker", NATS_URL, "--identities", str(tmp_path / "keys" / memory_id)),
                *("--storage", "memory", "--embedding-model", "hashing"),
                *("--prefix", memory_prefix, "--agent-id", memory_id),
                env=env,
            )
            procs.append(memory)

            def agent(name: str) -> AMB:
                client = AMB(
                    "nats",
                    NATS_URL,
                    agent_id=name,
                    inbox_prefix=agent_inbox(name),
                    middleware=[keys[name].middleware(), ReplyViaService(replies)],
                )
                clients.append(client)
                return client

            a, b, c = agent(alice), agent(bob), agent(carol)

            async def bob_asks_carol(message: Any, metadata: Metadata) -> None:
                said = await b.request(f"{ingress}.ask.carol", message, recipient=carol, timeout=15)
                await b.reply(metadata, said)

            async def carol_remembers(message: Any, metadata: Metadata) -> None:
                stored = await c.request(f"{memory_prefix}.store", {"content": message}, timeout=15)
                await c.reply(metadata, stored["record"]["id"])

            await b.subscribe(f"{delivery}.{bob}.>", bob_asks_carol)
            await c.subscribe(f"{delivery}.{carol}.>", carol_remembers)
            await a.connect()
            record_id = await a.request(
                f"{ingress}.ask.bob", "traces cross processes", recipient=bob, timeout=30
            )
            assert isinstance(record_id, str)
        finally:
            for client in clients:
                await client.close()
            for proc in procs:  # SIGTERM: each exports its last spans as it stops
                if proc.returncode is None:
                    returncode, log = await stop(proc, signal.SIGTERM)
                    assert returncode == 0, log
            tracing.disable()
            await asyncio.to_thread(provider.shutdown)  # exports to the receiver on this loop

        def chain() -> Spans | None:
            roots = [
                s
                for s in receiver.spans.all
                if s.name == f"request {ingress}.ask.bob" and s.attributes.get("messaging.client.id") == alice
            ]
            return receiver.spans.trace(roots[0].trace_id) if roots else None

        def complete() -> bool:
            found = chain()
            return found is not None and {"emk.store", "policy reply"} <= set(found.names())

        await wait_until(complete, timeout=20, what="the chain's spans at the receiver")
        trace = chain()
        assert trace is not None

    # one trace: every span of it hangs on another of it, up to alice's request
    roots = [s for s in trace.all if trace.parent(s) is None]
    assert [s.name for s in roots] == [f"request {ingress}.ask.bob"]
    assert {s.service for s in trace.all} == {"agents", "agent-os-control-plane", "agent-os-memory"}
    clients_seen = {s.attributes.get("messaging.client.id") for s in trace.all} - {None}
    assert clients_seen == {alice, bob, carol, cp_id, memory_id}
    # and every span the three agents made is in it
    mine = [s for s in receiver.spans.all if s.attributes.get("messaging.client.id") in {alice, bob, carol}]
    assert {s.trace_id for s in mine} == {trace.all[0].trace_id}

    in_cp = Spans(s for s in trace.all if s.service == "agent-os-control-plane")
    verified = in_cp.named("iatp.verify")
    assert len(verified) >= 4  # alice's and bob's requests, carol's and bob's replies
    assert {s.attributes["agent_os.iatp.outcome"] for s in verified} == {"verified"}
    assert {s.attributes["agent_os.iatp.sender"] for s in verified} == {alice, bob, carol}
    rules = {
        (s.name, s.attributes.get("agent_os.policy.rule")) for s in in_cp.all if s.name.startswith("policy ")
    }
    assert rules == {("policy request", "ask"), ("policy deliver", "hand-over"), ("policy reply", "answer")}
    for decision in (s for s in in_cp.all if s.name.startswith("policy ")):
        assert decision.attributes["agent_os.policy.action"] == "allow"
        assert decision.events == ("flight_recorder.append",)
        parent = trace.parent(decision)
        assert parent is not None
        assert parent.kind == "consumer"
    forwards = [s for s in in_cp.all if s.kind == "producer"]
    assert {s.attributes["messaging.destination.name"] for s in forwards} >= {
        f"{delivery}.{bob}.ask.bob",
        f"{delivery}.{carol}.ask.carol",
    }

    in_memory = Spans(s for s in trace.all if s.service == "agent-os-memory")
    store = in_memory.one("emk.store")
    assert store.attributes["agent_os.agent.id"] == carol
    assert [s.name for s in in_memory.children(store)] == ["emk.embed"]
    served = trace.parent(store)
    assert served is not None
    assert served.name == f"process {memory_prefix}.store"
    assert in_memory.one("iatp.verify").attributes["agent_os.iatp.sender"] == carol
    asked = trace.parent(served)
    assert asked is not None
    assert (asked.service, asked.attributes["messaging.client.id"]) == ("agents", carol)


async def test_a_service_refuses_a_tracing_configuration_it_cannot_serve() -> None:
    """A bad ``OTEL_*`` setting stops the service at start with one line, before it serves."""
    proc = await asyncio.create_subprocess_exec(
        str(AGENT_OS),
        *("serve", "memory", "--broker", "memory://traced", "--trust-bus", "--no-metrics"),
        *("--storage", "memory", "--embedding-model", "hashing"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert out == b""
    assert err.decode().strip().splitlines()[-1] == (
        "Error: ValueError: OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported, not 'grpc'"
    )
