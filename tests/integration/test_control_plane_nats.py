"""Signals to an agent in another process, over the real NATS server.

Senders are verified by IATP on both sides: over NATS a claimed ``sender_id`` is not a sender
(the mediator trusts claims only on the in-process memory broker or with ``trust_bus=True``),
so a policy condition on ``sender`` is met only by a signed message.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from agent_os.amb import AMB, RequestTimeout
from agent_os.control_plane import DECISION_EVENTS, AgentSignal, KernelSpace, Pattern, Policy, control_subject
from agent_os.iatp import IATP
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


PASSPHRASE = "cp-nats-test-passphrase"

AGENT = textwrap.dedent("""
    import asyncio, sys
    from agent_os.amb import AMB
    from agent_os.control_plane import KernelSpace, Pattern, Policy
    from agent_os.iatp import IATP

    async def main() -> None:
        name, prefix, keys, passphrase = sys.argv[1:5]
        iatp = IATP("file", key_path=keys, passphrase=passphrase, kdf_level="interactive")
        policy = Policy("remote", default_action="deny")
        policy.add_rule("allow", Pattern("signal", name, conditions={"sender": "supervisor"}))
        policy.add_rule("allow", Pattern("*", prefix + ".*"))
        policy.add_rule("allow", Pattern("reply", "*"))
        kernel = KernelSpace(policy=policy)
        bus = AMB("nats", "nats://127.0.0.1:4222", agent_id=name, middleware=[iatp.middleware()])
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


async def test_sigstop_sigcont_and_sigkill_reach_an_agent_in_another_process(
    tmp_path: Path, closing: Closing
) -> None:
    name = f"remote-{uuid.uuid4().hex[:8]}"
    prefix = f"cpnats.{uuid.uuid4().hex[:8]}"
    # The agent's key store (its own key, the supervisor's public identity) for the process.
    keys = tmp_path / "agent-keys"
    agent_keys = IATP("file", key_path=str(keys), passphrase=PASSPHRASE, kdf_level="interactive")
    await agent_keys.register_agent(name)
    supervisor_keys = IATP()
    await supervisor_keys.register_agent("supervisor")
    await agent_keys.add_identity(supervisor_keys.identity("supervisor"))
    await supervisor_keys.add_identity(agent_keys.identity(name))
    policy = Policy("supervisor", default_action="allow")
    policy.add_rule("allow", Pattern("*", "*"))
    kernel = closing(KernelSpace(policy=policy))
    bus = closing(AMB("nats", NATS_URL, agent_id="supervisor", middleware=[supervisor_keys.middleware()]))
    kernel.attach(bus)
    ready = asyncio.Event()
    progress: list[int | str] = []
    finished: list[bool] = []

    async def on_ready(message: object, metadata: object) -> None:
        ready.set()

    async def on_progress(message: int | str, metadata: object) -> None:
        progress.append(message)

    async def sentinel(name: str) -> list[int | str]:
        """Publish ``name`` on the progress subject and wait for it: the agent's progress
        published before it reached the server first has arrived once it has (the server
        delivers to the subscription in the order it processed the messages). Returns the
        agent's progress, sentinels left out."""
        await bus.publish(prefix + ".progress", name)
        await wait_until(lambda: name in progress, what=name)
        return [p for p in progress if isinstance(p, int)]

    async def on_finished(message: bool, metadata: object) -> None:
        finished.append(message)

    await bus.subscribe(prefix + ".ready", on_ready)
    await bus.subscribe(prefix + ".progress", on_progress)
    await bus.subscribe(prefix + ".finished", on_finished)
    env = {**os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT, name, prefix, str(keys), PASSPHRASE, stdout=subprocess.PIPE, env=env
    )
    forger = AMB("nats", NATS_URL, agent_id=f"forger-{uuid.uuid4().hex[:8]}")
    try:
        await asyncio.wait_for(ready.wait(), 20)
        await bus.publish(prefix + ".start", 1)
        await wait_until(lambda: len(progress) >= 3)
        # A third client claiming to be the supervisor is refused (unsigned: IATP dead-letters it).
        with pytest.raises(RequestTimeout):
            await forger.request(
                control_subject(name), {"signal": "SIGKILL"}, sender_id="supervisor", timeout=0.5
            )
        seen = len(progress)
        await wait_until(lambda: len(progress) >= seen + 3)  # still working
        assert await kernel.send_signal(name, AgentSignal.SIGSTOP)
        # The agent answered the SIGSTOP after stopping, on the connection its progress goes
        # out on: what it published before is ahead of the answer, so ahead of the sentinel.
        paused = len(await sentinel("stopped"))
        # Held while stopped. A quiet period is the point here: a running agent publishes
        # every 10 ms, so 0.2 s of silence shows it is not (a publish already past the
        # mediator at the stop may still arrive).
        await asyncio.sleep(0.2)
        assert len(await sentinel("still stopped")) <= paused + 1
        assert await kernel.send_signal(name, AgentSignal.SIGCONT)
        await wait_until(lambda: len([p for p in progress if isinstance(p, int)]) >= paused + 3)
        steps = [p for p in progress if isinstance(p, int)]
        assert steps == sorted(steps)  # released in order
        assert await kernel.send_signal(name, AgentSignal.SIGKILL)
        seen = len([p for p in progress if isinstance(p, int)])
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"terminated"
        await asyncio.wait_for(proc.wait(), 20)
        # The agent's process has exited: everything it published reached the server before
        # the sentinel, which the supervisor publishes now.
        assert len(await sentinel("killed")) <= seen + 1  # at most a publish on the wire
        assert finished == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await forger.close()
        await bus.close()
        await kernel.close()


async def test_a_claimed_sender_does_not_meet_a_sender_condition_over_nats(closing: Closing) -> None:
    """The reproduced finding: the victim's policy allows ``signal`` only from "supervisor"; a
    third client sent request("_ctl.signal.victim", SIGKILL, sender_id="supervisor") and the
    victim was terminated. Over NATS without IATP the claim is not a sender: the signal is
    denied (recorded with ``sender`` None and the claim beside it) and the victim runs on."""
    victim_id = f"victim-{uuid.uuid4().hex[:8]}"
    policy = Policy("victim", default_action="deny")
    policy.add_rule("allow", Pattern("signal", victim_id, conditions={"sender": "supervisor"}))
    policy.add_rule("allow", Pattern("reply", "*"))
    kernel = closing(KernelSpace(policy=policy))
    victim = closing(AMB("nats", NATS_URL, agent_id=victim_id))
    kernel.attach(victim)  # no IATP, no trust_bus: claims over NATS are not senders
    await victim.connect()
    watcher = closing(AMB("nats", NATS_URL))
    dead = Collector()
    await watcher.subscribe(f"_DLQ.{control_subject(victim_id)}", dead)
    forger = AMB("nats", NATS_URL, agent_id="forger")
    try:
        with pytest.raises(RequestTimeout):
            await forger.request(
                control_subject(victim_id), {"signal": "SIGKILL"}, sender_id="supervisor", timeout=1.0
            )
        await dead.wait_for(1)
        assert kernel.get_agent_status(victim_id).state == "running"
        decision = (await kernel.recorder.query(event_type=DECISION_EVENTS))[0]
        assert (decision.data["operation"], decision.data["decision"]) == ("signal", "deny")
        assert (decision.data["sender"], decision.data["claimed_sender"]) == (None, "supervisor")
        assert await kernel.recorder.query(event_type="signal") == []
    finally:
        for client in (forger, watcher, victim):
            await client.close()
        await kernel.close()
