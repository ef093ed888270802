"""The pure helpers of benchmarks/peers.py (the benchmark itself is a separate command)."""

from __future__ import annotations

from benchmarks.peers import rotated, sizes_for


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
