"""The bus_adapters benchmark's runners: every side is open (and warmed up) before the first
block, the sides take turns block by block, and each side is closed afterwards, also when a
block fails. Sides here are stand-ins; the script itself runs against the real servers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from benchmarks.bus_adapters import (
    Burst,
    Counter,
    Request,
    Result,
    Sizes,
    burst_rates,
    latency_samples,
    render,
)


def recording_burst(
    name: str, log: list[str], fail_at: int = 0
) -> contextlib.AbstractAsyncContextManager[Burst]:
    """A side whose receiver is its sender (each send hits the counter), logging its blocks."""

    @contextlib.asynccontextmanager
    async def side() -> AsyncIterator[Burst]:
        log.append(f"open {name}")
        counter = Counter()
        sent = 0

        async def send() -> None:
            nonlocal sent
            sent += 1
            if sent == fail_at:
                raise RuntimeError("the broker went away")
            counter.hit()

        async def flush() -> None:
            log.append(f"{name} {counter.count}")

        try:
            yield Burst(counter, send, flush)
        finally:
            log.append(f"close {name}")

    return side()


async def test_throughput_sides_open_first_then_take_turns_block_by_block() -> None:
    log: list[str] = []
    rates = await burst_rates([recording_burst("a", log), recording_burst("b", log)], n=30, blocks=3)
    assert log == ["open a", "open b", "a 10", "b 10", "a 10", "b 10", "a 10", "b 10", "close b", "close a"]
    assert len(rates) == 2
    assert all(rate > 0 for rate in rates)


async def test_a_side_failing_mid_round_closes_every_side() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match="went away"):
        await burst_rates([recording_burst("a", log), recording_burst("b", log, fail_at=15)], n=30, blocks=3)
    assert log[-2:] == ["close b", "close a"]


async def test_latency_sides_warm_up_then_take_turns() -> None:
    calls: list[str] = []

    def side(name: str) -> contextlib.AbstractAsyncContextManager[Request]:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Request]:
            async def request() -> None:
                calls.append(name)

            yield request

        return opened()

    sizes = Sizes(tp=0, tp_warm=0, rr=6, rr_warm=2, rr_budget=60.0, rr_blocks=3)
    ours, raw = await latency_samples([side("ours"), side("raw")], sizes)
    assert calls == ["ours"] * 2 + ["raw"] * 2 + ["ours", "ours", "raw", "raw"] * 3
    assert len(ours) == len(raw) == 6
    assert all(sample > 0 for sample in ours + raw)


def test_the_json_rows_name_each_ratio_by_what_it_divides() -> None:
    # Per round: ours 30k, raw 50k, raw sending our envelope's fields 40k msg/s.
    result = Result(
        json_ratios=[30 / 50, 33 / 50], json_env_ratios=[30 / 40, 33 / 40], json_ceiling=[40 / 50, 40 / 50]
    )
    rows = [line for line in render({"nats": result}, quick=True, repeats=2, load=(0.0, 0.0)).splitlines()]
    target = next(line for line in rows if 'publish -> handler, `serializer="json"`, 256-char' in line)
    ceiling = next(line for line in rows if "(raw client + msgspec JSON of our envelope's fields" in line)
    beyond = next(line for line in rows if "our client's cost beyond" in line)
    assert "| 0.630 (0.600-0.660) | >= 0.80 MISSED |" in target
    assert "| 0.800 (0.800-0.800) | (info: what the envelope's content alone leaves) |" in ceiling
    assert "| 0.787 (0.750-0.825) |" in beyond
