"""The nonce-store benchmark's timed run: it ends when every message is handled, and a run
whose consumers fall short fails saying what became of the messages instead of hanging."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from benchmarks.iatp_nonce_store import Consumer, timed


class Publisher:
    """Stands in for a nats-py connection: records what is published and flushed."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.flushed = 0

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))

    async def flush(self) -> None:
        self.flushed += 1


async def test_a_run_ends_once_every_message_is_handled() -> None:
    nc = Publisher()
    polls = 0

    async def done() -> bool:
        nonlocal polls
        polls += 1
        return polls >= 3

    seconds = await timed(nc, "bench.x", [b"a", b"b"], done, wait=5.0)
    assert nc.sent == [("bench.x", b"a"), ("bench.x", b"b")]
    assert nc.flushed == 1
    assert polls == 3
    assert 0 < seconds < 5.0


async def test_a_run_that_falls_short_fails_with_what_the_consumers_did() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match="did not handle every message: handled 3 of 5"):
        await timed(Publisher(), "bench.x", [b"a"], never, lambda: "handled 3 of 5", wait=0.05)


def test_a_consumer_describes_refusals_dead_letters_and_failed_claims() -> None:
    consumer = Consumer({}, None)
    assert consumer.describe() == "handled 0, refused none, dead letters {}, failed claims 0"

    consumer.count = 7
    consumer.middleware = SimpleNamespace(rejected=Counter({"nonce_store_unavailable": 2}))  # type: ignore[assignment]
    assert consumer.describe() == (
        "handled 7, refused {'nonce_store_unavailable': 2}, dead letters {}, failed claims 0"
    )
