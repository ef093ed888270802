"""A nats-server process of the test's own (the ``nats-server`` binary of this machine), for
tests that take the server down or need a setting the shared one lacks (a short protocol line).
The shared server is in ``servers``; use this one only where the shared one cannot serve."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateNats:
    """``nats-server`` on 127.0.0.1:<port> with ``settings`` (config-file lines); ``start`` and
    ``stop`` may be called again (a restart keeps the port). Skips the test without the binary."""

    def __init__(self, workdir: Path, settings: str = "") -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.skip("no nats-server binary on this machine")
        self.binary = binary
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.config = workdir / "nats.conf"
        self.config.write_text(f"listen: 127.0.0.1:{self.port}\n{settings}\n")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):  # up to 10 s for the port to answer
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise AssertionError(f"nats-server did not listen on {self.port}")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
