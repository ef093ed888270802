"""``python -m agent_os.services.control_plane_service``: starts, serves its admin API, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from agent_os.control_plane import FlightRecorder
from agent_os.control_plane.errors import RecorderConfigError
from agent_os.services._process import broker_backend
from agent_os.services.control_plane_service import read_key_file, recorder_from_spec
from tests.support.closing import Closing
from tests.support.processes import TOKEN, get, start_service


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_service_process_serves_and_stops_cleanly(
    tmp_path: Path, sig: signal.Signals, closing: Closing
) -> None:
    db = tmp_path / "audit.db"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: svc\nversion: '3'\ndefault_action: deny\nrules:\n  - action: allow\n"
        "    operation: publish\n    resource: 'tasks.*'\n"
    )
    proc, admin = await start_service(
        "--broker",
        "memory://cp-process",
        "--trust-bus",
        "--policy",
        str(policy),
        "--recorder",
        f"sqlite:{db}",
    )
    try:
        assert await get(admin + "/healthz", None) == (200, '{"ok": true}')
        status, metrics = await get(admin + "/metrics")
        assert status == 200
        assert "agentos_control_plane_forwarded_total 0.0" in metrics
        assert "agentos_recorder_records_appended_total" in metrics
        assert (await get(admin + "/agents", "wrong-token-000000000000"))[0] == 401
        status, body = await get(admin + "/verify")
        assert (status, '"ok": true' in body) == (200, True)
    finally:
        proc.send_signal(sig)
        returncode = await asyncio.wait_for(proc.wait(), 20)
    assert returncode == 0
    assert db.exists()  # the recorder was opened on the file and closed with it
    rec = closing(FlightRecorder("sqlite", str(db)))
    assert (await rec.verify()).ok
    await rec.close()


async def test_a_bad_policy_file_fails_at_start_with_the_line(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("name: p\nrules:\n  - action: maybe\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_os.services.control_plane_service",
        "--broker",
        "memory://x",
        "--trust-bus",
        "--policy",
        str(policy),
        "--recorder",
        "memory",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AGENTOS_ADMIN_TOKEN": TOKEN},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2  # a usage error: the command line was refused before anything started
    assert "Error: Invalid value for '--policy': line 3" in err.decode()


def test_configuration_helpers(tmp_path: Path) -> None:
    assert broker_backend("nats://127.0.0.1:4222") == "nats"
    assert broker_backend("memory://x") == "memory"
    with pytest.raises(ValueError, match="unsupported broker URL"):
        broker_backend("amqp://host")
    assert recorder_from_spec("memory").storage.__class__.__name__ == "MemoryStorage"
    assert getattr(recorder_from_spec("sqlite:///rel.db").storage, "path", None) == "rel.db"
    assert getattr(recorder_from_spec("sqlite:////abs/a.db").storage, "path", None) == "/abs/a.db"
    with pytest.raises(RecorderConfigError):
        recorder_from_spec("memory", encryption_key=b"k" * 32)
    (tmp_path / "hex.key").write_text("ab" * 32 + "\n")
    (tmp_path / "raw.key").write_bytes(b"\x01" * 32)
    (tmp_path / "bad.key").write_bytes(b"short")
    assert read_key_file(str(tmp_path / "hex.key")) == b"\xab" * 32
    assert read_key_file(str(tmp_path / "raw.key")) == b"\x01" * 32
    with pytest.raises(ValueError, match="32 raw bytes"):
        read_key_file(str(tmp_path / "bad.key"))
