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


def any_metrics_port(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` with ``--metrics-port 0`` (any free port: tests run side by side) unless they
    choose a metrics port or none."""
    if "--metrics-port" in args or "--no-metrics" in args:
        return args
    return (*args, "--metrics-port", "0")


def metrics_url(ready: str) -> str:
    """The metrics URL a service's ready line names."""
    for word in ready.split():
        if word.startswith("metrics="):
            return word.removeprefix("metrics=")
    raise AssertionError(f"no metrics URL in {ready!r}")


async def start(*args: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``agent-os serve ...`` (the installed console script) with ``env`` added to the
    environment, on any free metrics port unless ``args`` choose one (:func:`any_metrics_port`);
    return it and its ready line (the first line on stdout)."""
    proc = await asyncio.create_subprocess_exec(
        str(AGENT_OS),
        "serve",
        *any_metrics_port(args),
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
    token ``TOKEN``, any free admin and metrics ports unless ``args`` choose them); return it and
    its admin URL (from its ready line)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_os.services.control_plane_service",
        "--admin-port",
        "0",
        *any_metrics_port(args),
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
    return proc, line.split()[1].removeprefix("admin=")


async def get(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    """GET ``url`` with ``token`` as the bearer token (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.text()
