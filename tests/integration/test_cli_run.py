"""``agent-os run`` as a process: an agent script in a real sandbox talks over NATS to an agent in
this process (signed with a key only the ``run`` process holds), acts through its kernel, and
ends with its result as JSON; a hostile script ends with exit 1 and the recorded reason."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from agent_os.control_plane import FlightRecorder
from agent_os.iatp import IATP, RESULT
from agent_os.services._identity import PASSPHRASE_ENV
from tests.support.identities import PASSPHRASE
from tests.support.servers import NATS_URL

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root (docs/sandbox.md)"),
    pytest.mark.nats,
]

CLI = [sys.executable, "-m", "agent_os.cli", "run"]

SCRIPT = """
from agent_os.control_plane.actions.request import ActionRequest


async def main(agent, prefix):
    print("starting", agent.agent_id, flush=True)
    await agent.publish(prefix + ".news", "hello from the sandbox")
    answer = await agent.request(prefix + ".ask", 20, timeout=10)
    wrote = await agent.submit(ActionRequest("fs.write", "result.txt", {"content": str(answer)}))
    refused = await agent.submit(ActionRequest("fs.write", "secret.txt", {"content": "x"}))
    return {"answer": answer, "wrote": wrote.ok, "refused": refused.error}
"""

HOSTILE = """
async def main(agent):
    with open("/etc/shadow") as f:
        return f.read()
"""

POLICY = """
name: run-test
default_action: allow
rules:
  - action: deny
    operation: write
    resource: "*secret*"
    match_type: glob
    reason: no secrets
"""


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()


async def test_agent_os_run_end_to_end(tmp_path: Path, prefix: str) -> None:
    store = IATP("file", key_path=str(tmp_path / "keys"), passphrase=PASSPHRASE, kdf_level="interactive")
    peer_keys = IATP()
    await store.register_agent("cli-agent")
    await peer_keys.register_agent("peer")
    await store.add_identity(peer_keys.identity("peer"))
    await peer_keys.add_identity(store.identity("cli-agent"))
    (tmp_path / "agent.py").write_text(SCRIPT)
    (tmp_path / "policy.yaml").write_text(POLICY)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    db = tmp_path / "records.db"

    heard: list[Any] = []

    async def on_news(message: Any, metadata: Metadata) -> None:
        heard.append((message, metadata.context[RESULT].sender, metadata.context[RESULT].valid))

    async with AMB("nats", NATS_URL, agent_id="peer", middleware=[peer_keys.middleware()]) as peer:

        async def on_ask(message: Any, metadata: Metadata) -> None:
            await peer.reply(metadata, message + 22)

        await peer.subscribe(f"{prefix}.news", on_news)
        await peer.subscribe(f"{prefix}.ask", on_ask)
        status, out, err = await run_cli(
            str(tmp_path / "agent.py"),
            "--agent-id", "cli-agent",
            "--arg", f"prefix={prefix}",
            "--broker", NATS_URL,
            "--identities", str(tmp_path / "keys"),
            "--policy", str(tmp_path / "policy.yaml"),
            "--workspace", str(workspace),
            "--recorder", f"sqlite:///{db}",
            env={PASSPHRASE_ENV: PASSPHRASE},
        )  # fmt: skip
    assert status == 0, err
    outcome = json.loads(out)
    assert outcome == {
        "agent": "cli-agent",
        "status": "completed",
        "result": {"answer": 42, "wrote": True, "refused": "no secrets"},
    }
    assert "[cli-agent] starting cli-agent" in err
    assert heard == [("hello from the sandbox", "cli-agent", True)]
    assert (workspace / "result.txt").read_text() == "42"
    async with FlightRecorder("sqlite", str(db)) as recorder:
        events = [r.event_type for r in await recorder.query(agent_id="cli-agent")]
        assert (await recorder.verify()).ok
    assert events[0] == "agent_started"
    assert events[-1] == "agent_completed"
    assert "policy_violation" in events
    assert events.count("action_outcome") == 1


async def test_agent_os_run_reports_a_hostile_agent(tmp_path: Path) -> None:
    (tmp_path / "hostile.py").write_text(HOSTILE)
    status, out, err = await run_cli(str(tmp_path / "hostile.py"), "--policy", "permissive")
    assert status == 1, err
    outcome = json.loads(out)
    assert outcome["status"] == "failed"
    assert "PermissionError EACCES" in outcome["reason"]
