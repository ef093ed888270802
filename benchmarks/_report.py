"""What every benchmark shares: the per-round statistics it reports (the median of per-round
ratios with their range, never a ratio of best runs) and the writer of its RESULTS.md section."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is rewritten by the script named in it. Ratios compare with a baseline\nmeasured in the same run, since absolute figures on shared machines are noisy.\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section ``## name`` of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"## {name}\n\n"
        f"Command: `{command}`  \n"
        f"Run: {stamp}, commit {commit()}, {machine()}\n\n"
        f"{body.strip()}\n"
    )
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")
    print(f"wrote section {name!r} of {RESULTS}", file=sys.stderr)


def per_round(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each round's figures (rounds paired by position). Raises ValueError when
    the two hold different numbers of rounds."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds against {len(denominators)}")
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """``median (min-max)`` of per-round figures in ``fmt``, or ``n/a`` without any."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def pct(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (1-99) of ``samples`` (at least two)."""
    return statistics.quantiles(samples, n=100)[int(q) - 1]
