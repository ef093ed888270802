"""A TCP relay in front of a real server that a test can hold (replies kept back) or cut
(connections closed, new ones refused): an outage of the real server at a moment the test picks."""

from __future__ import annotations

import asyncio
import contextlib


class TcpGate:
    """Relays ``127.0.0.1:<port>`` to ``host:port``; ``received`` holds what clients sent."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.received = bytearray()
        self._open = asyncio.Event()
        self._open.set()
        self._refusing = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpGate:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def hold(self) -> None:
        """Keep the server's replies back (requests still reach it) until :meth:`restore`."""
        self._open.clear()

    def cut(self) -> None:
        """Close every connection and refuse new ones until :meth:`restore`."""
        self._refusing = True
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self._refusing = False
        self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers.update((writer, up_writer))
        loop = asyncio.get_running_loop()
        for task in (
            loop.create_task(self._pump(reader, up_writer, record=True)),
            loop.create_task(self._pump(up_reader, writer, record=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, record: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if record:
                    self.received += chunk
                else:
                    await self._open.wait()
                if self._refusing or writer.is_closing():
                    break
                writer.write(chunk)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a cut connection: the other side sees it closed
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
