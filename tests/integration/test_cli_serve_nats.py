"""``agent-os serve memory|verifier`` as processes on the shared NATS server: they answer over
the bus, finish what is in flight on SIGTERM/SIGINT, and exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest

from amb import AMB, RemoteError
from cmvk.testing import Reply, ScriptedLLMServer, verdict
from services.verifier_service import request_verification
from tests.support import wait_until
from tests.unit.test_cli import start, stop

pytestmark = pytest.mark.nats

NATS = "nats://127.0.0.1:4222"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_memory_answers_and_stops_cleanly(sig: signal.Signals) -> None:
    prefix = f"emk_cli_{uuid.uuid4().hex[:10]}"
    proc, ready = await start(
        "memory", "--broker", NATS, "--storage", "memory", "--embedding-model", "hashing", "--prefix", prefix
    )
    assert ready == f"ready memory subjects={prefix}.* broker={NATS}"
    alice = AMB("nats", NATS, agent_id=f"alice-{prefix}")
    bob = AMB("nats", NATS, agent_id=f"bob-{prefix}")
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
            NATS,
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
        assert ready == f"ready verifier subject={subject} broker={NATS}"
        caller = AMB("nats", NATS, agent_id=f"caller-{tag}")
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


async def test_serve_memory_on_postgresql_keeps_memories_across_restarts() -> None:
    import psycopg

    dsn = os.environ.get("EMK_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    tag = uuid.uuid4().hex[:10]
    prefix, namespace = f"emk_cli_{tag}", f"emk_cli_{tag}"
    args = ("memory", "--broker", NATS, "--storage", "postgresql", "--embedding-model", "hashing")
    options = ("--namespace", namespace, "--prefix", prefix)
    carol = AMB("nats", NATS, agent_id=f"carol-{tag}")
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
