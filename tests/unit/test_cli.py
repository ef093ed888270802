from __future__ import annotations

from click.testing import CliRunner

from agent_os import __version__
from agent_os.cli import main
from agent_os.demo import run_demo


def test_version() -> None:
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"agent-os {__version__}"


def test_demo_command_narrates_the_scenario() -> None:
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "worker-1      <- tasks.process" in out
    assert "worker-2      <- tasks.process" in out
    assert "dead letter: task_5 (handler_error" in out
    assert "{'agent_id': 'worker-1', 'completed': 4}" in out
    assert "event #4" in out


async def test_demo_counts() -> None:
    lines: list[str] = []
    totals = await run_demo(lines.append)
    assert totals["dead_lettered"] == 1
    assert totals["expired"] == 1
    assert totals["filtered"] == 3  # task_2, task_3 and task_5 are not high-priority analytics
    assert totals["requests"] == 1
    assert totals["malformed"] == 0
    assert sum("analytics     <- tasks.process" in line for line in lines) == 2
