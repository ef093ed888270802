"""A real Prometheus scrapes the three services (control plane, memory, verifier) running as
processes on NATS: after some traffic, every metric they define has a series in it
(``test_dashboards.py`` checks the shipped configuration, rules and dashboards)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from pathlib import Path

import nats
import pytest

from agent_os.amb import AMB
from agent_os.amb.metrics import BUS_COUNTERS
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.services.control_plane_service._metrics import SERVICE_COUNTERS
from agent_os.services.tool_service import ToolStats
from agent_os.services.verifier_service import request_verification
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.dashboards import metric_names, queries
from tests.support.nats_private import private_nats
from tests.support.processes import TOKEN, get, metrics_url, start, stop
from tests.support.prometheus import prometheus, query, wait_targets_up
from tests.support.servers import NATS_URL

ROOT = Path(__file__).resolve().parents[2]

BUS = [f"{name}_total" for _, name, _ in BUS_COUNTERS] + [
    *(f"agentos_bus_handler_duration_seconds_{part}" for part in ("bucket", "sum", "count")),
    "agentos_bus_published_by_pattern_total",
    "agentos_bus_handled_by_pattern_total",
    "agentos_bus_dead_letters_total",
    "agentos_bus_connected",
]
CONTROL_PLANE = [
    *(f"agentos_control_plane_{name}_total" for name, _ in SERVICE_COUNTERS),
    "agentos_control_plane_held_total",
    "agentos_control_plane_held_dropped_total",
    "agentos_control_plane_release_failures_total",
    "agentos_control_plane_unverified_total",
    "agentos_control_plane_unmatched_replies_total",
    "agentos_control_plane_rate_limit_store_failures_total",
    "agentos_control_plane_actions_forwarded_total",
    "agentos_control_plane_actions_denied_total",
    "agentos_control_plane_action_outcomes_total",
    "agentos_control_plane_action_failures_total",
    "agentos_control_plane_pending_requests",
    "agentos_agents",
    "agentos_agent_actions",
    "agentos_agent_violations",
    "agentos_agent_decisions_total",
    "agentos_hold_queue_depth",
    "agentos_policy_decisions_total",
    "agentos_recorder_records_appended_total",
    "agentos_recorder_records_written_total",
    "agentos_recorder_records_pending",
    "agentos_recorder_lag_seconds",
    "agentos_admin_unauthorized_total",
    "agentos_admin_bad_requests_total",
    "agentos_admin_errors_total",
]
TOOLS = [f"agentos_tool_{name}_total" for name in ToolStats().as_dict()]
MEMORY = [
    "agentos_emk_requests_total",
    *(f"agentos_emk_request_duration_seconds_{part}" for part in ("bucket", "sum", "count")),
]
VERIFIER = [
    "agentos_cmvk_requests_total",
    "agentos_cmvk_model_verdicts_total",
    "agentos_cmvk_abstentions_total",
    "agentos_cmvk_cost_usd_total",
    *(f"agentos_cmvk_verification_duration_seconds_{part}" for part in ("bucket", "sum", "count")),
    *(f"agentos_cmvk_model_call_duration_seconds_{part}" for part in ("bucket", "sum", "count")),
]
EVERY_JOB = ["process_cpu_seconds_total", "up"]
# Series this scenario does not make (no signal, no IATP, no verification of the chain, no
# request from a service): the dashboards' test and the unit tests check them.
TASKS = [  # agent_os.control_plane.tasks.TaskMetrics (tests/unit/test_tasks_ledger.py collects them)
    "agentos_tasks_dispatched_total",
    "agentos_tasks_completed_total",
    "agentos_tasks_ignored_statuses_total",
    "agentos_tasks_open",
    "agentos_task_worker_runs_total",
    "agentos_task_worker_rejected_total",
    "agentos_task_worker_skipped_total",
]
ELSEWHERE = [
    "agentos_bus_request_duration_seconds",
    "agentos_signals_total",
    "agentos_recorder_chain_valid",
    "agentos_recorder_chain_verified_timestamp_seconds",
    "agentos_recorder_checkpoints_total",  # a SQLite recorder's (tests/unit/test_metrics_collectors.py)
    "agentos_recorder_checkpoint_failures_total",
    "agentos_iatp_signed_total",
    "agentos_iatp_verified_total",
    "agentos_iatp_accepted_unsigned_total",
    "agentos_iatp_verification_failures_total",
]


def target(url: str) -> str:
    return url.removeprefix("http://")


@pytest.mark.nats
async def test_prometheus_scrapes_every_metric_of_the_three_services(
    tmp_path: Path, closing: Closing
) -> None:
    tag = uuid.uuid4().hex[:10]
    ingress, delivery, emk, subject = f"in_{tag}", f"out_{tag}", f"mem_{tag}", f"cmvk_{tag}.verify"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: metrics\ndefault_action: deny\nrules:\n"
        "  - {action: deny, operation: publish, resource: 'tasks.secret'}\n"
        "  - {action: allow, operation: publish, resource: 'tasks.*'}\n"
        "  - {action: allow, operation: deliver, resource: 'tasks.*'}\n"
    )
    scripts = {
        "a": Reply(verdict("supported")),
        "b": Reply(verdict("supported")),
        "c": Reply("no verdict here"),
    }
    procs: list[asyncio.subprocess.Process] = []
    agent = closing(AMB("nats", NATS_URL, agent_id=f"agent-{tag}"))
    receiver = closing(AMB("nats", NATS_URL, agent_id=f"receiver-{tag}"))
    raw = await nats.connect(NATS_URL)
    try:
        async with ScriptedLLMServer(scripts) as llm:
            cp, cp_ready = await start(
                "control-plane",
                *(
                    "--broker",
                    NATS_URL,
                    "--trust-bus",
                    "--agents",
                    f"receiver-{tag}",
                    "--policy",
                    str(policy),
                ),
                *("--recorder", "memory", "--admin-port", "0", "--ingress-prefix", ingress),
                *("--delivery-prefix", delivery, "--reply-prefix", f"re_{tag}", "--queue", f"cp_{tag}"),
                *("--agent-id", f"cp-{tag}"),
                env={"AGENTOS_ADMIN_TOKEN": TOKEN},
            )
            procs.append(cp)
            memory, memory_ready = await start(
                "memory",
                *("--broker", NATS_URL, "--trust-bus", "--storage", "memory", "--embedding-model", "hashing"),
                *("--prefix", emk, "--agent-id", f"memory-{tag}"),
            )
            procs.append(memory)
            verifier, verifier_ready = await start(
                "verifier",
                *("--broker", NATS_URL, "--trust-bus", "--api-base", llm.url, "--api-key", "k"),
                *("--model", "a=openai/a", "--model", "b=openai/b", "--model", "c=openai/c"),
                *("--subject", subject, "--queue", f"cmvk_{tag}", "--agent-id", f"verifier-{tag}"),
            )
            procs.append(verifier)

            # traffic: forwarded and denied messages, memory requests, a malformed message
            # (dead-lettered), a verification with one model abstaining
            got = Collector()
            await receiver.subscribe(f"{delivery}.receiver-{tag}.tasks.>", got)
            await agent.connect()
            for i in range(3):
                await agent.publish(f"{ingress}.tasks.work", i)
            await agent.publish(f"{ingress}.tasks.secret", "denied")
            await got.wait_for(3, timeout=10)
            stored = await agent.request(f"{emk}.store", {"content": "Metrics are scraped."}, timeout=10)
            assert stored["ok"] is True
            found = await agent.request(f"{emk}.search", {"query": "scraped"}, timeout=10)
            assert found["ok"] is True
            await raw.publish(f"{emk}.store", b"\xc1 not an envelope")
            await raw.flush()
            reply = await request_verification(agent, "What is 6 x 7?", "42", subject=subject, timeout=20)
            assert reply["verified"] is True

            jobs = {
                "control-plane": [target(metrics_url(cp_ready))],
                "memory": [target(metrics_url(memory_ready))],
                "verifier": [target(metrics_url(verifier_ready))],
            }
            async with prometheus(jobs, tmp_path) as url:
                await wait_targets_up(url, 3)
                wanted = {
                    **{f'{m}{{job="control-plane"}}': m for m in (*CONTROL_PLANE, *BUS, *EVERY_JOB)},
                    **{f'{m}{{job="memory"}}': m for m in (*MEMORY, *BUS, *EVERY_JOB)},
                    # (the verifier dead-letters nothing here)
                    **{f'{m}{{job="verifier"}}': m for m in (*VERIFIER, *BUS[:-2], BUS[-1], *EVERY_JOB)},
                }
                missing = await missing_series(url, list(wanted))
                assert missing == [], f"no series for {missing}"
                dead = await query(url, f'agentos_bus_dead_letters_total{{agent="memory-{tag}"}}')
                assert [(s["metric"]["reason"], s["value"][1]) for s in dead] == [("malformed", "1")]
                abstained = await query(url, 'agentos_cmvk_abstentions_total{job="verifier"}')
                assert [(s["metric"]["model"], s["metric"]["kind"]) for s in abstained] == [
                    ("c", "parse_error")
                ]
                ok = await query(url, 'agentos_emk_requests_total{job="memory",outcome="ok"}')
                assert sorted(s["metric"]["operation"] for s in ok) == ["search", "store"]
    finally:
        for proc in procs:
            if proc.returncode is None:
                await stop(proc, signal.SIGTERM)
        await raw.close()


def test_every_metric_is_documented() -> None:
    """docs/observability.md names every metric the services define, and no other."""
    page = (ROOT / "docs/observability.md").read_text()
    names = {
        m.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for m in (*BUS, *CONTROL_PLANE, *TOOLS, *MEMORY, *VERIFIER, *TASKS, *ELSEWHERE)
    }
    documented = set(re.findall(r"`(agentos_[a-z_]+)", page))
    assert names - documented == set()
    assert documented - names == set()
    on_dashboards = {name for q in queries() for name in metric_names(q.expr)}
    assert on_dashboards <= names


async def missing_series(url: str, queries: list[str], timeout: float = 30) -> list[str]:
    """The queries that still return no series after ``timeout`` seconds of scrapes."""
    deadline = time.monotonic() + timeout
    left = queries
    while True:
        left = [q for q in left if not await query(url, q)]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


async def test_healthz_follows_the_broker_connection(tmp_path: Path) -> None:
    """The memory and verifier services' /healthz: 200 while their broker connection is up,
    503 once their (private) nats-server is gone; the metrics port stays up to say so."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with private_nats("", tmp_path) as port:
            broker = f"nats://127.0.0.1:{port}"
            memory, memory_ready = await start(
                "memory",
                "--broker",
                broker,
                "--trust-bus",
                "--storage",
                "memory",
                "--embedding-model",
                "hashing",
            )
            procs.append(memory)
            verifier, verifier_ready = await start(
                "verifier", "--broker", broker, "--trust-bus", "--model", "a=openai/a", "--api-key", "k"
            )
            procs.append(verifier)
            health = [metrics_url(memory_ready) + "/healthz", metrics_url(verifier_ready) + "/healthz"]
            assert [(await get(url, token=None))[0] for url in health] == [200, 200]

        async def all_down() -> bool:
            return [(await get(url, token=None))[0] for url in health] == [503, 503]

        await wait_until(all_down, 15, what="/healthz 503 on both services")
        assert (await get(metrics_url(memory_ready) + "/metrics", token=None))[0] == 200
    finally:
        for proc in procs:
            if proc.returncode is None:
                await stop(proc, signal.SIGTERM)
