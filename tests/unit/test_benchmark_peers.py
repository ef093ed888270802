"""The pure helpers of benchmarks/peers.py (the benchmark itself is a separate command)."""

from __future__ import annotations

import pytest

from benchmarks.peers import per_round, rotated, sizes_for, spread


def test_per_round_pairs_rounds_by_position() -> None:
    assert per_round([10.0, 30.0], [5.0, 10.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="2 rounds against 1"):
        per_round([1.0, 2.0], [1.0])


def test_spread_is_the_median_with_the_range() -> None:
    assert spread([0.9, 0.7, 0.8]) == "0.80 (0.70-0.90)"
    assert spread([1.0, 2.0]) == "1.50 (1.00-2.00)"
    assert spread([]) == "n/a"


def test_rotation_puts_each_implementation_first_in_turn() -> None:
    impls = ("ours", "faststream", "raw")
    firsts = [rotated(impls, r)[0] for r in range(3)]
    assert firsts == ["ours", "faststream", "raw"]
    assert all(sorted(rotated(impls, r)) == sorted(impls) for r in range(5))


def test_quick_sizes_are_smaller() -> None:
    for broker in ("nats", "redis"):
        quick, full = sizes_for(broker, True), sizes_for(broker, False)
        assert quick.tp < full.tp
        assert quick.rr < full.rr
        assert quick.group <= full.group
