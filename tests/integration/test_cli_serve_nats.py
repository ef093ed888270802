"""``agent-os serve memory|verifier`` as processes on the shared NATS server: they answer over
the bus, finish what is in flight on SIGTERM/SIGINT, and exit 0."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import uuid
from pathlib import Path

import pytest

from agent_os.amb import AMB, RemoteError, get_serializer
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.services._identity import PASSPHRASE_ENV
from agent_os.services.verifier_service import VerifierRefused, request_verification
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.identities import PASSPHRASE, service_identities
from tests.support.processes import start, stop
from tests.support.servers import NATS_URL, PG_DSN

pytestmark = pytest.mark.nats


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_memory_answers_and_stops_cleanly(sig: signal.Signals) -> None:
    prefix = f"emk_cli_{uuid.uuid4().hex[:10]}"
    proc, ready = await start(
        "memory",
        "--broker",
        NATS_URL,
        "--trust-bus",
        "--storage",
        "memory",
        "--embedding-model",
        "hashing",
        "--prefix",
        prefix,
    )
    assert ready.startswith(f"ready memory subjects={prefix}.* broker={NATS_URL} metrics=http://127.0.0.1:")
    alice = AMB("nats", NATS_URL, agent_id=f"alice-{prefix}")
    bob = AMB("nats", NATS_URL, agent_id=f"bob-{prefix}")
    try:
        stored = await alice.request(
            f"{prefix}.store", {"content": "Deploys happen on Tuesdays."}, timeout=10
        )
        assert stored["ok"] is True
        assert stored["record"]["agent_id"] == f"alice-{prefix}"
        found = await alice.request(f"{prefix}.search", {"query": "when are deploys"}, timeout=10)
        assert [r["content"] for r in found["records"]] == ["Deploys happen on Tuesdays."]
        assert (await bob.request(f"{prefix}.search", {"query": "deploys"}, timeout=10))["records"] == []
        with pytest.raises(RemoteError, match="BadRequest: 'content' is required"):
            await alice.request(f"{prefix}.store", {"text": "no content"}, timeout=10)
        returncode, log = await stop(proc, sig)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await alice.close()
        await bob.close()
    assert returncode == 0, log
    assert "stopping: answering the requests in flight" in log


async def test_serve_verifier_answers_finishes_in_flight_work_and_stops_cleanly() -> None:
    tag = uuid.uuid4().hex[:10]
    subject = f"cmvk_cli_{tag}.verify"
    scripts = {"gpt": Reply(verdict("supported", 0.9)), "claude": Reply(verdict("supported", 0.8))}
    async with ScriptedLLMServer(scripts) as llm:
        proc, ready = await start(
            "verifier",
            "--broker",
            NATS_URL,
            "--trust-bus",
            "--model",
            "gpt=openai/gpt",
            "--model",
            "claude=openai/claude",
            "--api-base",
            llm.url,
            "--subject",
            subject,
            "--queue",
            f"cmvk_cli_{tag}",
            env={"AGENTOS_LLM_API_KEY": "test-key"},
        )
        assert ready.startswith(
            f"ready verifier subject={subject} broker={NATS_URL} metrics=http://127.0.0.1:"
        )
        caller = AMB("nats", NATS_URL, agent_id=f"caller-{tag}")
        try:
            reply = await request_verification(caller, "What is 6 x 7?", "42", subject=subject, timeout=20)
            assert reply["verified"] is True
            assert reply["model_votes"] == {"gpt": True, "claude": True}
            assert {r.model for r in llm.requests} == {"gpt", "claude"}

            # A verification in flight when SIGTERM arrives is still answered.
            llm.script("gpt", Reply(verdict("contradicted"), delay=1.0))
            llm.script("claude", Reply(verdict("contradicted"), delay=1.0))
            asked = len(llm.requests)
            pending = asyncio.create_task(
                request_verification(caller, "What is 6 x 7?", "48", subject=subject, timeout=20)
            )
            await wait_until(lambda: len(llm.requests) >= asked + 2, 10, "both models asked")
            returncode, log = await stop(proc, signal.SIGTERM)
            late = await asyncio.wait_for(pending, 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await caller.close()
    assert returncode == 0, log
    assert late["verified"] is False
    assert late["model_votes"] == {"gpt": False, "claude": False}


async def test_serve_memory_on_postgresql_keeps_memories_across_restarts(closing: Closing) -> None:
    import psycopg

    dsn = PG_DSN
    tag = uuid.uuid4().hex[:10]
    prefix, namespace = f"emk_cli_{tag}", f"emk_cli_{tag}"
    args = (
        "memory",
        "--broker",
        NATS_URL,
        "--trust-bus",
        "--storage",
        "postgresql",
        "--embedding-model",
        "hashing",
    )
    options = ("--namespace", namespace, "--prefix", prefix)
    carol = closing(AMB("nats", NATS_URL, agent_id=f"carol-{tag}"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        proc, _ = await start(*args, *options, env={"AGENTOS_EMK_DSN": dsn})
        procs.append(proc)
        stored = await carol.request(f"{prefix}.store", {"content": "The VPN certificate expires in May."})
        returncode, log = await stop(proc, signal.SIGTERM)
        assert returncode == 0, log

        proc, _ = await start(*args, *options, env={"AGENTOS_EMK_DSN": dsn})
        procs.append(proc)
        got = await carol.request(f"{prefix}.get", {"id": stored["record"]["id"]})
        assert got["record"]["content"] == "The VPN certificate expires in May."
        returncode, log = await stop(proc, signal.SIGTERM)
        assert returncode == 0, log
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await carol.close()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")


async def test_serve_memory_with_identities_answers_only_verified_senders(
    tmp_path: Path, closing: Closing
) -> None:
    """The reproduced finding: mallory asked emk.query with sender_id="alice" and got alice's
    memories. With --identities, the service answers each signed request for its verified
    sender; a forged one is dead-lettered and never answered."""
    tag = uuid.uuid4().hex[:10]
    prefix, alice_id, mallory_id = f"emk_cli_{tag}", f"alice-{tag}", f"mallory-{tag}"
    keys = await service_identities(tmp_path / "keys", "memory-service", alice_id, mallory_id)
    proc, _ = await start(
        "memory",
        "--broker",
        NATS_URL,
        "--identities",
        str(tmp_path / "keys"),
        "--storage",
        "memory",
        "--embedding-model",
        "hashing",
        "--prefix",
        prefix,
        env={PASSPHRASE_ENV: PASSPHRASE},
    )
    alice = closing(AMB("nats", NATS_URL, agent_id=alice_id, middleware=[keys[alice_id].middleware()]))
    mallory = closing(AMB("nats", NATS_URL, agent_id=mallory_id, middleware=[keys[mallory_id].middleware()]))
    unsigned = closing(AMB("nats", NATS_URL, agent_id=mallory_id))
    dead = Collector()
    try:
        await unsigned.subscribe(f"_DLQ.{prefix}.>", dead)
        stored = await alice.request(f"{prefix}.store", {"content": "The vault code is 2468."}, timeout=10)
        assert stored["record"]["agent_id"] == alice_id
        assert (await mallory.request(f"{prefix}.query", {}, timeout=10))["records"] == []
        with pytest.raises(RemoteError, match="Unauthenticated"):  # unsigned, claiming alice: refused
            await unsigned.request(f"{prefix}.query", {}, sender_id=alice_id, timeout=10)
        forged = await keys[mallory_id].sign(mallory_id, {}, topic=f"{prefix}.query")
        forged = dataclasses.replace(forged, sender=alice_id)
        await unsigned.broker.publish(f"{prefix}.query", get_serializer("msgpack").encode(forged))
        await dead.wait_for(1)
        assert dead.metadata[0].headers[DLQ_REASON] == "unknown_key"  # mallory's key is not alice's
        mine = await alice.request(f"{prefix}.query", {}, timeout=10)
        assert [r["content"] for r in mine["records"]] == ["The vault code is 2468."]
        returncode, log = await stop(proc, signal.SIGTERM)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for client in (alice, mallory, unsigned):
            await client.close()
    assert returncode == 0, log
    assert "senders verified by IATP" in log


async def test_serve_memory_with_trust_bus_believes_the_claimed_sender() -> None:
    """What --trust-bus documents: the claimed sender is believed, so the broker must stop
    agents from publishing under another's name (here nothing does: the shared server)."""
    prefix = f"emk_cli_{uuid.uuid4().hex[:10]}"
    proc, _ = await start(
        "memory",
        "--broker",
        NATS_URL,
        "--trust-bus",
        "--storage",
        "memory",
        "--embedding-model",
        "hashing",
        "--prefix",
        prefix,
    )
    client = AMB("nats", NATS_URL, agent_id=f"someone-{prefix}")
    try:
        await client.request(f"{prefix}.store", {"content": "Stored as alice."}, sender_id=f"alice-{prefix}")
        answer = await client.request(f"{prefix}.query", {}, sender_id=f"alice-{prefix}", timeout=10)
        assert [r["content"] for r in answer["records"]] == ["Stored as alice."]
        returncode, log = await stop(proc, signal.SIGTERM)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()
    assert returncode == 0, log
    assert "senders taken from the trusted bus" in log


async def test_serve_verifier_with_identities_answers_a_signed_caller(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    subject, caller_id = f"cmvk_cli_{tag}.verify", f"caller-{tag}"
    keys = await service_identities(tmp_path / "keys", "verifier-service", caller_id)
    async with ScriptedLLMServer({"gpt": Reply(verdict("supported", 0.9))}) as llm:
        proc, _ = await start(
            "verifier",
            "--broker",
            NATS_URL,
            "--identities",
            str(tmp_path / "keys"),
            "--model",
            "gpt=openai/gpt",
            "--api-base",
            llm.url,
            "--subject",
            subject,
            "--queue",
            f"cmvk_cli_{tag}",
            env={"AGENTOS_LLM_API_KEY": "test-key", PASSPHRASE_ENV: PASSPHRASE},
        )
        caller = AMB("nats", NATS_URL, agent_id=caller_id, middleware=[keys[caller_id].middleware()])
        unsigned = AMB("nats", NATS_URL, agent_id=caller_id)
        try:
            reply = await request_verification(caller, "What is 6 x 7?", "42", subject=subject, timeout=20)
            assert reply["verified"] is True
            with pytest.raises(VerifierRefused):
                await request_verification(unsigned, "What is 6 x 7?", "42", subject=subject, timeout=10)
            returncode, log = await stop(proc, signal.SIGTERM)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await caller.close()
            await unsigned.close()
    assert returncode == 0, log
    assert len(llm.requests) == 1  # the unsigned request never reached the model
