"""The compose demos (deploy/demos), run natively from their compose files: every Agent OS
service's command, environment and health check as ``docker compose up`` would run them
(tests/support/compose.py), against the local servers, each demo to its documented end.

NATS is a private nats-server of each test (the demos use the default subjects and queue groups,
which other tests' services on the shared server also use); Redis and PostgreSQL are the shared
ones (the memory schema is the test's own). Jaeger is an OTLP/HTTP receiver of the test that
decodes the ``ExportTraceServiceRequest`` messages (tests/support/tracing.py): a fleet round is
one trace across three agents or more and the control plane, an audited claim one trace through
the verifier and memory services. Prometheus is a real one (tests/support/prometheus.py) run
with the demo's own ``prometheus.yml``, its targets pointed at the native services (the compose
runner's ports), scraping while the demo runs: every target is up, and every panel query of the
shipped dashboards returns data but those about services the demo does not run, listed with the
reason in :data:`NO_DATA` (tests/integration/test_dashboards.py has data for every panel).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.support.compose import NativeStack, native_stack
from tests.support.dashboards import queries, without_data
from tests.support.nats_private import private_nats
from tests.support.processes import get
from tests.support.prometheus import prometheus, query, wait_targets_up
from tests.support.servers import PG_DSN, REDIS_URL
from tests.support.tracing import OtlpReceiver, Spans

pytestmark = [pytest.mark.nats, pytest.mark.redis, pytest.mark.timeout(300)]

DEMOS = Path(__file__).resolve().parents[2] / "deploy" / "demos"
NOT_RUNNING = {"AGENTOS_DEMO_KEEP_RUNNING": "false"}
TOKEN = "demo-admin-token-change-me"  # the fleet compose file's default


def _netloc(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]


def _excused(reason: str, dashboard: str, *titles: str) -> dict[tuple[str, str], str]:
    """``reason`` for the panels ``titles`` of ``dashboard`` (none given: all of its panels)."""
    found = {q.panel for q in queries() if q.dashboard == dashboard}
    unknown = set(titles) - found
    assert not unknown, f"{dashboard} has no panels {sorted(unknown)}"
    return {(dashboard, title): reason for title in titles or found}


_NO_CONTROL_PLANE = "the auditor demo runs no control-plane service"
_SIGNED = "every message of the demo is signed by its sender: no verification fails"
_TRUST_FAILURES = (
    "Verification failures /s",
    "Failure ratio",
    "Verification failures by reason /s",
    "Failures by service and reason over the range",
)
NO_DATA: dict[str, dict[tuple[str, str], str]] = {
    "fleet": {
        **_excused("the fleet demo runs no memory or verifier service", "memory-verification.json"),
        **_excused("the fleet demo runs no tool service", "services.json", "Tool service /s"),
        **_excused(_SIGNED, "trust.json", *_TRUST_FAILURES),
    },
    "auditor": {
        **_excused(
            _NO_CONTROL_PLANE,
            "fleet.json",
            *("Agents by state", "Allowed per agent /s", "Denied per agent /s", "Decisions /s"),
            *("Decisions by action /s", "Decisions by rule over the range", "Denials /s"),
            *("Denials by rule /s", "Held messages", "Hold queue per agent", "Signals /s"),
        ),
        **_excused(
            _NO_CONTROL_PLANE,
            "services.json",
            *("Actions /s", "Admin API refusals /s", "Chain", "Failures /s", "Forwarded /s"),
            *("Held and dropped /s", "Pending requests", "Records /s", "Since the last verification"),
            "Write lag",
        ),
        **_excused(_NO_CONTROL_PLANE, "trust.json", "Unverified senders refused /s"),
        **_excused("the auditor demo runs no tool service", "services.json", "Tool service /s"),
        **_excused(
            "the auditor sends well-formed requests only: nothing is dead-lettered",
            "fleet.json",
            *("Dead letters /s", "Dead letters by reason /s"),
        ),
        **_excused(
            "the demo's deterministic models always give a verdict",
            "memory-verification.json",
            *("Abstention ratio", "Abstentions by kind /s"),
        ),
        **_excused(
            "the memory service serves every request of the demo",
            "memory-verification.json",
            "Memory errors /s",
        ),
        **_excused(_SIGNED, "trust.json", *_TRUST_FAILURES),
    },
}
"""Per demo, the panels (dashboard file, title) that cannot have data in it, and why. The test
fails when one of them has data after all, so the list stays true; every one of them has data
in tests/integration/test_dashboards.py."""


async def check_prometheus(url: str, demo: str, stack: NativeStack) -> None:
    """Every target of the demo's Prometheus is up; every panel query returns a series but
    those of :data:`NO_DATA`, which return none."""
    targets = stack.prometheus_config()["scrape_configs"][0]["static_configs"]
    count = sum(len(entry["targets"]) for entry in targets)
    up = await wait_targets_up(url, count)
    assert len(up) == count
    assert {t["labels"]["job"] for t in up} == {"agent-os"}
    excused = NO_DATA[demo]
    missing = await without_data(url, [q for q in queries() if (q.dashboard, q.panel) not in excused])
    assert not missing, "no series for:\n" + "\n".join(map(str, missing))
    for q in queries():
        if (q.dashboard, q.panel) in excused:
            assert not await query(url, q.promql), f"{q} has data: take it out of NO_DATA[{demo!r}]"


def traces(spans: Spans, root: str) -> list[Spans]:
    """Every trace whose root span is named ``root``."""
    return [spans.trace(s.trace_id) for s in spans.all if s.name == root and s.parent_id is None]


async def test_the_fleet_demo_runs_to_its_end(tmp_path: Path) -> None:
    """100 agents through two control-plane instances: every round's results come back, the
    rogue is denied, stopped, held, denied again, killed and its last message dropped; both
    instances decided messages and stay healthy; every service stops cleanly on SIGTERM. The
    demo's Prometheus has its targets up and data for the dashboards; a round is one trace."""
    (tmp_path / "prometheus").mkdir()
    async with (
        private_nats("", tmp_path) as nats_port,
        OtlpReceiver() as jaeger,
        native_stack(
            DEMOS / "fleet" / "compose.yaml",
            {
                "nats": f"127.0.0.1:{nats_port}",
                "redis": _netloc(REDIS_URL),
                "jaeger": f"127.0.0.1:{jaeger.port}",
            },
            tmp_path / "stack",
            NOT_RUNNING,
        ) as stack,
        prometheus({}, tmp_path / "prometheus", config=stack.prometheus_config()) as url,
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
            status, body = await get(f"http://{stack.endpoint(instance, 8787)}/agents/rogue", token=TOKEN)
            assert (status, json.loads(body)["state"]) == (200, "terminated")
            # the demo verifies the chains every minute; an operator asks now (Chain panels)
            status, body = await get(f"http://{stack.endpoint(instance, 8787)}/verify", token=TOKEN)
            assert (status, json.loads(body)["ok"]) == (200, True)
        await check_prometheus(url, "fleet", stack)
    assert {name: code for name, (code, _) in stack.stopped.items()} == {
        "control-plane-1": 0,
        "control-plane-2": 0,
    }
    # stopped, each process has exported its last spans: a round is one trace from the
    # coordinator through both instances to the workers and back
    rounds = traces(jaeger.spans, "fleet round 1")
    assert len(rounds) == 1
    trace = rounds[0]
    agents = {s.attributes.get("messaging.client.id") for s in trace.all if s.service == "fleet"} - {None}
    assert len(agents) >= 3, agents
    assert "coordinator" in agents
    in_cp = [s for s in trace.all if s.service == "control-plane"]
    assert {s.name.split(" ")[0] for s in in_cp} >= {"iatp.verify", "policy"}, sorted({s.name for s in in_cp})


async def test_the_auditor_demo_runs_to_its_end(tmp_path: Path) -> None:
    """Eight claims, each checked by the three deterministic models through the verifier
    service and remembered by the memory service in PostgreSQL with pgvector, then recalled by
    meaning; the services stay healthy and stop cleanly. The demo's Prometheus has its targets
    up and data for the dashboards; each claim is one trace through both services."""
    import psycopg

    (tmp_path / "prometheus").mkdir()
    namespace = f"auditor_{uuid.uuid4().hex[:10]}"
    env = {**NOT_RUNNING, "AUDITOR_MEMORY_NAMESPACE": namespace}
    try:
        async with (
            private_nats("", tmp_path) as nats_port,
            OtlpReceiver() as jaeger,
            native_stack(
                DEMOS / "auditor" / "compose.yaml",
                {"nats": f"127.0.0.1:{nats_port}", "postgres": PG_DSN, "jaeger": f"127.0.0.1:{jaeger.port}"},
                tmp_path / "stack",
                env,
            ) as stack,
            prometheus({}, tmp_path / "prometheus", config=stack.prometheus_config()) as url,
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
            await check_prometheus(url, "auditor", stack)
        assert {name: code for name, (code, _) in stack.stopped.items()} == {
            "models": 0,
            "memory": 0,
            "verifier": 0,
        }
        # an audited claim is one trace: the auditor's request, the verifier's panel, the store
        claims = traces(jaeger.spans, "audit claim")
        assert len(claims) == 8
        for trace in claims:
            assert {s.service for s in trace.all} == {"auditor", "verifier", "memory"}
            assert {"cmvk.verify", "emk.store"} <= set(trace.names())
        async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
            cursor = await conn.execute(f"SELECT count(*) FROM {namespace}.memories")
            row = await cursor.fetchone()
            assert row == (8,)
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")
