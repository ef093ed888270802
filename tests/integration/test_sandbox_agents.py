"""Sandboxed agents in real bubblewrap sandboxes (``kernel.spawn(..., sandbox=...)``), on NATS
where the bus crosses processes: hostile attempts fail in the OS and are recorded with their
reason, signals act on the OS processes, and every publish, request and action passes the kernel
with the agent's key kept outside the sandbox."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent_os.amb import AMB, Metadata
from agent_os.control_plane import AgentSignal, KernelSpace, Pattern, Policy
from agent_os.control_plane.errors import AgentStoppedError, SandboxedAgentError
from agent_os.control_plane.sandbox import SandboxLimits, SandboxSpec
from agent_os.control_plane.sandbox.bwrap import _pids_of
from agent_os.iatp import IATP, RESULT
from tests.support import sandboxed_agents as agents
from tests.support.identities import PASSPHRASE
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root (docs/sandbox.md)")


def policy() -> Policy:
    rules = Policy("sandboxed", default_action="allow")
    rules.add_rule("deny", Pattern("write", "*secret*", match_type="glob"), "no secrets")
    return rules


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[KernelSpace]:
    """A kernel allowing all but writes of secrets, its fs.* workspace in ``tmp_path``;
    closing it ends every sandbox it started."""
    workspace = tmp_path / "kernel-ws"
    workspace.mkdir()
    space = KernelSpace(policy(), workspace=workspace)
    try:
        yield space
    finally:
        await space.close()
        for run in list(space.sandboxes.runs.values()):
            await run.close()


Clients = Callable[..., AMB]


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    """``clients(backend, url, agent_id=..., middleware=...)``: AMB clients closed after the test
    (the kernel closes a sandboxed agent's own at its end; closing again does nothing)."""
    made: list[AMB] = []

    def make(*args: Any, **kwargs: Any) -> AMB:
        client = AMB(*args, **kwargs)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def ended(kernel: KernelSpace, agent_id: str) -> tuple[BaseException | None, Any]:
    """Wait for the agent's end: (the error wait_all raised or None, its end's record)."""
    error: BaseException | None = None
    try:
        await asyncio.wait_for(kernel.wait_all([agent_id]), 60)
    except (SandboxedAgentError, AgentStoppedError) as exc:
        error = exc
    records = await kernel.recorder.query(agent_id=agent_id)
    ends = [r for r in records if r.event_type in ("agent_completed", "agent_failed", "agent_killed")]
    assert len(ends) == 1, [r.event_type for r in records]
    return error, ends[0]


# -- the five hostile attempts ----------------------------------------------------------------

HOSTILE = {
    "open_socket": ("OSError", "ENETUNREACH"),
    "read_shadow": ("PermissionError", "EACCES"),
    "write_outside": (("OSError", "PermissionError"), ("EROFS", "EACCES")),
    "fork_bomb": ("BlockingIOError", "EAGAIN"),
    "allocate": ("MemoryError", None),
}


@pytest.mark.parametrize("attempt", list(HOSTILE))
async def test_a_hostile_attempt_fails_in_the_os_and_is_recorded(kernel: KernelSpace, attempt: str) -> None:
    limits = SandboxLimits(memory=768 << 20, processes=24)
    agent_id = await kernel.spawn(getattr(agents, attempt), sandbox=SandboxSpec(limits=limits))
    error, record = await ended(kernel, agent_id)
    assert isinstance(error, SandboxedAgentError)
    assert record.event_type == "agent_failed"
    data = record.data
    kinds, errno_names = HOSTILE[attempt]
    assert data["reported"]["type"] in (kinds if isinstance(kinds, tuple) else (kinds,)), data
    if errno_names is not None:
        names = errno_names if isinstance(errno_names, tuple) else (errno_names,)
        assert data["reported"]["errno_name"] in names, data
    assert data["reported_by"] == "sandbox (untrusted)"
    assert data["exit_status"] == 1
    assert data["reason"] == error.reason
    assert data["reported"]["type"] in data["reason"]
    assert not _pids_of(data["sandbox_uid"]), "nothing of the sandbox is left"
    # the platform stays up: the same kernel runs the next sandboxed agent
    again = await kernel.spawn(agents.echo, "still here", sandbox=SandboxSpec())
    assert await asyncio.wait_for(kernel.wait_all([again]), 60) == ["still here"]
    assert (await kernel.recorder.verify()).ok


async def test_a_malformed_frame_closes_the_channel_and_is_recorded(kernel: KernelSpace) -> None:
    agent_id = await kernel.spawn(agents.malformed, sandbox=SandboxSpec())
    error, record = await ended(kernel, agent_id)
    assert isinstance(error, SandboxedAgentError)
    assert "malformed frame" in record.data["channel_error"]
    assert "broke its channel" in record.data["reason"]
    channel = await kernel.recorder.query(agent_id=agent_id, event_type="sandbox_channel_error")
    assert len(channel) == 1
    again = await kernel.spawn(agents.echo, 1, sandbox=SandboxSpec())
    assert await asyncio.wait_for(kernel.wait_all([again]), 60) == [1]


# -- signals act on the process itself --------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def states(pids: list[int]) -> set[str]:
    return {Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] for p in pids}


async def test_sigstop_freezes_a_busy_loop_sigcont_resumes_sigkill_ends(
    clients: Clients, kernel: KernelSpace
) -> None:
    bus = clients("memory", agent_id="busy-agent")
    watcher = clients("memory", agent_id="watcher")
    started = asyncio.Event()
    async with watcher:
        await watcher.subscribe("sandbox.busy.started", setter(started))
        agent_id = await kernel.spawn(agents.busy, sandbox=SandboxSpec(), bus=bus)
        await asyncio.wait_for(started.wait(), 30)
        run = kernel.sandboxes.runs[agent_id]
        assert run.sandbox is not None
        sandbox = run.sandbox
        pids = sandbox.pids()
        assert pids
        first = {p: cpu_ticks(p) for p in pids}
        await wait_for(lambda: any(cpu_ticks(p) > first[p] + 5 for p in pids))

        assert await kernel.send_signal(agent_id, AgentSignal.SIGSTOP)
        assert kernel.get_agent(agent_id).stopped  # the kernel's hold too
        await wait_for(lambda: states(pids) == {"T"})
        frozen = [cpu_ticks(p) for p in pids]
        await asyncio.sleep(0.5)  # a measured interval: the running loop gains ~50 ticks in it
        assert [cpu_ticks(p) for p in pids] == frozen, "a stopped sandbox uses no CPU"

        assert await kernel.send_signal(agent_id, AgentSignal.SIGCONT)
        await wait_for(lambda: any(cpu_ticks(p) > t + 5 for p, t in zip(pids, frozen, strict=True)))

        assert await kernel.send_signal(agent_id, AgentSignal.SIGKILL)
        error, record = await ended(kernel, agent_id)
        assert isinstance(error, AgentStoppedError)
        assert record.event_type == "agent_killed"
        assert record.data["reason"].startswith("killed by SIGKILL")
        await wait_for(lambda: not _pids_of(sandbox.uid))


def setter(event: asyncio.Event) -> Callable[[Any, Metadata], Any]:
    """A handler that sets ``event``."""

    async def handler(message: Any, metadata: Metadata) -> None:
        event.set()

    return handler


# -- the agent's way out, over NATS, signed with a key that stays outside ---------------------


@pytest.fixture
async def keys(tmp_path: Path) -> dict[str, IATP]:
    """The sandboxed agent's key in a file store (in this process only), and the peer's and
    an operator's in their own stores, each knowing the others' public identities."""
    store = IATP("file", key_path=str(tmp_path / "keys"), passphrase=PASSPHRASE, kdf_level="interactive")
    stores = {"sandboxed": store, "peer": IATP(), "operator": IATP()}
    for name, iatp in stores.items():
        await iatp.register_agent(name if name != "sandboxed" else "sb-agent")
    ids = {"sandboxed": "sb-agent", "peer": "peer", "operator": "operator"}
    for name, iatp in stores.items():
        for other, theirs in stores.items():
            if other != name:
                await iatp.add_identity(theirs.identity(ids[other]))
    return stores


@pytest.mark.nats
async def test_publish_request_and_actions_pass_the_kernel_and_the_key_stays_out(
    clients: Clients, kernel: KernelSpace, keys: dict[str, IATP], tmp_path: Path, prefix: str
) -> None:
    key_file = next((tmp_path / "keys" / "keys").iterdir())
    bus = clients("nats", NATS_URL, agent_id="sb-agent", middleware=[keys["sandboxed"].middleware()])
    peer = clients("nats", NATS_URL, agent_id="peer", middleware=[keys["peer"].middleware()])
    heard: list[tuple[Any, Any]] = []
    news = asyncio.Event()

    async def on_news(message: Any, metadata: Metadata) -> None:
        heard.append((message, metadata.context.get(RESULT)))
        news.set()

    async def on_ask(message: Any, metadata: Metadata) -> None:
        result = metadata.context[RESULT]
        await peer.reply(metadata, {"asked": message, "by": result.sender, "valid": result.valid})

    async with peer:
        await peer.subscribe(f"{prefix}.news", on_news)
        await peer.subscribe(f"{prefix}.ask", on_ask)
        agent_id = await kernel.spawn(agents.talker, prefix, str(key_file), sandbox=SandboxSpec(), bus=bus)
        assert agent_id == "sb-agent"
        [out] = await asyncio.wait_for(kernel.wait_all([agent_id]), 60)
        await asyncio.wait_for(news.wait(), 10)

    assert out["agent_id"] == "sb-agent"
    assert out["answer"] == {"asked": "what time is it", "by": "sb-agent", "valid": True}
    [(message, verified)] = heard
    assert message == {"from": "sb-agent"}
    assert verified.valid, "signed by the supervisor as the agent"
    assert verified.sender == "sb-agent"
    assert out["allowed"] == [True, None]
    assert out["denied"] == [False, "no secrets"]
    assert out["other"][0] is False
    assert "cannot act as 'someone-else'" in out["other"][1]
    assert out["key"] == "FileNotFoundError", "the key store is not visible in the sandbox"
    assert out["key_dir_exists"] is False
    assert (tmp_path / "kernel-ws" / "notes.txt").read_text() == "hello"

    records = await kernel.recorder.query(agent_id="sb-agent")
    kinds = [(r.event_type, r.data.get("operation"), r.data.get("action")) for r in records]
    assert ("policy_decision", "publish", None) in kinds
    assert ("policy_decision", "request", None) in kinds
    assert ("policy_decision", "write", "fs.write") in kinds
    assert ("action_outcome", "write", "fs.write") in kinds
    assert ("policy_violation", "write", "fs.write") in kinds
    blocked = [r for r in records if r.event_type == "action_blocked"]
    assert len(blocked) == 1
    assert "someone-else" in blocked[0].data["reason"]
    assert kinds[-1][0] == "agent_completed"
    assert (await kernel.recorder.verify()).ok


@pytest.mark.nats
async def test_signals_over_the_bus_reach_the_sandbox(
    clients: Clients, kernel: KernelSpace, keys: dict[str, IATP], prefix: str
) -> None:
    bus = clients("nats", NATS_URL, agent_id="sb-agent", middleware=[keys["sandboxed"].middleware()])
    operator = clients("nats", NATS_URL, agent_id="operator", middleware=[keys["operator"].middleware()])
    started = asyncio.Event()
    async with KernelSpace(Policy("operator", default_action="allow")) as remote:
        remote.attach(operator)
        async with operator:
            await operator.subscribe("sandbox.busy.started", setter(started))
            agent_id = await kernel.spawn(agents.busy, sandbox=SandboxSpec(), bus=bus)
            await asyncio.wait_for(started.wait(), 30)
            run = kernel.sandboxes.runs[agent_id]
            assert run.sandbox is not None
            pids = run.sandbox.pids()
            assert await remote.send_signal(agent_id, AgentSignal.SIGSTOP)
            await wait_for(lambda: states(pids) == {"T"})
            assert await remote.send_signal(agent_id, AgentSignal.SIGCONT)
            await wait_for(lambda: "T" not in states(pids))
            assert await remote.send_signal(agent_id, AgentSignal.SIGKILL)
            error, record = await ended(kernel, agent_id)
    assert isinstance(error, AgentStoppedError)
    assert record.event_type == "agent_killed"
    signals = await kernel.recorder.query(agent_id=agent_id, event_type="signal")
    assert [(s.data["signal"], s.data["sender"]) for s in signals] == [
        ("SIGSTOP", "operator"),
        ("SIGCONT", "operator"),
        ("SIGKILL", "operator"),
    ]


@pytest.mark.nats
async def test_a_sandboxed_agent_answers_requests(
    clients: Clients, kernel: KernelSpace, keys: dict[str, IATP], prefix: str
) -> None:
    bus = clients("nats", NATS_URL, agent_id="sb-agent", middleware=[keys["sandboxed"].middleware()])
    peer = clients("nats", NATS_URL, agent_id="peer", middleware=[keys["peer"].middleware()])
    ready = asyncio.Event()
    async with peer:
        await peer.subscribe(f"{prefix}.svc.ready", setter(ready))
        agent_id = await kernel.spawn(agents.responder, f"{prefix}.svc", 2, sandbox=SandboxSpec(), bus=bus)
        await asyncio.wait_for(ready.wait(), 30)
        first = await peer.request(f"{prefix}.svc", "one", timeout=10, with_metadata=True)
        second = await peer.request(f"{prefix}.svc", "two", timeout=10)
        [seen] = await asyncio.wait_for(kernel.wait_all([agent_id]), 60)
    assert first[0] == "answer to one"
    assert first[1].context[RESULT].sender == "sb-agent"
    assert second == "answer to two"
    assert seen == [["one", "peer", True], ["two", "peer", True]]


async def test_spawn_refuses_what_it_cannot_run(
    clients: Clients, kernel: KernelSpace, tmp_path: Path
) -> None:
    from agent_os.control_plane import KernelError

    async def local(agent: Any) -> None:
        return None

    with pytest.raises(KernelError, match="module-level async function"):
        await kernel.spawn(local, sandbox=SandboxSpec())
    with pytest.raises(KernelError, match="no agent script"):
        await kernel.spawn(str(tmp_path / "missing.py"), sandbox=SandboxSpec())
    with pytest.raises(KernelError, match="sandboxed agents"):
        await kernel.spawn(agents.echo, bus=clients("memory"))
    with pytest.raises(KernelError, match="runs only sandboxed"):
        await kernel.spawn(str(tmp_path / "x.py"))
    assert not kernel.sandboxes.runs


@pytest.mark.nats
async def test_the_platforms_subjects_stay_out_of_a_sandboxed_agents_reach(
    clients: Clients, kernel: KernelSpace, keys: dict[str, IATP], prefix: str
) -> None:
    """A sandboxed agent's wildcard subscriptions never deliver control (``_ctl.``) or reply
    (``_INBOX.``) subjects: it can neither watch other agents' signals and replies nor answer
    a signal meant for another agent (a forged acknowledgement)."""
    bus = clients("nats", NATS_URL, agent_id="sb-agent", middleware=[keys["sandboxed"].middleware()])
    operator = clients("nats", NATS_URL, agent_id="operator", middleware=[keys["operator"].middleware()])
    peer = clients("nats", NATS_URL, agent_id="peer", middleware=[keys["peer"].middleware()])
    ready = asyncio.Event()

    async def answer(message: Any, metadata: Metadata) -> None:
        await peer.reply(metadata, "answered")

    async with KernelSpace(Policy("operator", default_action="allow")) as remote:
        remote.attach(operator)
        async with operator, peer:
            await operator.subscribe(f"{prefix}.snoop.ready", setter(ready))
            await peer.subscribe(f"{prefix}.svc", answer)
            agent_id = await kernel.spawn(agents.snooper, prefix, sandbox=SandboxSpec(), bus=bus)
            await asyncio.wait_for(ready.wait(), 30)
            # a signal for an agent that does not exist: nobody may acknowledge it
            assert not await remote.send_signal("victim", AgentSignal.SIGSTOP)
            # an ordinary request still reaches both subscribers; either answer may come first
            answer_ = await operator.request(f"{prefix}.svc", "q", timeout=10)
            assert answer_ in ("answered", {"ok": True, "forged": True})
            await operator.publish(f"{prefix}.snoop.stop", "stop")
            [out] = await asyncio.wait_for(kernel.wait_all([agent_id]), 60)
    assert not [t for t in out["seen"] if t.startswith("_")], out
    assert f"{prefix}.svc" in out["seen"], "the wildcard still delivers ordinary subjects"
    assert out["control_publish"] == "ActionRefused"
    assert [r.split()[0] for r in out["refused"]] == [
        ">",
        "*.>",
        "*.signal.>",
        "_ctl.>",
        "_INBOX.>",
        "*.*.victim",
    ]
    assert all(r.endswith("ActionRefused") for r in out["refused"]), out
