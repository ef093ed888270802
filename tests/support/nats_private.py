"""A private nats-server of a test: its own free port and its own configuration (an
``authorization`` block, say), never the shared server. Started and stopped by the test."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def private_nats(config: str, directory: Path) -> AsyncIterator[int]:
    """Run ``nats-server`` with ``config`` (the ``listen`` line is added) in ``directory``;
    yield its port once it accepts connections; stop it afterwards, also when the test fails.
    Skips the test when nats-server is not installed; fails it when the server does not start
    within 5 seconds (a configuration it refuses, say)."""
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed")
    port = free_port()
    conf = directory / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\n" + config)
    proc = await asyncio.create_subprocess_exec(
        binary, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            if proc.returncode is not None:
                pytest.fail(f"nats-server refused the configuration (exit {proc.returncode})")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.025)
                continue
            writer.close()
            await writer.wait_closed()
            break
        else:
            pytest.fail("nats-server did not start within 5 seconds")
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
