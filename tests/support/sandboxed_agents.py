"""Agents the sandbox tests start with ``kernel.spawn(fn, sandbox=...)``: this file is loaded
inside the sandbox by the runtime, so it imports nothing of the tests (only the agent API)."""

from __future__ import annotations

import os
import socket
from typing import Any

from agent_os.control_plane.actions.request import ActionRequest
from agent_os.control_plane.actions.sandboxed_agent import Agent, Delivery


async def talker(agent: Agent, prefix: str, key_path: str) -> dict[str, Any]:
    """Publish, ask another agent, submit an allowed, a denied and an impersonating action,
    and look for the key store; the results, for the test to check."""
    message_id = await agent.publish(f"{prefix}.news", {"from": agent.agent_id})
    answer = await agent.request(f"{prefix}.ask", "what time is it", timeout=10)
    allowed = await agent.submit(ActionRequest("fs.write", "notes.txt", {"content": "hello"}))
    denied = await agent.submit(ActionRequest("fs.write", "secret.txt", {"content": "x"}))
    other = await agent.submit(ActionRequest("fs.write", "notes.txt", {"content": "x"}, "someone-else"))
    try:
        with open(key_path, "rb"):  # noqa: ASYNC230 (the probe is the point)
            key = "readable"
    except OSError as exc:
        key = type(exc).__name__
    return {
        "agent_id": agent.agent_id,
        "message_id": message_id,
        "answer": answer,
        "allowed": [allowed.allowed, allowed.error],
        "denied": [denied.allowed, denied.error],
        "other": [other.allowed, other.error],
        "key": key,
        "key_dir_exists": os.path.exists(os.path.dirname(key_path)),  # noqa: ASYNC240
    }


async def responder(agent: Agent, subject: str, count: int) -> list[Any]:
    """Answer ``count`` requests on ``subject``, then return what was asked and by whom."""
    seen: list[Any] = []
    done = __import__("asyncio").Event()

    async def answer(message: Any, delivery: Delivery) -> None:
        seen.append([message, delivery.sender, delivery.verified])
        await agent.reply(delivery, f"answer to {message}")
        if len(seen) >= count:
            done.set()

    await agent.subscribe(subject, answer)
    await agent.publish(f"{subject}.ready", "ready")
    await done.wait()
    return seen


async def echo(agent: Agent, value: Any = None) -> Any:
    """Return ``value`` at once: the first channel call answered is the start."""
    return value


async def submit_once(agent: Agent) -> bool:
    """One governed action from inside the sandbox (the benchmark's)."""
    result = await agent.submit(ActionRequest("fs.read", "data.txt"))
    return result.ok


async def submit_many(agent: Agent, rounds: int) -> list[float]:
    """``rounds`` governed actions, each timed inside the sandbox (seconds)."""
    import time

    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = await agent.submit(ActionRequest("fs.read", "data.txt"))
        times.append(time.perf_counter() - started)
        if not result.ok:
            raise RuntimeError(result.error)
    return times


async def busy(agent: Agent) -> None:
    """A busy loop that never looks at signals."""
    await agent.publish("sandbox.busy.started", agent.agent_id)
    while True:
        pass


# -- the five hostile attempts: each must fail in the OS ------------------------------------


async def open_socket(agent: Agent) -> None:
    socket.create_connection(("1.1.1.1", 80), timeout=5).close()


async def read_shadow(agent: Agent) -> str:
    with open("/etc/shadow") as f:  # noqa: ASYNC230 (a hostile attempt)
        return f.read()


async def write_outside(agent: Agent) -> None:
    with open("/usr/lib/agent-os-escape", "w") as f:  # noqa: ASYNC230 (a hostile attempt)
        f.write("escaped")


async def fork_bomb(agent: Agent) -> None:
    while True:
        os.fork()


async def allocate(agent: Agent) -> int:
    block = bytearray(4 << 30)
    return len(block)


async def malformed(agent: Agent) -> None:
    """Write garbage on the channel: a frame announcing 4 bytes that are not msgpack."""
    channel = agent._peer.channel  # the agent can reach its own socket; nothing stops garbage
    channel._writer.write(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
    await channel._writer.drain()
    while True:
        await __import__("asyncio").sleep(1)


# -- a hostile agent on the bus: the platform's own subjects stay out of reach ------------------


async def snooper(agent: Agent, prefix: str) -> dict[str, Any]:
    """Subscribe to wildcards that would cover the platform's control and reply subjects,
    answer every request that reaches it (a forged signal acknowledgement), and publish on a
    control subject; return which subscriptions were refused and what was delivered."""
    import asyncio

    from agent_os.control_plane.errors import RemoteError

    seen: list[str] = []
    refused: list[str] = []
    stop = asyncio.Event()

    async def on_any(message: Any, delivery: Delivery) -> None:
        if delivery.topic == f"{prefix}.snoop.stop":
            stop.set()
            return
        seen.append(delivery.topic)
        if delivery.expects_reply:
            await agent.reply(delivery, {"ok": True, "forged": True})

    for pattern in (">", "*.>", "*.signal.>", "_ctl.>", "_INBOX.>", "*.*.victim"):
        try:
            await agent.subscribe(pattern, on_any)
        except RemoteError as exc:
            refused.append(f"{pattern} {exc.kind}")
    await agent.subscribe(f"{prefix}.>", on_any)  # a wildcard under its own first token is fine
    try:
        await agent.publish("_ctl.signal.victim", {"signal": "SIGKILL"})
        published = "published"
    except RemoteError as exc:
        published = exc.kind
    await agent.publish(f"{prefix}.snoop.ready", "ready")
    await asyncio.wait_for(stop.wait(), 60)
    return {"seen": sorted(set(seen)), "refused": refused, "control_publish": published}
