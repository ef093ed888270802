"""``agent-os submit``, ``log`` and ``policy validate`` run as processes: their output, their exit
codes, and one-line errors for bad input."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from agent_os.control_plane import FlightRecorder

CLI = [sys.executable, "-m", "agent_os.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=dict(os.environ), check=False
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The last line on stderr, which must be the only error line (no traceback)."""
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_submit_prints_the_result_and_exits_by_outcome(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    db = tmp_path / "records.db"
    recorder = ["--recorder", f"sqlite:///{db}", "--workspace", str(tmp_path)]
    done = run("submit", "fs.read", "a.txt", "--policy", "permissive", *recorder)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["output"] == "hello"
    wrote = run(
        "submit", "fs.write", "d/b.txt", "-p", "content=hi", "-p", "parents=true", "--policy", "permissive",
        *recorder,
    )  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    assert (tmp_path / "d" / "b.txt").read_text() == "hi"
    denied = run("submit", "fs.write", "c.txt", "-p", "content=x", "--permissions", "read", *recorder)
    assert denied.returncode == 3
    assert json.loads(denied.stdout)["error"] == "agent cli lacks permission for write"
    strict = run("submit", "fs.read", "a.txt", *recorder)  # the default policy is strict
    assert strict.returncode == 3
    assert json.loads(strict.stdout)["error"] == "default deny"
    failed = run("submit", "fs.read", "missing.txt", "--policy", "permissive", *recorder)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"] == "'missing.txt': no such file or directory"
    logged = run("log", "--recorder", str(db), "--event-type", "action_outcome")
    assert logged.returncode == 0, logged.stderr
    outcomes = [json.loads(line) for line in logged.stdout.splitlines()]
    assert [o["data"]["status"] for o in outcomes] == ["ok", "ok", "error"]
    assert outcomes[0]["id"] == result["record_id"]


def test_submit_bad_input_is_a_one_line_usage_error(tmp_path: Path) -> None:
    unknown = run("submit", "fs.chmod", "a.txt", "--workspace", str(tmp_path))
    assert unknown.returncode == 2
    assert error_line(unknown) == (
        "Error: unknown action 'fs.chmod'"
        " (actions: code.run, fs.delete, fs.list, fs.read, fs.rollback, fs.write)"
    )
    bad_param = run("submit", "fs.read", "a.txt", "--param", "binary", "--workspace", str(tmp_path))
    assert bad_param.returncode == 2
    assert error_line(bad_param) == "Error: Invalid value for '--param': expected KEY=VALUE, got 'binary'"
    twice = run("submit", "fs.read", "a.txt", "-p", "binary=true", "-p", "binary=false")
    assert twice.returncode == 2
    assert error_line(twice) == "Error: Invalid value for '--param': 'binary' is given twice"
    no_dir = run("submit", "fs.read", "a.txt", "--workspace", str(tmp_path / "nope"))
    assert no_dir.returncode == 2
    assert "Invalid value for '--workspace'" in error_line(no_dir)


def _tamper(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE flight_records SET event_type = 'edited' WHERE seq = 2")
    conn.close()


async def test_log_queries_verifies_and_exports(tmp_path: Path) -> None:
    db = tmp_path / "fr.db"
    async with FlightRecorder("sqlite", str(db)) as recorder:
        for i in range(5):
            await recorder.log("tick" if i % 2 else "tock", f"agent-{i % 2}", {"i": i})
    newest = run("log", "--recorder", f"sqlite:///{db}", "--limit", "2")
    assert newest.returncode == 0, newest.stderr
    assert [json.loads(line)["data"]["i"] for line in newest.stdout.splitlines()] == [3, 4]
    agent = run("log", "--recorder", str(db), "--agent", "agent-1", "--event-type", "tick")
    assert [json.loads(line)["data"]["i"] for line in agent.stdout.splitlines()] == [1, 3]
    verified = run("log", "--recorder", str(db), "--verify")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    out = tmp_path / "out.json"
    exported = run("log", "--recorder", str(db), "--export", "json", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    assert [r["data"]["i"] for r in json.loads(out.read_text())] == [0, 1, 2, 3, 4]
    _tamper(db)
    broken = run("log", "--recorder", str(db), "--verify")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["first_bad_seq"] == 2


def test_log_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    missing = run("log", "--recorder", str(tmp_path / "none.db"))
    assert missing.returncode == 1
    assert (
        error_line(missing) == f"Error: RecorderError: no such recorder file: {str(tmp_path / 'none.db')!r}"
    )
    assert not (tmp_path / "none.db").exists()
    scheme = run("log", "--recorder", "ftp://x/y")
    assert scheme.returncode == 2
    assert "unsupported recorder URL scheme 'ftp'" in error_line(scheme)
    since = run("log", "--recorder", str(tmp_path / "none.db"), "--since", "yesterday")
    assert since.returncode == 2
    assert "'yesterday' is neither an ISO 8601 time nor an age" in error_line(since)
    alone = run("log", "--export", "csv")
    assert alone.returncode == 2
    assert error_line(alone) == "Error: --export and --output go together"


async def test_log_follow_prints_records_a_running_writer_appends(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    async with FlightRecorder("sqlite", str(db), flush_interval=0.01) as recorder:
        await recorder.log("first", "a", {"n": 1})
        await recorder.flush()
        proc = await asyncio.create_subprocess_exec(
            *CLI, "log", "--recorder", str(db), "--follow", "--interval", "0.05",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert json.loads(line)["event_type"] == "first"
            await recorder.log("second", "a", {"n": 2})
            await recorder.flush()
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert json.loads(line)["event_type"] == "second"
        finally:
            proc.terminate()
            await proc.wait()


def test_policy_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text(
        "name: files\ndefault_action: deny\nrules:\n"
        "  - action: allow\n    operation: read\n    resource: /work/*\n"
        "  - action: deny\n    operation: write\n    resource: '*'\n"
    )
    done = run("policy", "validate", str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{good}: valid policy 'files': 2 rules, default deny, mode enforce"
    bad = tmp_path / "bad.yml"
    bad.write_text("name: files\nrules:\n  - action: allow\n    operatoin: read\n")
    invalid = run("policy", "validate", str(bad))
    assert invalid.returncode == 1
    assert error_line(invalid).startswith(
        f"Error: {bad}: line 4, field 'rules[0].operatoin': unknown rule field"
    )
    missing = run("policy", "validate", str(tmp_path / "none.yml"))
    assert missing.returncode == 2
    assert "does not exist" in error_line(missing)
