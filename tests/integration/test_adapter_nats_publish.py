"""Core publishes on the NATS broker skip ``Client.publish``'s per-call checks while the client is
connected (nats-py's internal ``_send_publish``), and take the public path otherwise: against
the real server, what arrives and what is raised is the same on both paths."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client

from agent_os.amb.broker import Delivery
from agent_os.amb.errors import BrokerUnavailable, ConfigError
from agent_os.bus_adapters.nats import NatsBroker
from agent_os.bus_adapters.nats._broker import connected_status
from tests.support import wait_until
from tests.support.servers import NATS_URL
from tests.support.tcp_gate import TcpGate

pytestmark = pytest.mark.nats


@pytest.fixture
async def broker() -> AsyncIterator[NatsBroker]:
    broker = NatsBroker(NATS_URL)
    await broker.connect()
    yield broker
    await broker.close(timeout=2)


class Received:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.data.append(delivery.data)


class Spy:
    """Counts calls of a client's method (set on the instance), passing them on."""

    def __init__(self, nc: Client, name: str) -> None:
        self.calls = 0
        original = getattr(nc, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await original(*args, **kwargs)

        setattr(nc, name, counted)


def test_the_installed_nats_py_has_the_direct_send() -> None:
    # If an upgrade of nats-py changes the internals, publishes stay correct (public path) but
    # lose the fast path: this test says so.
    assert connected_status(Client()) == Client.CONNECTED


class _Base:
    CONNECTED = 1

    def __init__(self) -> None:
        self._status = 0
        self._max_payload = 1024


class _NoSend(_Base):
    pass


class _OtherSignature(_Base):
    async def _send_publish(self, subject: str, payload: bytes) -> None:
        return None


class _NotACoroutine(_Base):
    def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: None
    ) -> None:
        return None


class _NoStatus(_Base):
    def __init__(self) -> None:
        self._max_payload = 1024

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: None
    ) -> None:
        return None


class _Expected(_NoStatus):
    def __init__(self) -> None:
        super().__init__()
        self._status = 0


@pytest.mark.parametrize("fake", [_NoSend, _OtherSignature, _NotACoroutine, _NoStatus])
def test_a_client_without_the_expected_internals_gets_the_public_path(fake: type[_Base]) -> None:
    assert connected_status(fake()) is None  # type: ignore[arg-type]


def test_a_client_with_the_expected_internals_gets_the_direct_send() -> None:
    assert connected_status(_Expected()) == 1  # type: ignore[arg-type]


async def test_connected_publishes_go_straight_to_the_send_and_arrive_in_order(broker: NatsBroker) -> None:
    subject = f"t{uuid.uuid4().hex[:12]}.direct"
    got = Received()
    await broker.subscribe(subject, got)
    nc = broker.connection
    direct, public = Spy(nc, "_send_publish"), Spy(nc, "publish")
    sent = [f"m{i}".encode() for i in range(200)]
    for data in sent:
        await broker.publish(subject, data)
    await wait_until(lambda: len(got.data) == len(sent))
    assert got.data == sent
    assert (direct.calls, public.calls) == (len(sent), 0)


async def test_a_payload_over_the_server_limit_takes_the_public_path_and_is_refused(
    broker: NatsBroker,
) -> None:
    nc = broker.connection
    public = Spy(nc, "publish")
    with pytest.raises(ConfigError, match=r"(?i)payload"):
        await broker.publish(f"t{uuid.uuid4().hex[:12]}.big", b"x" * (nc.max_payload + 1))
    assert public.calls == 1


async def test_while_reconnecting_publishes_are_buffered_by_the_public_path(broker: NatsBroker) -> None:
    subject = f"t{uuid.uuid4().hex[:12]}.buffered"
    got = Received()
    await broker.subscribe(subject, got)
    nc = broker.connection
    public = Spy(nc, "publish")
    # nats-py's own state during a reconnect (the socket stays up here, so what the public
    # path buffers is written once the state is back).
    nc._status = Client.RECONNECTING
    try:
        await broker.publish(subject, b"held")
        assert public.calls == 1
        assert nc.pending_data_size > 0
    finally:
        nc._status = Client.CONNECTED
    await broker.flush(timeout=5)
    await wait_until(lambda: got.data == [b"held"])


async def test_a_connection_closed_under_the_broker_raises_broker_unavailable(broker: NatsBroker) -> None:
    await asyncio.wait_for(broker.connection.close(), 5)
    with pytest.raises(BrokerUnavailable):
        await broker.publish(f"t{uuid.uuid4().hex[:12]}.closed", b"late")


async def test_subscribe_and_flush_return_once_the_server_has_processed_what_came_before() -> None:
    # nats-py's flush() writes its PING ahead of commands still in its write buffer. When
    # subscribe() or flush() returns, the SUB (or the PUB) must have gone to the server before
    # the PING whose PONG ended the wait: else a message published at once from another
    # connection can reach the server before the interest, and be lost.
    host, port = NATS_URL.removeprefix("nats://").split(":")
    async with TcpGate(host, int(port)) as gate:
        broker = NatsBroker(f"nats://{gate.address}")
        await broker.connect()
        try:
            subject = f"t{uuid.uuid4().hex[:12]}.order"
            await broker.subscribe(subject, Received())
            sent = bytes(gate.received)
            assert -1 < sent.find(f"SUB {subject} ".encode()) < sent.rfind(b"PING\r\n")
            await broker.publish(subject, b"x")
            await broker.flush()
            sent = bytes(gate.received)
            assert -1 < sent.find(f"PUB {subject} ".encode()) < sent.rfind(b"PING\r\n")
        finally:
            await broker.close(timeout=2)


async def test_reply_subjects_reach_their_subscription_without_entering_the_route_cache(
    broker: NatsBroker,
) -> None:
    # Reply subjects are new for each request: caching them would push topics out.
    got = Received()
    await broker.subscribe(broker.inbox_prefix() + ".>", got)
    topic = f"cache.{uuid.uuid4().hex}"
    await broker.publish(topic, b"topic")
    for n in range(20):
        await broker.publish(f"{broker.inbox_prefix()}.{n:x}", str(n).encode())
    await wait_until(lambda: len(got.data) == 20, what="the replies")
    assert got.data == [str(n).encode() for n in range(20)]
    assert topic in broker._routes
    assert not any(s.startswith("_INBOX.") for s in broker._routes)
    for bad in (f"{broker.inbox_prefix()}.a b", f"{broker.inbox_prefix()}.*", 5, ["a.b"], bytearray(b"a")):
        with pytest.raises(ConfigError):
            await broker.publish(bad, b"x")  # type: ignore[arg-type]


async def test_the_route_cache_is_keyed_by_plain_text(broker: NatsBroker) -> None:
    from tests.support.strings import LooseStr

    got = Received()
    topic = f"plain.{uuid.uuid4().hex}"
    await broker.subscribe(topic, got)
    await broker.publish(topic, b"1")  # routed and cached
    await broker.publish(LooseStr(topic), b"2")  # a str subclass: sent as its text
    with pytest.raises(ConfigError):
        await broker.publish(topic.replace(".", " "), b"3")  # equal to the subclass only
    await wait_until(lambda: len(got.data) == 2, what="both messages")
    assert got.data == [b"1", b"2"]
    assert all(type(s) is str for s in broker._routes)
