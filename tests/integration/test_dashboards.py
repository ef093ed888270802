"""The shipped dashboards, alerts and Prometheus configuration against the real thing.

A fleet runs on a private nats-server: the control-plane, tool, memory and verifier services
as processes (IATP identities for the control plane and the tool service), two signed agents
and a forger. They read and write files, ask each other, are denied, stopped and continued,
store and search memories and have an answer verified by a panel of three models. A real
Prometheus then scrapes the services with the shipped configuration (its targets pointed at
them, its rules loaded), and every PromQL expression of every panel of every shipped
dashboard, and every dashboard variable, must return a series through its HTTP API. And
``promtool`` checks the shipped configuration and rules, and tests that the alerts fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from agent_os.amb import AMB, Metadata
from agent_os.amb.errors import RemoteError
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.control_plane import ActionRequest
from agent_os.iatp import IATP
from agent_os.services._identity import PASSPHRASE_ENV
from agent_os.services.control_plane_service import (
    ReplyViaService,
    agent_inbox,
    delivery_subject,
    ingress_subject,
)
from agent_os.services.tool_service import ToolClient
from agent_os.services.verifier_service import request_verification
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.dashboards import (
    PROMETHEUS_CONFIG,
    RULES,
    queries,
    rule_groups,
    shipped_config,
    variable_queries,
    without_data,
)
from tests.support.identities import PASSPHRASE, process_identities
from tests.support.nats_private import private_nats
from tests.support.processes import TOKEN, get, metrics_url, start, stop
from tests.support.prometheus import api, prometheus, promtool, query, wait_targets_up

AGENTS = ("alice", "bob")
DEMO_CONFIGS = sorted(PROMETHEUS_CONFIG.parents[1].glob("demos/*/prometheus.yml"))  # the demo stacks'


def test_promtool_passes_the_shipped_configuration_and_rules() -> None:
    tool = promtool()
    for args in (
        ["check", "config", str(PROMETHEUS_CONFIG), *map(str, DEMO_CONFIGS)],
        ["check", "rules", *map(str, RULES.glob("*.yml"))],
    ):
        done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


def alert(name: str, labels: dict[str, str], at: str) -> dict[str, Any]:
    """An ``alert_rule_test`` entry expecting ``name`` to fire at ``at`` with ``labels``, its
    annotations expanded from the shipped rule."""
    rule = next(r for g in rule_groups() for r in g["rules"] if r.get("alert") == name)

    def expand(text: str) -> str:
        for key, value in labels.items():
            text = text.replace(f"{{{{ $labels.{key} }}}}", value)
        return text

    expected = {**labels, **rule.get("labels", {})}
    annotations = {k: expand(v) for k, v in rule.get("annotations", {}).items()}
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": expected, "exp_annotations": annotations}],
    }


def test_the_shipped_alerts_fire_on_their_conditions(tmp_path: Path) -> None:
    """``promtool test rules``: each alert fires when its condition has held long enough, and
    not before."""
    where = {"job": "agent-os", "instance": "10.0.0.1:9464", "service": "control-plane"}
    series = "{" + ",".join(f'{k}="{v}"' for k, v in where.items())
    dead_letters = "agentos_bus_dead_letters_total"
    summed = {"job": "agent-os", "service": "control-plane"}  # dead letters: over every instance
    tests = {
        "rule_files": [str(path) for path in sorted(RULES.glob("*.yml"))],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": "up" + series + "}", "values": "1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0"},
                    {"series": "agentos_bus_connected" + series + ',agent="cp"}', "values": "1 0 0 0 0"},
                    {"series": dead_letters + series + ',agent="cp",reason="unsigned"}', "values": "0+60x30"},
                    {"series": "agentos_recorder_chain_valid" + series + "}", "values": "1 1 0 0"},
                    {"series": "agentos_recorder_lag_seconds" + series + "}", "values": "0 0 120x12"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "AgentOSServiceDown", "exp_alerts": []},
                    alert("AgentOSServiceDown", where, "5m"),
                    alert("AgentOSBrokerDisconnected", where, "3m"),
                    {"eval_time": "10m", "alertname": "AgentOSDeadLettersRising", "exp_alerts": []},
                    alert("AgentOSDeadLettersRising", {**summed, "reason": "unsigned"}, "20m"),
                    {"eval_time": "1m", "alertname": "AgentOSFlightRecorderChainBroken", "exp_alerts": []},
                    alert("AgentOSFlightRecorderChainBroken", where, "2m"),
                    {"eval_time": "5m", "alertname": "AgentOSFlightRecorderLagging", "exp_alerts": []},
                    alert("AgentOSFlightRecorderLagging", where, "9m"),
                ],
            }
        ],
    }
    path = tmp_path / "alerts.test.yml"
    path.write_text(json.dumps(tests, indent=2))
    done = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


POLICY = """name: fleet
default_action: deny
rules:
  - {{name: workspace-read, action: allow, operation: read, resource: '{ws}/*'}}
  - {{name: no-secrets, action: deny, operation: publish, resource: 'tasks.secret'}}
  - {{name: tasks, action: allow, operation: publish, resource: 'tasks.*'}}
  - {{name: ask, action: allow, operation: request, resource: 'ask.*'}}
  - {{name: deliver-tasks, action: allow, operation: deliver, resource: 'tasks.*'}}
  - {{name: deliver-asks, action: allow, operation: deliver, resource: 'ask.*'}}
  - {{name: replies, action: allow, operation: reply, resource: 'ask.*'}}
"""


async def signal_agent(admin: str, agent: str, name: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{admin}/agents/{agent}/signal",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"signal": name},
        ) as resp,
    ):
        assert (resp.status, (await resp.json())["ok"]) == (200, True)


async def services(
    broker: str, root: Path, workspace: Path, llm: str, procs: list[Any]
) -> tuple[dict[str, str], str, list[Any]]:
    """Start the four services (each added to ``procs`` as it starts); return their metrics
    targets by service, the admin URL and the processes."""
    policy = root / "policy.yaml"
    policy.write_text(POLICY.format(ws=workspace))
    env = {PASSPHRASE_ENV: PASSPHRASE, "AGENTOS_ADMIN_TOKEN": TOKEN}
    targets = {}
    cp, ready = await start(
        "control-plane",
        *("--broker", broker, "--identities", str(root / "keys" / "control-plane"), "--policy", str(policy)),
        *(
            "--recorder",
            f"sqlite:{root / 'audit.db'}",
            "--workspace",
            str(workspace),
            "--agents",
            ",".join(AGENTS),
        ),
        *("--admin-port", "0", "--verify-interval", "1"),
        env=env,
    )
    procs.append(cp)
    targets["control-plane"] = metrics_url(ready)
    admin = ready.split()[1].removeprefix("admin=")
    tools, ready = await start(
        "tools",
        *("--broker", broker, "--identities", str(root / "keys" / "tools"), "--workspace", str(workspace)),
        env=env,
    )
    procs.append(tools)
    targets["tool"] = metrics_url(ready)
    memory, ready = await start(
        "memory", "--broker", broker, "--trust-bus", "--storage", "memory", "--embedding-model", "hashing"
    )
    procs.append(memory)
    targets["memory"] = metrics_url(ready)
    verifier, ready = await start(
        "verifier",
        *("--broker", broker, "--trust-bus", "--api-base", llm, "--api-key", "k"),
        *("--model", "a=openai/a", "--model", "b=openai/b", "--model", "c=openai/c"),
    )
    procs.append(verifier)
    targets["verifier"] = metrics_url(ready)
    return {s: url.removeprefix("http://") for s, url in targets.items()}, admin, procs


async def scenario(
    broker: str, admin: str, workspace: Path, stores: dict[str, IATP], closing: Closing
) -> None:
    """Traffic that gives every panel something to show (see the module docstring)."""

    def agent(name: str) -> AMB:
        return closing(
            AMB(
                "nats",
                broker,
                agent_id=name,
                inbox_prefix=agent_inbox(name),
                middleware=[stores[name].middleware(), ReplyViaService()],
            )
        )

    alice, bob = agent("alice"), agent("bob")
    forger = closing(AMB("nats", broker, agent_id="mallory"))  # signs nothing, claims to be alice
    auditor = closing(AMB("nats", broker, agent_id="auditor"))  # the memory and verifier take it at its word

    async def answer(message: Any, metadata: Metadata) -> None:
        await bob.reply(metadata, f"{message}: 42")

    tasks = Collector()
    await bob.subscribe(delivery_subject("ask.>", agent="bob"), answer)
    await bob.subscribe(delivery_subject("tasks.>", agent="bob"), tasks)
    await alice.connect()
    (workspace / "notes.txt").write_text("ask bob")
    tools = ToolClient(alice, timeout=10)
    assert (await tools.submit(ActionRequest("fs.read", "notes.txt"))).ok
    assert not (await tools.submit(ActionRequest("fs.write", "/etc/passwd", {"content": "x"}))).allowed
    said = await alice.request(ingress_subject("ask.bob"), "6 x 7", recipient="bob", timeout=10)
    assert said == "6 x 7: 42"
    for i in range(3):
        await alice.publish(ingress_subject("tasks.work"), i, recipient="bob")
    await alice.publish(ingress_subject("tasks.secret"), "denied by rule no-secrets", recipient="bob")
    await forger.publish(ingress_subject("tasks.work"), "unsigned", sender_id="alice", recipient="bob")
    await tasks.wait_for(3)
    # alice stopped: her next message waits in her hold queue until SIGCONT
    await signal_agent(admin, "alice", "SIGSTOP")
    await alice.publish(ingress_subject("tasks.work"), "held", recipient="bob")

    async def held() -> bool:
        _, body = await get(f"{admin}/metrics")
        return 'agentos_hold_queue_depth{agent="alice"} 1.0' in body

    await wait_until(held, 10, what="alice's message held")
    await signal_agent(admin, "alice", "SIGCONT")
    await tasks.wait_for(4)
    # memory and verification, with a refused request, a malformed message and an abstention
    assert (await auditor.request("emk.store", {"content": "Dashboards are tested."}, timeout=10))["ok"]
    assert (await auditor.request("emk.search", {"query": "tested"}, timeout=10))["ok"]
    with pytest.raises(RemoteError, match="BadRequest"):
        await auditor.request("emk.store", {"nothing": "here"}, timeout=10)
    raw = await nats.connect(broker)
    try:
        await raw.publish("emk.store", b"\xc1 not an envelope")
        await raw.flush()
    finally:
        await raw.close()
    reply = await request_verification(auditor, "What is 6 x 7?", "42", timeout=20)
    assert reply["verified"] is True


@pytest.mark.nats
async def test_every_dashboard_query_returns_data_from_the_services(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    stores = await process_identities(tmp_path / "keys", ["control-plane", "tools"], list(AGENTS))
    scripts = {"a": Reply(verdict("supported")), "b": Reply(verdict("supported")), "c": Reply("no verdict")}
    procs: list[Any] = []
    async with private_nats("", tmp_path) as port, ScriptedLLMServer(scripts) as llm:
        broker = f"nats://127.0.0.1:{port}"
        try:
            targets, admin, procs = await services(broker, tmp_path, workspace, llm.url, procs)
            async with contextlib.AsyncExitStack() as clients:  # closed while their broker is there
                await scenario(broker, admin, workspace, stores, Closing(clients))
            config = shipped_config(targets)
            async with prometheus({}, tmp_path, config=config) as url:
                up = await wait_targets_up(url, len(targets))
                assert {t["labels"]["service"] for t in up} == set(targets)
                assert {t["labels"]["job"] for t in up} == {"agent-os"}
                missing = await without_data(url, [*queries(), *variable_queries()])
                assert not missing, "no series for:\n" + "\n".join(map(str, missing))

                async def rules_evaluated() -> bool:
                    groups = (await api(url, "/api/v1/rules"))["groups"]
                    rules = [r for g in groups for r in g["rules"]]
                    return len(rules) >= 5 and all(r["health"] == "ok" for r in rules)

                await wait_until(rules_evaluated, 10, what="the shipped rules loaded and evaluated")
                firing = await query(url, 'ALERTS{alertstate="firing"}')
                assert [s["metric"]["alertname"] for s in firing] == []
        finally:  # while their broker is still there: they stop at once
            await asyncio.gather(*(stop(p, signal.SIGTERM) for p in procs if p.returncode is None))
