"""The sandbox channel (agent_os.control_plane.sandbox.channel): frames, calls both ways, and a
hostile other end that cannot take this end down."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from agent_os.control_plane.errors import ChannelClosed, ChannelError, RemoteError
from agent_os.control_plane.sandbox.channel import MAX_FRAME, Channel, Peer, SyncPeer, decode, encode


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, socket.socket]]:
    """An asyncio channel and the raw socket of its other end."""
    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours)
    try:
        yield channel, theirs
    finally:
        await channel.close()
        theirs.close()


def test_frames_round_trip_and_refuse_what_cannot_be_sent() -> None:
    frame = encode({"op": "x", "data": b"\x00\xff", "n": [1, 2.5, None]})
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode(frame[4:]) == {"op": "x", "data": b"\x00\xff", "n": [1, 2.5, None]}
    with pytest.raises(ChannelError, match="cannot send"):
        encode({"f": object()})
    with pytest.raises(ChannelError, match="over the"):
        encode(b"x" * (MAX_FRAME + 1))
    for garbage in (b"\xc1", b"\x92\x01", msgpack.packb(1) + b"\x01", msgpack.packb({1: 2})):
        with pytest.raises(ChannelError, match="malformed"):
            decode(garbage)


async def test_an_over_long_announced_frame_is_refused_before_reading_it(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, theirs = pair
    theirs.sendall(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ChannelError, match="over the"):
        await channel.receive()


async def test_a_cut_off_frame_is_an_error_and_a_clean_end_is_closed(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, theirs = pair
    theirs.sendall(struct.pack(">I", 10) + b"abc")
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelError, match="cut off"):
        await channel.receive()


async def test_calls_both_ways_with_remote_errors() -> None:
    a_sock, b_sock = socket.socketpair()
    calls: list[Any] = []

    async def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    async def refuse(reason: str) -> None:
        raise PermissionError(reason)

    a = Peer(await Channel.open(a_sock), {"add": add, "refuse": refuse})
    b = Peer(await Channel.open(b_sock), {"echo": lambda **kw: _value(kw)})
    runs = [asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())]
    try:
        assert await b.call("add", {"x": 2, "y": 3}) == 5
        assert await a.call("echo", {"v": [1, "two"]}) == {"v": [1, "two"]}
        with pytest.raises(RemoteError) as refused:
            await b.call("refuse", {"reason": "no network"})
        assert (refused.value.kind, refused.value.text) == ("PermissionError", "no network")
        with pytest.raises(RemoteError, match="unknown operation"):
            await b.call("nope")
        with pytest.raises(RemoteError, match="TypeError"):
            await b.call("add", {"x": 1})
        results = await asyncio.gather(*(b.call("add", {"x": i, "y": i}) for i in range(50)))
        assert results == [2 * i for i in range(50)]
    finally:
        await a.close()
        await b.close()
        await asyncio.gather(*runs, return_exceptions=True)


async def _value(kwargs: dict[str, Any]) -> dict[str, Any]:
    return kwargs


async def test_a_flood_of_calls_is_served_a_bounded_number_at_a_time() -> None:
    a_sock, b_sock = socket.socketpair()
    running = 0
    most = 0
    release = asyncio.Event()

    async def slow() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    a = Peer(await Channel.open(a_sock), {"slow": slow}, max_serving=4)
    b = Peer(await Channel.open(b_sock))
    runs = [asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())]
    try:
        calls = [asyncio.ensure_future(b.call("slow")) for _ in range(40)]
        deadline = asyncio.get_running_loop().time() + 5
        while most < 4:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the rest are unread frames, not tasks
        assert (most, len(a._tasks)) == (4, 4)
        release.set()
        await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert most == 4
        with pytest.raises(ValueError, match="max_serving"):
            Peer(a.channel, max_serving=0)
    finally:
        await a.close()
        await b.close()
        await asyncio.gather(*runs, return_exceptions=True)


async def test_a_hostile_frame_closes_the_channel_and_fails_waiting_calls(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, theirs = pair
    peer = Peer(channel)
    run = asyncio.ensure_future(peer.run())
    waiting = asyncio.ensure_future(peer.call("slow"))
    request = await asyncio.get_running_loop().run_in_executor(None, SyncPeer(theirs).receive)
    assert request["op"] == "slow"
    theirs.sendall(encode({"t": "reply", "id": 999, "ok": True, "value": 1}))  # a reply to no call
    with pytest.raises(ChannelError, match="reply to no call"):
        await run
    with pytest.raises(ChannelClosed):
        await waiting
    with pytest.raises(ChannelClosed):
        await peer.call("after")


@pytest.mark.parametrize(
    "frame",
    [[1, 2], {"t": "call", "id": 1, "op": 5, "args": {}}, {"t": "call", "id": 1, "op": "x", "args": [1]}],
)
async def test_frames_that_are_not_calls_replies_or_notes_are_refused(
    pair: tuple[Channel, socket.socket], frame: Any
) -> None:
    channel, theirs = pair
    theirs.sendall(encode(frame))
    with pytest.raises(ChannelError):
        await Peer(channel).run()


async def test_the_blocking_side_calls_an_asyncio_peer() -> None:
    host_sock, inside_sock = socket.socketpair()

    async def submit(action: str) -> dict[str, Any]:
        if action == "net.http":
            raise PermissionError("agent lacks permission 'network'")
        return {"allowed": True, "action": action}

    host = Peer(await Channel.open(host_sock), {"submit": submit})
    run = asyncio.ensure_future(host.run())
    inside = SyncPeer(inside_sock)
    answers: list[Any] = []

    def sandbox_side() -> None:
        answers.append(inside.call("submit", {"action": "fs.read"}))
        try:
            inside.call("submit", {"action": "net.http"})
        except RemoteError as exc:
            answers.append(exc.kind)
        inside_sock.close()

    thread = threading.Thread(target=sandbox_side)
    thread.start()
    try:
        await asyncio.wait_for(run, 10)
    finally:
        thread.join(10)
        with contextlib.suppress(Exception):
            await host.close()
    assert answers == [{"allowed": True, "action": "fs.read"}, "PermissionError"]
