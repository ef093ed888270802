"""Services started as processes: ``agent-os serve ...`` and the control-plane service module.

Each helper returns once the process printed its ready line, and fails the test with the
process's log when it did not. The caller stops the process (``stop``, or a signal and a wait
in a ``finally``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

AGENT_OS = Path(sys.executable).with_name("agent-os")
TOKEN = "process-admin-token-0123456789"  # the control-plane service's admin token in these tests


async def start(*args: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``agent-os serve ...`` (the installed console script) with ``env`` added to the
    environment; return it and its ready line (the first line on stdout)."""
    proc = await asyncio.create_subprocess_exec(
        str(AGENT_OS),
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if not line.startswith("ready "):
        err = (await proc.stderr.read()).decode()
        await proc.wait()
        pytest.fail(f"the service did not start: {line!r} {err}")
    return proc, line.strip()


async def stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str]:
    """Signal the service; return its exit code and its log (stderr)."""
    proc.send_signal(sig)
    try:
        returncode = await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    return returncode, (await proc.stderr.read()).decode()


async def start_service(
    *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """Start the control-plane service as a process (``env`` added to the environment, its admin
    token ``TOKEN``); return it and its admin URL (from its ready line)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_os.services.control_plane_service",
        "--admin-port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AGENTOS_ADMIN_TOKEN": TOKEN, **(env or {})},
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if not line.startswith("ready admin="):
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        await proc.wait()
        pytest.fail(f"the service did not start: {line!r} {err}")
    return proc, line.strip().removeprefix("ready admin=")


async def get(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    """GET ``url`` with ``token`` as the bearer token (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.text()
