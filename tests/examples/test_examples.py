"""Every example runs as a user would run it, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    out = run("control_plane_reference.py").splitlines()
    assert "{'analyzed': True, 'length': 11}" in out
    assert "write data/phi/p1 deny PHI write requires explicit approval AgentSignal.SIGKILL" in out
    assert out[-2:] == ["1 2 2", "chain ok: True"]


def test_iatp_signed_bus_verifies_and_dead_letters_the_forgery() -> None:
    assert run("iatp_signed_bus.py").splitlines() == [
        "worker got {'task_id': 't1'} from coordinator: valid=True trust=0.9 allowed=True",
        "coordinator got {'task_id': 't1', 'status': 'completed'}",
        "forged message dead-lettered: unknown_key",
    ]
