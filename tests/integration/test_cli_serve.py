"""``agent-os serve control-plane`` as a process on the in-memory broker: starts, prints its
ready line, and exits 0 on SIGTERM and SIGINT."""

from __future__ import annotations

import signal

import pytest

from tests.support.processes import start, stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_control_plane_runs_the_service_process(sig: signal.Signals) -> None:
    proc, ready = await start(
        "control-plane",
        "--broker",
        "memory://cli-cp",
        "--trust-bus",
        "--recorder",
        "memory",
        "--admin-port",
        "0",
        env={"AGENTOS_ADMIN_TOKEN": "cli-test-token-0123456789"},
    )
    try:
        assert ready.startswith("ready admin=http://127.0.0.1:")
        returncode, log = await stop(proc, sig)
        assert returncode == 0, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
