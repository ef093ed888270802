"""The statistics every benchmark reports (benchmarks/_report.py), and that the reports use
them: the median of per-round ratios with their range, never a ratio of the best runs."""

from __future__ import annotations

import pytest

from benchmarks import bus_adapters
from benchmarks._report import pct, per_round, spread


def test_per_round_pairs_rounds_by_position() -> None:
    assert per_round([10.0, 30.0], [5.0, 10.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="2 rounds against 1"):
        per_round([1.0, 2.0], [1.0])


def test_spread_is_the_median_with_the_range() -> None:
    assert spread([0.9, 0.7, 0.8]) == "0.80 (0.70-0.90)"
    assert spread([1.0, 2.0]) == "1.50 (1.00-2.00)"
    assert spread([0.6731, 0.7], ".3f") == "0.687 (0.673-0.700)"
    assert spread([]) == "n/a"


def test_pct_is_the_percentile() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert pct(samples, 50) == pytest.approx(50.5)
    assert 98.0 < pct(samples, 99) <= 100.0


def test_adapter_rows_give_the_median_of_per_round_ratios() -> None:
    # Round by round ours/raw is 0.5, 0.6, 0.9: the median is 0.6, where the ratio of the best
    # runs (100 / 200) would say 0.5.
    result = bus_adapters.Result(
        ours_tp=[100.0, 60.0, 90.0],
        raw_tp=[200.0, 100.0, 100.0],
        ours_p50=[100.0, 200.0, 400.0],
        raw_p50=[90.0, 150.0, 100.0],
        ours_rr=[100.0, 200.0, 400.0],
        raw_rr=[90.0, 150.0, 100.0],
    )
    rows = bus_adapters.render({"nats": result}, quick=True, repeats=3, load=(0.0, 0.0))
    line = next(row for row in rows.splitlines() if "| publish -> handler (" in row)
    assert "| 0.600 (0.500-0.900) | >= 0.70 MISSED |" in line
    assert "| 90 msg/s |" in line  # the median rate, not the best
    rr = next(row for row in rows.splitlines() if "request/reply p50" in row)
    # per round raw/ours: 0.9, 0.75, 0.25
    assert "| 0.750 (0.250-0.900) |" in rr
