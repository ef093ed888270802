"""The bus_memory benchmark's alternation: sides take turns block by block, each side stays
open between its blocks, and a block measures what it says (every message handled)."""

from __future__ import annotations

from benchmarks.bus_memory import (
    BusFlow,
    BusRequests,
    QueueFlow,
    QueuePairRequests,
    alternate,
    codec_rate,
)


class Recording:
    """A side that records when its blocks ran, in a log shared with the other sides."""

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        self.name = name
        self.log = log

    async def block(self, n: int) -> str:
        self.log.append((self.name, n))
        return f"{self.name}{len(self.log)}"


async def test_sides_take_turns_block_by_block() -> None:
    log: list[tuple[str, int]] = []
    found = await alternate([Recording("a", log), Recording("b", log)], blocks=3, per_block=7)
    assert log == [("a", 7), ("b", 7)] * 3
    assert found == [["a1", "a3", "a5"], ["b2", "b4", "b6"]]


async def test_a_flow_block_waits_for_every_message_and_the_flow_stays_open() -> None:
    for flow in (BusFlow(), QueueFlow(), QueueFlow(codec=False)):
        await flow.open()
        try:
            for expected in (50, 100):
                assert await flow.block(50) > 0
                assert flow.count == expected  # handled, not just sent, before the block ends
        finally:
            await flow.close()


async def test_a_request_block_gives_one_latency_a_request() -> None:
    for side in (BusRequests(), QueuePairRequests(), BusRequests(bystanders=3)):
        await side.open()
        try:
            samples = await side.block(20)
            assert len(samples) == 20
            assert all(sample > 0 for sample in samples)
        finally:
            await side.close()


def test_the_codec_rates_count_every_block() -> None:
    ours, raw = codec_rate(2_000, blocks=4)
    assert ours > 0
    assert raw > 0
