"""``agent-os top`` in a pseudo-terminal against a running control-plane service on NATS: it
shows the agents with their states, counts and held messages and the newest decisions, redraws
as they change, and quits cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import struct
import sys
import termios
import uuid
from pathlib import Path

import aiohttp
import pytest

from agent_os.amb import AMB
from tests.support.processes import TOKEN, start_service
from tests.support.servers import NATS_URL

pytestmark = [pytest.mark.nats, pytest.mark.timeout(120)]

AGENT_OS = Path(sys.executable).with_name("agent-os")
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78])")


class Screen:
    """What a program writes to a pseudo-terminal of 40 rows and 160 columns, ANSI codes
    stripped."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.raw = b""
        self._grew = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the program closed its side
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.raw += chunk
        self._grew.set()

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode(errors="replace"))

    async def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` in what was written so far, waiting for more output
        until there is one; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                found = re.search(pattern, self.text)
                if found:
                    return found
                self._grew.clear()
                await self._grew.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


async def test_top_shows_a_running_control_plane_live(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    ingress, delivery = f"in_{tag}", f"out_{tag}"
    busy, stopped, reader = f"busy-{tag}", f"stopped-{tag}", f"reader-{tag}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: top\ndefault_action: deny\nrules:\n"
        "  - {name: no-secrets, action: deny, resource: 'secrets.*'}\n"
        "  - {name: work, action: allow, resource: 'work.*'}\n"
    )
    service, admin = await start_service(
        "--broker",
        NATS_URL,
        "--trust-bus",
        "--agents",
        reader,
        "--policy",
        str(policy),
        "--recorder",
        "memory",
        "--ingress-prefix",
        ingress,
        "--delivery-prefix",
        delivery,
        "--reply-prefix",
        f"re_{tag}",
        "--queue",
        f"cp_{tag}",
        "--agent-id",
        f"control-plane-{tag}",
    )
    screen = Screen()
    top: asyncio.subprocess.Process | None = None
    agent = AMB("nats", NATS_URL, agent_id=busy)
    quiet = AMB("nats", NATS_URL, agent_id=stopped)
    try:
        for _ in range(5):
            await agent.publish(f"{ingress}.work.item", "x")
        await agent.publish(f"{ingress}.secrets.key", "nope")
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            http.post(f"{admin}/agents/{stopped}/signal", json={"signal": "SIGSTOP"}) as resp,
        ):
            assert resp.status == 200
        await quiet.publish(f"{ingress}.work.item", "held until SIGCONT")

        top = await asyncio.create_subprocess_exec(
            str(AGENT_OS),
            "top",
            "--admin",
            admin,
            "--interval",
            "0.2",
            stdin=screen.slave,
            stdout=screen.slave,
            stderr=screen.slave,
            env={**os.environ, "AGENTOS_ADMIN_TOKEN": TOKEN, "TERM": "xterm-256color"},
        )
        await screen.wait_for(r"1/1 control-plane instances answering")
        # The stopped agent with its held message; the busy one with its 5 allowed publishes and
        # 1 denial (deliveries count for their recipient).
        await screen.wait_for(rf"{stopped}\s+stopped\s+[\d.]+\s+[\d.]+\s+0\s+0\s+1\b")
        await screen.wait_for(rf"{busy}\s+running\s+[\d.]+\s+[\d.]+\s+5\s+1\s+0\b")
        await screen.wait_for(r"last decisions")
        await screen.wait_for(rf"{busy}\s+policy_violation\s+publish secrets\.key deny no-secrets")
        # Live: a new decision shows up without restarting top, with its rate.
        mark = len(screen.raw)
        for _ in range(20):
            await agent.publish(f"{ingress}.work.item", "more")
        await screen.wait_for(rf"{busy}\s+running\s+[\d.]+\s+[\d.]+\s+25\s+1\s+0\b")
        assert len(screen.raw) > mark
        top.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(top.wait(), 10) == 0
    finally:
        if top is not None and top.returncode is None:
            top.kill()
            await top.wait()
        screen.close()
        await agent.close()
        await quiet.close()
        service.send_signal(signal.SIGTERM)
        await asyncio.wait_for(service.wait(), 20)
