"""Per-message failures on the NATS broker, against the real server: a message that is not its
consumer's on a durable's pull inbox, or a handler that lets out a stray CancelledError, is
counted and never ends the subscription (nats-py's callback loop stops for good on a
CancelledError). Streams made by a test are deleted after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent_os.amb.broker import Delivery
from agent_os.bus_adapters.nats import NatsBroker
from tests.support import wait_until
from tests.support.cleanup import delete_nats_streams
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[NatsBroker]:
    broker = NatsBroker(NATS_URL)
    await broker.connect()
    try:
        yield broker
    finally:
        try:
            await broker.close(timeout=2)
        finally:
            await delete_nats_streams(prefix, NATS_URL)


class CancelsOnce:
    """Acks every delivery; on the data ``b"cancel"`` first lets out a CancelledError of a
    future it awaited (this task itself is not being cancelled)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        if delivery.data == b"cancel":
            await delivery.ack()
            other = asyncio.get_running_loop().create_future()
            other.cancel()
            await other
        self.got.append(delivery.data)
        await delivery.ack()


@pytest.mark.parametrize("durable", [False, True])
async def test_a_stray_cancelled_error_does_not_end_the_subscription(
    broker: NatsBroker, prefix: str, durable: bool
) -> None:
    handler = CancelsOnce()
    sub = await broker.subscribe(f"{prefix}.x", handler, durable=f"{prefix}-d" if durable else None)
    for data in (b"cancel", b"after-1", b"after-2"):
        await broker.publish(f"{prefix}.x", data)
    await wait_until(lambda: handler.got == [b"after-1", b"after-2"], what="the later messages")
    assert sub.handler_errors == 1  # type: ignore[attr-defined]


async def test_a_foreign_message_on_the_pull_inbox_is_counted_and_dropped(
    broker: NatsBroker, prefix: str
) -> None:
    got: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.data)
        await delivery.ack()

    sub = await broker.subscribe(f"{prefix}.x", handler, durable=f"{prefix}-d")
    inbox = sub._inbox  # type: ignore[attr-defined]  # anyone who learns it may publish there
    await broker.connection.publish(inbox, b"not from JetStream")
    await broker.connection.publish(inbox, b"with a reply", reply="_INBOX.somewhere")
    await broker.publish(f"{prefix}.x", b"valid")
    await wait_until(lambda: got == [b"valid"], what="the stream's message")
    await wait_until(lambda: broker.malformed == 2, what="both foreign messages counted")
    await broker.publish(f"{prefix}.x", b"later")
    await wait_until(lambda: got == [b"valid", b"later"], what="a later message")
