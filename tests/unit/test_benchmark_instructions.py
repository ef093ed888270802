"""benchmarks.instructions: its arithmetic, and its cases run (without valgrind)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.instructions import CASES, per_item, refs_from, render

REPORT = """==123== Cachegrind, a high-precision tracing profiler
==123== Command: python -m benchmarks.instructions --run memory-publish --n 10
==123==
==123== I   refs:      1,234,567,890
"""


def test_the_count_is_read_from_cachegrinds_report() -> None:
    assert refs_from(REPORT) == 1_234_567_890
    with pytest.raises(ValueError, match="I refs"):
        refs_from("==1== something else")


def test_instructions_per_item_are_the_difference_of_two_runs() -> None:
    assert per_item(1_000_000, 1_500_000, 100) == 5_000.0


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_runs_as_the_child_does(case: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--run", case, "--n", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_unknown_case_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "memory-nothing"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown case 'memory-nothing'" in done.stderr


def test_the_results_section_gives_each_count_and_the_ratios_of_pairs_that_ran() -> None:
    section = render({"memory-publish": 33_629.4, "memory-queue": 23_848.0, "session": 120_000.0}, 5000)
    assert "| memory-publish | 33,629 |" in section
    assert "| session | 120,000 |" in section
    assert "memory-queue / memory-publish: 0.709" in section
    assert "- memory-request /" not in section  # a pair of which one case did not run: no ratio
    assert "| memory-request |" not in section
    assert "runs of 5,000 and\n10,000 items" in section
    assert render({"session": 1.0}, 10).count("Ratios") == 0
