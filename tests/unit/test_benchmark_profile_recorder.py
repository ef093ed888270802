"""benchmarks.profile_recorder: how samples are summed by part, and its workload run as the child
(without py-spy)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.profile_recorder import REST, parts, render, run_child

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "profile_recorder.py"

LOOP = "thread (101): MainThread;<module> (x.py:1);BaseEventLoop._run_once (asyncio/base_events.py:1922)"
WRITER = (
    "thread (102): flight-recorder_0;Thread.run (threading.py:975);_worker (concurrent/futures/thread.py:83)"
)


def test_each_sample_goes_to_the_first_part_its_stack_matches() -> None:
    raw = [
        f"{LOOP};FlightRecorder.append (r.py:372);FlightRecorder._chain (r.py:396) 7\n",
        f"{LOOP};FlightRecorder.flush (r.py:476) 2\n",
        f"{LOOP};Gate.cached_decision (g.py:105);Policy.cached (p.py:276) 3\n",
        f"{LOOP};AMB._on_delivery (c.py:861) 11\n",
        f"{WRITER};SqliteStorage.append.<locals>.write (s.py:396) 5\n",
        f"{WRITER};SqliteStorage.append.<locals>.write (s.py:180);DataCodec._deflate (codec.py:80) 4\n",
        "thread (103): flight-recorder-checkpoint_0;checkpoint (s.py:500) 1\n",
        "\n",
    ]
    found = parts(raw)
    assert found == Counter(
        {
            REST: 11,
            "recorder append on the event loop (hash chain, JSON)": 7,
            "SQLite writes (the recorder's writer thread)": 5,
            "compression (zlib, on the writer thread)": 4,
            "policy decisions": 3,
            "recorder flush and backpressure on the event loop": 2,
            "SQLite checkpoints (their own thread)": 1,
        }
    )


def test_a_line_that_is_not_a_stack_and_a_count_is_refused() -> None:
    with pytest.raises(ValueError, match="raw output"):
        parts([f"{LOOP};AMB.publish (c.py:497)\n"])


def test_the_summary_gives_each_parts_median_share_and_range_largest_first() -> None:
    runs = [
        Counter({REST: 60, "policy decisions": 40}),
        Counter({REST: 70, "policy decisions": 30}),
        Counter({REST: 80, "policy decisions": 20}),
    ]
    text = render(runs, [80.0, 90.0, 85.0], [60.0, 70.0, 65.0])
    assert "3 runs of 100 (median)" in text
    assert f"| {REST} | 70.0 (60.0-80.0) |\n| policy decisions | 30.0 (20.0-40.0) |" in text
    assert "85.0 (80.0-90.0) while sampled" in text
    assert "65.0 (60.0-70.0) in the same number of runs without it" in text


def test_the_workload_runs_as_the_child_and_says_where_agent_os_came_from(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "0", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ready, pace = done.stdout.splitlines()
    assert ready == f"ready {ROOT}"
    assert float(pace) > 0
    assert (tmp_path / "records.db").stat().st_size > 0  # its records went to the folder given


def test_a_tree_without_agent_os_is_refused_not_measured(tmp_path: Path) -> None:
    # agent_os then comes from this checkout, which the summary must not pass off as tmp_path's
    with pytest.raises(RuntimeError, match="imported agent_os from"):
        run_child(0.0, None, tmp_path)


def test_write_with_another_tree_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--write", "--tree", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "leave out --tree" in done.stderr
