"""The ``agent-os`` CLI: the demo (its narration and what it observed) and ``serve``."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_os import __version__
from agent_os.amb import AMB, RemoteError
from agent_os.cli import SERVICES, main
from agent_os.control_plane import DECISION_EVENTS
from agent_os.demo import DemoResult, run_demo
from agent_os.demo._knowledge import MEMORIES, choose_embedder
from agent_os.emk import EMK, HashingEmbedder, StateError
from tests.support import wait_until
from tests.support.closing import Closing

ETL = MEMORIES[1]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = CliRunner().invoke(main, [flag])
    assert result.exit_code == 0
    assert result.output.strip() == f"agent-os {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["demo"],
        ["serve"],
        ["serve", "memory"],
        ["serve", "verifier"],
        ["serve", "control-plane"],
        ["submit"],
        ["log"],
        ["policy"],
        ["policy", "validate"],
    ],
)
def test_short_help_on_every_command(args: list[str]) -> None:
    short = CliRunner().invoke(main, [*args, "-h"], prog_name="agent-os")
    long = CliRunner().invoke(main, [*args, "--help"], prog_name="agent-os")
    assert (short.exit_code, long.exit_code) == (0, 0)
    assert short.output == long.output
    assert short.output.startswith(f"Usage: agent-os {' '.join(args)}".rstrip() + " [OPTIONS]")


TOKEN = "0123456789abcdef0123456789abcdef"
CONTROL_PLANE = ["serve", "control-plane", "--broker", "memory://cli", "--admin-token", TOKEN, "--trust-bus"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "memory", "--broker", "memory://cli", "--log-level", "LOUD"],
            "Invalid value for '--log-level': 'LOUD' is not one of",
        ),
        (
            ["serve", "verifier", "--broker", "memory://cli", "--log-level", "verbose"],
            "Invalid value for '--log-level': 'verbose' is not one of",
        ),
        ([*CONTROL_PLANE, "--log-level", "5"], "Invalid value for '--log-level': '5' is not one of"),
        (
            [*CONTROL_PLANE, "--policy", "polcy.yml"],
            "Invalid value for '--policy': no such policy file: 'polcy.yml' (or a built-in policy: strict,",
        ),
        ([*CONTROL_PLANE, "--policy", "stict"], "Invalid value for '--policy': no such policy file: 'stict'"),
        (
            [*CONTROL_PLANE, "--recorder", "ftp://host/recorder.db"],
            "Invalid value for '--recorder': unsupported recorder URL scheme 'ftp'",
        ),
        ([*CONTROL_PLANE, "--recorder", "s3://bucket/x"], "unsupported recorder URL scheme 's3'"),
        ([*CONTROL_PLANE, "--recorder", ""], "Invalid value for '--recorder': empty recorder"),
        ([*CONTROL_PLANE, "--metrics-token", "short"], "--metrics-token must be at least 16 characters"),
        (
            ["serve", "memory", "--broker", "memory://cli", "--trust-bus", "--metrics-port", "70000"],
            "Invalid value for '--metrics-port': 70000 is not in the range 0<=x<=65535",
        ),
        (
            ["serve", "memory", "--broker", "memory://cli", "--trust-bus", "--verify-workers", "2"],
            "--verify-workers needs --identities",
        ),
        (
            [*CONTROL_PLANE, "--verify-workers", "-1"],
            "Invalid value for '--verify-workers': -1 is not in the range 0<=x<=64",
        ),
    ],
)
def test_bad_options_are_one_line_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args, prog_name="agent-os")
    assert result.exit_code == 2, result.output  # click's usage error: nothing was started
    assert result.exception is None or isinstance(result.exception, SystemExit)
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: "), result.output
    assert message in error, result.output
    assert "Traceback" not in result.output


def test_a_policy_file_that_does_not_load_is_a_usage_error_naming_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("name: p\nrules: [\n")
    result = CliRunner().invoke(main, [*CONTROL_PLANE, "--policy", str(bad)], prog_name="agent-os")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: Invalid value for '--policy': line 3:")


def test_policy_and_recorder_forms_that_are_accepted(tmp_path: Path) -> None:
    from agent_os.services.control_plane_service._options import load_policy, recorder_storage

    good = tmp_path / "policy.yml"
    good.write_text("name: mine\nversion: '3'\ndefault_action: deny\n")
    assert load_policy(str(good)).name == "mine"
    builtins = ["strict", "permissive", "audit"]
    assert [load_policy(name).name for name in builtins] == builtins
    assert recorder_storage("memory") == ("memory", None)
    assert recorder_storage("sqlite:///rel.db") == ("sqlite", "rel.db")
    assert recorder_storage("sqlite:////abs/x.db") == ("sqlite", "/abs/x.db")
    assert recorder_storage("plain/path.db") == ("sqlite", "plain/path.db")
    assert recorder_storage("postgresql://u@h/db") == ("postgresql", "postgresql://u@h/db")
    assert recorder_storage("postgres://u@h/db") == ("postgresql", "postgres://u@h/db")


@pytest.fixture(scope="module")
def demo() -> tuple[DemoResult, list[str]]:
    """One run of the demo (hashing embedder) shared by the tests that read it."""
    lines: list[str] = []
    result = asyncio.run(run_demo(lines.append, embedder="hashing"))
    return result, lines


def test_demo_bus_counters(demo: tuple[DemoResult, list[str]]) -> None:
    result, lines = demo
    assert result.bus["expired"] == 1
    # analytics' filter (high + analytics) leaves out task_2, task_3, task_5, and task_6 to task_9 later
    assert result.bus["filtered"] == 7
    assert result.bus["malformed"] == 0
    assert result.bus["request_timeouts"] == 0
    assert sum("analytics    <- tasks.process" in line for line in lines) == 2
    assert any("{'agent_id': 'worker-1', 'completed': 4}" in line for line in lines)
    assert sum("auditor      <~ events.task.done" in line for line in lines) == 4
    workers = [
        m for line in lines if (m := re.search(r"(worker-\d) +<- tasks\.process +task_[1-4] (.*)", line))
    ]
    assert len(workers) == 4
    assert {m[1] for m in workers} == {"worker-1", "worker-2"}  # the queue group shares the tasks
    assert {m[2] for m in workers} == {"[signed by coordinator, verified, trust 0.90]"}


def test_demo_dead_letters_each_refusal_with_its_reason(demo: tuple[DemoResult, list[str]]) -> None:
    result, lines = demo
    assert result.dead_letters == Counter(
        handler_error=1, unknown_key=1, bad_signature=1, policy_denied=1, agent_killed=1
    )
    assert result.bus["dead_lettered"] == 5
    dead = [line for line in lines if "dead letter (" in line]
    assert [re.search(r"dead letter \((\w+)\): (\S+)", line).groups() for line in dead] == [  # type: ignore[union-attr]
        ("handler_error", "task_5"),
        ("unknown_key", "task_6"),
        ("bad_signature", "task_7"),
        ("policy_denied", "task_8"),
        ("agent_killed", "job-9"),
    ]
    assert result.verified > 0
    assert result.signed >= result.verified


def test_demo_policy_denies_and_rate_limits(demo: tuple[DemoResult, list[str]]) -> None:
    result, lines = demo
    assert result.denied == 1
    assert result.rate_limited == 2
    assert any("denied before it left: secrets never travel on the bus" in line for line in lines)
    alerts = [line.split("alert ", 1)[1] for line in lines if "alerts.disk            alert" in line]
    assert alerts == [
        "1: allowed",
        "2: allowed",
        "3: allowed",
        "4: denied, over the rate limit of rule alerts-rate",
        "5: denied, over the rate limit of rule alerts-rate",
    ]


def test_demo_signals(demo: tuple[DemoResult, list[str]]) -> None:
    result, lines = demo
    assert result.held == 3
    assert result.released == ["report-1", "report-2", "report-3"]
    assert any("auditor is stopped: 3 deliveries held, 0 handled" in line for line in lines)
    assert result.killed_status == "terminated"
    assert any("SIGKILL -> worker-2 mid-job: state terminated, job finished: False" in line for line in lines)
    # After the kill, the queue group has only worker-1 left.
    assert any(re.search(r"worker-1 +<- tasks\.process +task_9 ", line) for line in lines)


def test_demo_flight_recorder_records_every_decision_and_finds_the_edit(
    demo: tuple[DemoResult, list[str]],
) -> None:
    result, lines = demo
    decided = sum(result.records[event] for event in DECISION_EVENTS)
    assert decided == result.decisions > 50
    assert result.records["policy_violation"] > 0
    assert result.records["message_held"] == 3
    assert result.records["signal"] == 3  # SIGSTOP, SIGCONT, SIGKILL
    assert result.verified_chain is True
    assert result.checked == sum(result.records.values())
    assert result.tampered_seq is not None
    assert result.first_bad_seq == result.tampered_seq
    assert result.tamper_reason == "content does not match its hash (edited)"
    seq = result.tampered_seq
    assert any(f"#{seq:<4} deny publish secrets.db by coordinator" in line for line in lines)
    assert any(
        f"verify(): ok=False, first bad record #{seq}: content does not match" in line for line in lines
    )
    assert any(f"verify(): ok=True, {result.checked} records checked" in line for line in lines)


def test_demo_memory_and_agreement(demo: tuple[DemoResult, list[str]]) -> None:
    result, lines = demo
    assert result.embedder == "hashing-256"
    assert any("the deterministic hashing embedder" in line for line in lines)
    assert result.recalled == ETL
    assert result.foreign_hits == 0
    assert [(a, b, agree) for a, b, agree, _ in result.agreements] == [
        ("The answer is 42.", "The answer is 24.", False),
        ("Paris is the capital of France", "The capital of France is Paris", True),
    ]
    assert any("'The answer is 42.' vs 'The answer is 24.': disagree" in line for line in lines)


def test_demo_command_runs_and_summarizes() -> None:
    result = CliRunner().invoke(main, ["demo", "--embedder", "hashing"])
    assert result.exit_code == 0, result.output
    summary = result.output.split("== Summary", 1)[1]
    assert (
        "5 dead letters (1 agent_killed, 1 bad_signature, 1 handler_error, 1 policy_denied, 1 unknown_key)"
        in (summary)
    )
    assert "1 publish denied, 2 rate-limited; 3 held by SIGSTOP and released in order" in summary
    assert re.search(r"chain verified: True; edited record #(\d+) found: #\1\b", summary)


def test_demo_command_refuses_an_unknown_embedder() -> None:
    result = CliRunner().invoke(main, ["demo", "--embedder", "gpt"])
    assert result.exit_code == 2
    assert "'gpt' is not one of 'auto', 'local', 'hashing'" in result.output


def test_choose_embedder() -> None:
    assert isinstance(choose_embedder("hashing"), HashingEmbedder)
    with pytest.raises(ValueError, match="unknown embedder 'bert'"):
        choose_embedder("bert")


# -- serve ------------------------------------------------------------------------------------


def test_serve_lists_the_services() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for name in ("memory", "verifier", "control-plane"):
        assert re.search(rf"^  {name}\b", result.output, re.M), result.output


@pytest.mark.parametrize(
    ("service", "option"),
    [("memory", "--storage"), ("verifier", "--model"), ("control-plane", "--admin-token")],
)
def test_serve_delegates_to_the_service_command(service: str, option: str) -> None:
    result = CliRunner().invoke(main, ["serve", service, "--help"])
    assert result.exit_code == 0, result.output
    assert option in result.output


def test_serve_reports_a_service_that_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SERVICES, "ghost", ("agent_os.services.no_such_service", "A service not installed."))
    listed = CliRunner().invoke(main, ["serve", "--help"])
    assert "A service not installed." in listed.output
    result = CliRunner().invoke(main, ["serve", "ghost"])
    assert result.exit_code == 1
    assert "the ghost service cannot start: ModuleNotFoundError" in result.output


def test_serve_refuses_an_unknown_service() -> None:
    result = CliRunner().invoke(main, ["serve", "database"])
    assert result.exit_code == 2
    assert "No such command 'database'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "memory",
                "--broker",
                "ftp://x",
                "--trust-bus",
                "--storage",
                "memory",
                "--embedding-model",
                "hashing",
            ],
            "ftp://x",
        ),
        (
            ["memory", "--broker", "memory://x", "--trust-bus", "--storage", "postgresql"],
            "needs a connection_string",
        ),
        (
            ["verifier", "--broker", "ftp://x", "--trust-bus", "--model", "openai/gpt-4o"],
            "unsupported broker URL",
        ),
        (
            ["verifier", "--broker", "memory://x", "--trust-bus", "--model", "a=", "--api-base", "http://x"],
            "model is empty",
        ),
    ],
)
def test_serve_reports_bad_options_without_a_traceback(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


SERVICE_ARGS = {
    "memory": ["--broker", "memory://x", "--storage", "memory", "--embedding-model", "hashing"],
    "verifier": ["--broker", "memory://x", "--model", "openai/gpt-4o", "--api-base", "http://x"],
    "control-plane": ["--broker", "memory://x", "--recorder", "memory", "--admin-token", "t" * 20],
}


@pytest.mark.parametrize("service", list(SERVICE_ARGS))
def test_serve_refuses_to_start_without_sender_verification(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AGENTOS_KEY_PASSPHRASE", raising=False)
    result = CliRunner().invoke(main, ["serve", service, *SERVICE_ARGS[service]])
    assert result.exit_code == 2, result.output
    assert "refusing to start without sender verification" in result.output
    assert "--identities PATH" in result.output
    assert "--trust-bus" in result.output
    both = ["serve", service, *SERVICE_ARGS[service], "--identities", str(tmp_path), "--trust-bus"]
    result = CliRunner().invoke(main, both)
    assert (result.exit_code, "exclude each other" in result.output) == (2, True), result.output
    result = CliRunner().invoke(
        main, ["serve", service, *SERVICE_ARGS[service], "--identities", str(tmp_path)]
    )
    assert (result.exit_code, "AGENTOS_KEY_PASSPHRASE" in result.output) == (2, True), result.output


@pytest.mark.parametrize("service", list(SERVICE_ARGS))
def test_serve_reports_identities_without_the_services_key(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agent_os.iatp import IATP

    store = tmp_path / "keys"
    asyncio.run(
        IATP("file", key_path=str(store), passphrase="pw-0123456789", kdf_level="interactive").register_agent(
            "other"
        )
    )
    monkeypatch.setenv("AGENTOS_KEY_PASSPHRASE", "pw-0123456789")
    result = CliRunner().invoke(main, ["serve", service, *SERVICE_ARGS[service], "--identities", str(store)])
    assert result.exit_code == 1, result.output
    assert "IATPConfigError" in result.output
    assert "holds no signing key" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setenv("AGENTOS_KEY_PASSPHRASE", "not the passphrase")
    result = CliRunner().invoke(main, ["serve", service, *SERVICE_ARGS[service], "--identities", str(store)])
    assert (result.exit_code, "WrongPassphrase" in result.output) == (1, True), result.output


async def printed(capsys: pytest.CaptureFixture[str], text: str, timeout: float = 5.0) -> None:
    """Wait until ``text`` has been printed on stdout."""
    out = ""

    def seen() -> bool:
        nonlocal out
        out += capsys.readouterr().out
        return text in out

    await wait_until(seen, timeout, what=repr(text))


async def test_memory_serve_answers_over_the_bus_until_stopped(
    capsys: pytest.CaptureFixture[str], closing: Closing
) -> None:
    from agent_os.services.memory_service import serve

    url = "memory://cli-serve-memory"
    stop = asyncio.Event()
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    task = asyncio.create_task(serve(broker=url, emk=emk, trust_bus=True, prefix="mem", stop=stop))
    async with AMB("memory", url, agent_id="alice") as alice:
        await printed(capsys, "ready memory subjects=mem.*")
        stored = await alice.request("mem.store", {"content": "The sky is blue."}, timeout=5)
        assert stored["ok"] is True
        assert stored["record"]["agent_id"] == "alice"
        found = await alice.request("mem.search", {"query": "sky colour"}, timeout=5)
        assert [r["content"] for r in found["records"]] == ["The sky is blue."]
        with pytest.raises(RemoteError, match="EmptyContent"):
            await alice.request("mem.store", {"content": ""}, timeout=5)
        stop.set()
        service = await asyncio.wait_for(task, 5)
    assert service.stats["ok"] == 2
    assert service.stats["errors.EmptyContent"] == 1
    with pytest.raises(StateError):
        await emk.open()  # the service closed it


async def test_verifier_serve_answers_over_the_bus_until_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    from agent_os.cmvk import CMVK, ModelSpec
    from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
    from agent_os.services.verifier_service import request_verification, serve

    url = "memory://cli-serve-verifier"
    stop = asyncio.Event()
    async with ScriptedLLMServer({"a": Reply(verdict("supported")), "b": Reply(verdict("supported"))}) as llm:
        cmvk = CMVK([ModelSpec(n, model=f"openai/{n}") for n in "ab"], api_base=llm.url, api_key="k")
        task = asyncio.create_task(serve(broker=url, cmvk=cmvk, trust_bus=True, stop=stop))
        async with AMB("memory", url, agent_id="caller") as caller:
            # the service loads litellm (seconds, the first time in this process) before ready
            await printed(capsys, "ready verifier subject=cmvk.verify", timeout=60)
            reply = await request_verification(caller, "What is 6 x 7?", "42", timeout=20)
            stop.set()
            service = await asyncio.wait_for(task, 5)
    assert reply["verified"] is True
    assert reply["model_votes"] == {"a": True, "b": True}
    assert service.stats.as_dict() == {
        "requests": 1,
        "verified": 1,
        "rejected": 0,
        "invalid": 0,
        "failed": 0,
        "unauthenticated": 0,
        "too_large": 0,
        "wrong_subject": 0,
    }


def test_serve_help_names_the_verification_options() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert "--identities PATH" in result.output
    assert "--trust-bus" in result.output
    for service in SERVICE_ARGS:
        result = CliRunner().invoke(main, ["serve", service, "--help"])
        assert "--identities DIRECTORY" in result.output
        text = " ".join(result.output.split())
        assert "Only for a broker whose ACLs already authenticate senders" in text
