"""The NATS adapter's window of JetStream publish acks, driven by a JetStream stand-in whose
acks the test resolves by hand (the real server is exercised by the conformance and fault
suites; this pins down the window's own logic: bound, resend, give-up, reporting)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from agent_os.amb.errors import TransportError
from agent_os.bus_adapters.nats import AckWindow
from tests.support import wait_until


class FakeJetStream:
    """Records each publish_async and hands back a future the test resolves."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str, asyncio.Future[Any]]] = []

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((subject, payload, headers["Nats-Msg-Id"], fut))
        return fut

    def ack(self, index: int) -> None:
        self.sent[index][3].set_result({"stream": "S", "seq": index})


def _window(js: FakeJetStream, window: int = 8, timeout: float = 10.0) -> AckWindow:
    return AckWindow(cast(Any, js), window=window, publish_timeout=timeout)


async def test_publish_returns_before_the_ack_and_the_window_bounds_what_is_outstanding() -> None:
    js = FakeJetStream()
    acks = _window(js, window=2)
    await acks.publish("s.a", b"0", confirm=False)
    await acks.publish("s.a", b"1", confirm=False)
    assert acks.outstanding == 2
    third = asyncio.ensure_future(acks.publish("s.a", b"2", confirm=False))
    await asyncio.sleep(0.02)
    assert not third.done(), "a full window makes publish() wait"
    js.ack(0)
    await asyncio.wait_for(third, 2)
    js.ack(1)
    js.ack(2)
    await acks.flush(2)
    assert (acks.outstanding, acks.confirmed, acks.failures) == (0, 3, 0)
    await acks.close(1)


async def test_a_lost_ack_is_resent_with_the_same_message_id() -> None:
    js = FakeJetStream()
    acks = _window(js, timeout=0.4)  # resends after 0.2 s without an ack
    await acks.publish("s.a", b"x", confirm=False)
    await wait_until(lambda: len(js.sent) >= 2, timeout=2, what="a resend")
    first, again = js.sent[0], js.sent[1]
    assert again[:3] == first[:3], "same subject, payload and Nats-Msg-Id: the stream dedupes"
    assert first[3].cancelled()
    js.ack(1)
    await acks.flush(2)
    assert acks.resent >= 1
    assert acks.failures == 0
    await acks.close(1)


async def test_a_transient_failure_is_sent_again() -> None:
    import nats.js.errors as je

    js = FakeJetStream()
    acks = _window(js)
    await acks.publish("s.a", b"x", confirm=False)
    js.sent[0][3].set_exception(je.NoStreamResponseError())  # e.g. the stream's leader moving
    await wait_until(lambda: len(js.sent) == 2, timeout=2, what="a resend")
    js.ack(1)
    await acks.flush(2)
    assert acks.failures == 0
    await acks.close(1)


async def test_an_unacknowledged_publish_is_given_up_counted_and_raised_to_the_publisher() -> None:
    js = FakeJetStream()
    acks = _window(js, timeout=0.3)
    await acks.publish("s.a", b"lost", confirm=False)
    await wait_until(lambda: acks.failures == 1, timeout=3, what="the publish given up")
    assert acks.outstanding == 0
    with pytest.raises(TransportError, match="not acknowledged"):
        await acks.publish("s.a", b"next", confirm=False)
    assert len([s for s in js.sent if s[1] == b"next"]) == 0, "the raising publish sent nothing"
    await acks.publish("s.a", b"next", confirm=False)  # reported once: the next one goes through
    js.ack(len(js.sent) - 1)
    await acks.flush(2)
    await acks.close(1)


async def test_a_refused_publish_fails_at_once_and_flush_raises_it() -> None:
    import nats.js.errors as je

    js = FakeJetStream()
    acks = _window(js)
    await acks.publish("s.a", b"x", confirm=False)
    js.sent[0][3].set_exception(je.APIError(code=400, err_code=10060, description="bad"))
    with pytest.raises(TransportError):
        await acks.flush(2)
    assert acks.failures == 1
    await acks.flush(2)  # reported once
    await acks.close(1)


async def test_confirm_waits_for_the_ack() -> None:
    js = FakeJetStream()
    acks = _window(js)
    publish = asyncio.ensure_future(acks.publish("s.a", b"x", confirm=True))
    await wait_until(lambda: len(js.sent) == 1)
    await asyncio.sleep(0.02)
    assert not publish.done()
    js.ack(0)
    await asyncio.wait_for(publish, 2)
    await acks.close(1)
