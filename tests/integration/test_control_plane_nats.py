"""Signals to an agent in another process, over the real NATS server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from amb import AMB
from control_plane import AgentSignal, KernelSpace, Pattern, Policy
from tests.support import wait_until

pytestmark = pytest.mark.nats

NATS = "nats://127.0.0.1:4222"

AGENT = textwrap.dedent("""
    import asyncio, sys
    from amb import AMB
    from control_plane import KernelSpace, Pattern, Policy

    async def main() -> None:
        name, prefix = sys.argv[1], sys.argv[2]
        policy = Policy("remote", default_action="deny")
        policy.add_rule("allow", Pattern("signal", name, conditions={"sender": "supervisor"}))
        policy.add_rule("allow", Pattern("*", prefix + ".*"))
        policy.add_rule("allow", Pattern("reply", "*"))
        kernel = KernelSpace(policy=policy)
        bus = AMB("nats", "nats://127.0.0.1:4222", agent_id=name)
        kernel.attach(bus)

        async def work(message, metadata) -> None:
            for step in range(1000):
                await bus.publish(prefix + ".progress", step)
                await asyncio.sleep(0.01)
            await bus.publish(prefix + ".finished", True)

        await bus.subscribe(prefix + ".start", work)
        await bus.publish(prefix + ".ready", True)
        while kernel.get_agent_status(name).state != "terminated":
            await asyncio.sleep(0.02)
        print("terminated", flush=True)
        await kernel.close()

    asyncio.run(main())
""")


async def test_sigstop_sigcont_and_sigkill_reach_an_agent_in_another_process() -> None:
    name = f"remote-{uuid.uuid4().hex[:8]}"
    prefix = f"cpnats.{uuid.uuid4().hex[:8]}"
    policy = Policy("supervisor", default_action="allow")
    policy.add_rule("allow", Pattern("*", "*"))
    kernel = KernelSpace(policy=policy)
    bus = AMB("nats", NATS, agent_id="supervisor")
    kernel.attach(bus)
    ready = asyncio.Event()
    progress: list[int] = []
    finished: list[bool] = []

    async def on_ready(message: object, metadata: object) -> None:
        ready.set()

    async def on_progress(message: int, metadata: object) -> None:
        progress.append(message)

    async def on_finished(message: bool, metadata: object) -> None:
        finished.append(message)

    await bus.subscribe(prefix + ".ready", on_ready)
    await bus.subscribe(prefix + ".progress", on_progress)
    await bus.subscribe(prefix + ".finished", on_finished)
    env = {**os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT, name, prefix, stdout=subprocess.PIPE, env=env
    )
    try:
        await asyncio.wait_for(ready.wait(), 20)
        await bus.publish(prefix + ".start", 1)
        await wait_until(lambda: len(progress) >= 3)
        assert await kernel.send_signal(name, AgentSignal.SIGSTOP)
        await asyncio.sleep(0.1)
        paused = len(progress)
        await asyncio.sleep(0.2)
        assert len(progress) <= paused + 1  # held while stopped
        assert await kernel.send_signal(name, AgentSignal.SIGCONT)
        await wait_until(lambda: len(progress) >= paused + 3)
        assert progress == sorted(progress)  # released in order
        assert await kernel.send_signal(name, AgentSignal.SIGKILL)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"terminated"
        seen = len(progress)
        await asyncio.sleep(0.2)
        assert len(progress) <= seen + 1
        assert finished == []
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await bus.close()
        await kernel.close()
