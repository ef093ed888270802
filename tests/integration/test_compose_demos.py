"""The compose demos (deploy/demos), run natively from their compose files: every Agent OS
service's command, environment and health check as ``docker compose up`` would run them
(tests/support/compose.py), against the local servers, each demo to its documented end.

NATS is a private nats-server of each test (the demos use the default subjects and queue groups,
which other tests' services on the shared server also use); Redis and PostgreSQL are the shared
ones (the memory schema is the test's own); Jaeger is a small OTLP/HTTP sink of the test.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.compose import native_stack
from tests.support.nats_private import private_nats
from tests.support.processes import get
from tests.support.servers import PG_DSN, REDIS_URL

pytestmark = [pytest.mark.nats, pytest.mark.redis, pytest.mark.timeout(300)]

DEMOS = Path(__file__).resolve().parents[2] / "deploy" / "demos"
NOT_RUNNING = {"AGENTOS_DEMO_KEEP_RUNNING": "false"}


def _netloc(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP endpoint standing for Jaeger: takes ``POST /v1/traces``, keeps the bodies."""
    received: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"127.0.0.1:{runner.addresses[0][1]}", received
    finally:
        await runner.cleanup()


async def test_the_fleet_demo_runs_to_its_end(tmp_path: Path) -> None:
    """100 agents through two control-plane instances: every round's results come back, the
    rogue is denied, stopped, held, denied again, killed and its last message dropped; both
    instances decided messages and stay healthy; every service stops cleanly on SIGTERM."""
    async with (
        private_nats("", tmp_path) as nats_port,
        otlp_sink() as (jaeger, _),
        native_stack(
            DEMOS / "fleet" / "compose.yaml",
            {"nats": f"127.0.0.1:{nats_port}", "redis": _netloc(REDIS_URL), "jaeger": jaeger},
            tmp_path / "stack",
            NOT_RUNNING,
        ) as stack,
    ):
        result = await stack.run("fleet", timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "done: 4 rounds, 392 results from 98 workers" in out
        assert (
            "rogue: denied: policy_denied (PolicyViolationError: publish on 'secrets.exfiltrate' denied: "
            "secrets never travel on the bus) -> stopped by SIGSTOP -> system.shutdown held -> "
            "denied: policy_denied (PolicyViolationError: publish on 'system.shutdown' denied: only an "
            "operator shuts the fleet down) -> killed by SIGKILL -> dropped: agent_killed"
        ) in out
        shares = out.split("decisions per control-plane instance (the queue group shares the load): ")[1]
        counts = [int(part.rsplit(": ", 1)[1]) for part in shares.strip().split(", ")]
        assert len(counts) == 2
        assert all(n > 0 for n in counts), shares
        for instance in ("control-plane-1", "control-plane-2"):
            assert await get(f"http://{stack.endpoint(instance, 9464)}/healthz", token=None) == (200, "ok\n")
            status, body = await get(
                f"http://{stack.endpoint(instance, 8787)}/agents/rogue", token="demo-admin-token-change-me"
            )
            assert (status, json.loads(body)["state"]) == (200, "terminated")
    assert {name: code for name, (code, _) in stack.stopped.items()} == {
        "control-plane-1": 0,
        "control-plane-2": 0,
    }


async def test_the_auditor_demo_runs_to_its_end(tmp_path: Path) -> None:
    """Eight claims, each checked by the three deterministic models through the verifier
    service and remembered by the memory service in PostgreSQL with pgvector, then recalled by
    meaning; the services stay healthy and stop cleanly."""
    import psycopg

    namespace = f"auditor_{uuid.uuid4().hex[:10]}"
    env = {**NOT_RUNNING, "AUDITOR_MEMORY_NAMESPACE": namespace}
    try:
        async with (
            private_nats("", tmp_path) as nats_port,
            otlp_sink() as (jaeger, _),
            native_stack(
                DEMOS / "auditor" / "compose.yaml",
                {"nats": f"127.0.0.1:{nats_port}", "postgres": PG_DSN, "jaeger": jaeger},
                tmp_path / "stack",
                env,
            ) as stack,
        ):
            result = await stack.run("auditor", timeout=240)
            assert result.returncode == 0, result.stdout + result.stderr
            lines = result.stdout.splitlines()
            verdicts = [line.split(" ", 3)[2] for line in lines if " -> memory " in line]
            assert verdicts == ["VERIFIED", "VERIFIED", "NOT", "VERIFIED", "NOT", "NOT", "NOT", "NOT"]
            assert "done: 8 claims audited by 3 models, 3 verified and 5 not, all remembered" in lines
            assert (
                "  'the capital of Australia': Claim: What is the capital of Australia? Sydney. "
                "Panel: not verified, unanimous, confidence 0.95."
            ) in lines
            for service, port in (("memory", 9465), ("verifier", 9466)):
                assert await get(f"http://{stack.endpoint(service, port)}/healthz", token=None) == (
                    200,
                    "ok\n",
                )
        assert {name: code for name, (code, _) in stack.stopped.items()} == {
            "models": 0,
            "memory": 0,
            "verifier": 0,
        }
        async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
            cursor = await conn.execute(f"SELECT count(*) FROM {namespace}.memories")
            row = await cursor.fetchone()
            assert row == (8,)
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")
