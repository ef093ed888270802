"""Frames and calls between the kernel and a sandbox, over a Unix stream socket.

A frame is a 4-byte big-endian length and a msgpack body of at most :data:`MAX_FRAME` bytes.
On frames, :class:`Peer` (asyncio, either side) and :class:`SyncPeer` (blocking, for code
running inside a sandbox) make calls: ``{"t": "call", "id", "op", "args"}`` answered by
``{"t": "reply", "id", "ok", "value" | "error": [kind, message]}``, and one-way
``{"t": "note", "op", "args"}``. A malformed frame from the other end closes the channel
(ChannelError): the sandbox side is never trusted to be well-behaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import msgpack

from agent_os.amb.numbers import whole
from agent_os.control_plane.errors import ChannelClosed, ChannelError, RemoteError

log = logging.getLogger(__name__)

MAX_FRAME: Final = 16 << 20
"""The largest frame body, in bytes; a longer one is refused on both ends."""

_HEADER: Final = struct.Struct(">I")

Handler = Callable[..., Awaitable[Any]]
"""An operation a :class:`Peer` serves: called with the call's ``args`` as keyword arguments."""


def encode(obj: Any) -> bytes:
    """One frame holding ``obj``. Raises ChannelError when it cannot be packed or is too long."""
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ChannelError(f"cannot send {type(obj).__name__}: {exc}") from exc
    if len(body) > MAX_FRAME:
        raise ChannelError(f"frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    """The object in a frame's body. Raises ChannelError for bytes that are not msgpack."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ChannelError(f"malformed frame: {exc}") from exc


def _length(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ChannelError(f"frame of {size} bytes announced, over the {MAX_FRAME}-byte limit")
    return int(size)


class Channel:
    """Frames over an asyncio stream (``await Channel.open(sock)``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        """A channel on a connected stream socket (one end of a ``socketpair``)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME + _HEADER.size)
        return cls(reader, writer)

    async def send(self, obj: Any) -> None:
        """Send one frame. Raises ChannelError (cannot pack), ChannelClosed."""
        frame = encode(obj)
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ChannelClosed(f"channel closed: {exc}") from exc

    async def receive(self) -> Any:
        """The next frame's object. Raises ChannelClosed at the end of the stream, ChannelError
        for a malformed, over-long or cut-off frame."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ChannelError("frame header cut off") from exc
            raise ChannelClosed("channel closed") from exc
        except ConnectionError as exc:
            raise ChannelClosed(f"channel closed: {exc}") from exc
        try:
            body = await self._reader.readexactly(_length(header))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelError("frame body cut off") from exc
        return decode(body)

    async def close(self) -> None:
        """Close the stream; idempotent."""
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class Peer:
    """Calls both ways over a :class:`Channel`: :meth:`call` the other end, serve its calls
    with ``handlers`` (op name to coroutine function), each in its own task.

    :meth:`run` reads until the channel ends; it returns normally at a clean close and raises
    ChannelError after a malformed frame, a frame that is not a call, reply or note, or a
    reply to no call (the channel is closed first). Calls waiting when it ends raise
    ChannelClosed. At most ``max_serving`` calls and notes of the other end are served at
    once; while that many run, the channel is not read (the other end cannot make this end
    hold an unbounded number of tasks)."""

    def __init__(
        self, channel: Channel, handlers: Mapping[str, Handler] | None = None, *, max_serving: int = 256
    ) -> None:
        whole(max_serving, "max_serving", error=ValueError)
        self.channel = channel
        self.handlers = dict(handlers or {})
        self.max_serving = max_serving
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Call ``op`` on the other end and return its value. Raises RemoteError (it failed
        there), ChannelClosed, ChannelError (``args`` cannot be sent)."""
        if self._closed:
            raise ChannelClosed("channel closed")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            await self.channel.send({"t": "call", "id": call_id, "op": op, "args": dict(args or {})})
            return await future
        finally:
            self._pending.pop(call_id, None)

    async def notify(self, op: str, args: Mapping[str, Any] | None = None) -> None:
        """Send a one-way note (no answer, errors there are only logged)."""
        await self.channel.send({"t": "note", "op": op, "args": dict(args or {})})

    async def run(self) -> None:
        """Serve the channel until it ends (see the class)."""
        try:
            while True:
                while len(self._tasks) >= self.max_serving:
                    await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                try:
                    frame = await self.channel.receive()
                except ChannelClosed:
                    return
                self._dispatch(frame)
        finally:
            await self.close()

    def _dispatch(self, frame: Any) -> None:
        kind = frame.get("t") if isinstance(frame, dict) else None
        if kind == "reply":
            future = self._pending.get(frame.get("id"))
            if future is None:
                raise ChannelError(f"a reply to no call: {frame.get('id')!r}")
            if future.done():
                return
            if frame.get("ok") is True:
                future.set_result(frame.get("value"))
            else:
                future.set_exception(_remote(frame.get("error")))
        elif kind in ("call", "note"):
            op, args = frame.get("op"), frame.get("args")
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ChannelError(f"malformed {kind}: op {op!r}, args {type(args).__name__}")
            task = asyncio.get_running_loop().create_task(self._serve(kind, frame.get("id"), op, args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            raise ChannelError(f"a frame that is not a call, reply or note: {str(frame)[:80]!r}")

    async def _serve(self, kind: str, call_id: Any, op: str, args: dict[str, Any]) -> None:
        handler = self.handlers.get(op)
        try:
            if handler is None:
                raise LookupError(f"unknown operation {op!r}")
            value = await handler(**args)
            reply: dict[str, Any] = {"t": "reply", "id": call_id, "ok": True, "value": value}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the other end gets the failure; this end stays up
            if kind == "note":
                log.warning("sandbox note %s failed: %s", op, exc)
                return
            reply = {"t": "reply", "id": call_id, "ok": False, "error": [type(exc).__name__, str(exc)]}
        if kind == "call":
            try:
                await self.channel.send(reply)
            except ChannelError as exc:  # a value that cannot be sent: say so instead
                await self.channel.send(
                    {"t": "reply", "id": call_id, "ok": False, "error": ["ChannelError", str(exc)]}
                )
            except ChannelClosed:
                pass

    async def close(self) -> None:
        """Close the channel, cancel calls being served, fail calls waiting; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed("channel closed before the answer"))
        await self.channel.close()


def _remote(error: Any) -> RemoteError:
    if isinstance(error, list) and len(error) == 2 and all(isinstance(e, str) for e in error):
        return RemoteError(error[0], error[1])
    return RemoteError("RemoteError", f"malformed error {error!r}")


class SyncPeer:
    """The blocking side, for code inside a sandbox that is not asynchronous (a code runner):
    :meth:`call` sends a call and reads frames until its reply; :meth:`receive` reads the next
    frame. Not thread-safe: one caller at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._ids = itertools.count(1)

    def send(self, obj: Any) -> None:
        """Send one frame. Raises ChannelError, ChannelClosed."""
        try:
            self.sock.sendall(encode(obj))
        except OSError as exc:
            raise ChannelClosed(f"channel closed: {exc}") from exc

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                if left == size and size == _HEADER.size:
                    raise ChannelClosed("channel closed")
                raise ChannelError("frame cut off")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> Any:
        """The next frame's object. Raises ChannelClosed, ChannelError."""
        return decode(self._read(_length(self._read(_HEADER.size))))

    def reply(self, call_id: Any, value: Any = None, error: BaseException | None = None) -> None:
        """Answer the other end's call ``call_id`` with ``value``, or with ``error``."""
        if error is None:
            try:
                self.send({"t": "reply", "id": call_id, "ok": True, "value": value})
                return
            except ChannelError as exc:
                error = exc
        self.send({"t": "reply", "id": call_id, "ok": False, "error": [type(error).__name__, str(error)]})

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Call ``op`` on the other end and wait for its reply. Raises RemoteError,
        ChannelClosed, ChannelError (including a frame other than this call's reply)."""
        call_id = next(self._ids)
        self.send({"t": "call", "id": call_id, "op": op, "args": dict(args or {})})
        frame = self.receive()
        if not isinstance(frame, dict) or frame.get("t") != "reply" or frame.get("id") != call_id:
            raise ChannelError(f"expected the reply to call {call_id}, got {str(frame)[:80]!r}")
        if frame.get("ok") is True:
            return frame.get("value")
        raise _remote(frame.get("error"))
