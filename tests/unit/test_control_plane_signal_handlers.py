"""Dispatchers built the API reference's way, ``SignalDispatcher(kernel, ...)``, are the kernel's:
their handlers run on every signal the kernel delivers. The agent methods the reference's
handlers call on ``kernel.get_agent(agent_id)``: ``get_state``, ``save_state``, ``cleanup``."""

from __future__ import annotations

import asyncio

import pytest

from agent_os.amb import AMB, Metadata
from agent_os.control_plane import (
    AgentNotFound,
    AgentSignal,
    AgentStoppedError,
    AgentTimeoutError,
    FlightRecorder,
    HoldQueueFull,
    KernelError,
    KernelSpace,
    Pattern,
    Policy,
    PolicyViolationError,
    SignalDispatcher,
    SignalError,
    control_subject,
)
from agent_os.control_plane.process import AgentProcess
from tests.support import Collector, memory_url, wait_until
from tests.support.closing import Closing

Calls = list[tuple[str, str, AgentSignal]]


def open_policy() -> Policy:
    policy = Policy("test", default_action="deny")
    policy.add_rule("deny", Pattern("publish", "tasks.phi.*"), on_violation="SIGUSR1")
    policy.add_rule("deny", Pattern("publish", "tasks.fatal"), on_violation="SIGTERM")
    policy.add_rule("allow", Pattern("*", "tasks.*"))
    policy.add_rule("allow", Pattern("signal", "*"))
    policy.add_rule("allow", Pattern("reply", "*"))
    return policy


def recording(dispatcher: SignalDispatcher, calls: Calls, label: str, signal: AgentSignal) -> None:
    @dispatcher.register_handler(signal)
    async def handler(agent_id: str, sig: AgentSignal) -> None:
        calls.append((label, agent_id, sig))


async def start_idle(kernel: KernelSpace) -> tuple[str, asyncio.Task[None]]:
    """Start an agent that waits until it is signalled; return its id and its execution."""
    started = asyncio.Event()

    @kernel.register
    async def idle() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(kernel.execute(idle))
    await started.wait()
    assert kernel.current_agent_id is not None
    return kernel.current_agent_id, task


async def finish(kernel: KernelSpace, agent_id: str, task: asyncio.Task[None]) -> None:
    await kernel.send_signal(agent_id, AgentSignal.SIGKILL)
    with pytest.raises(AgentStoppedError):
        await task
    await kernel.close()


# -- a dispatcher built with the kernel is the kernel's ------------------------------------------


async def test_a_reference_style_dispatcher_runs_its_handlers_on_kernel_send_signal(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy="permissive"))
    dispatcher = SignalDispatcher(kernel, queue_size=7, async_delivery=False)
    assert kernel.signals is dispatcher
    assert dispatcher.kernel is kernel
    calls: Calls = []
    recording(dispatcher, calls, "usr1", AgentSignal.SIGUSR1)
    aid, task = await start_idle(kernel)
    assert await kernel.send_signal(aid, AgentSignal.SIGUSR1)
    # Delivered by the adopted dispatcher, without background delivery: the handler has run.
    assert calls == [("usr1", aid, AgentSignal.SIGUSR1)]
    assert kernel.get_agent(aid).hold_limit == 7
    await finish(kernel, aid, task)


async def test_a_reference_style_dispatcher_runs_its_sigalrm_handler_on_a_timeout() -> None:
    async with KernelSpace(policy="permissive") as kernel:
        dispatcher = SignalDispatcher(kernel)
        calls: Calls = []
        recording(dispatcher, calls, "alarm", AgentSignal.SIGALRM)

        @kernel.register
        async def slow() -> None:
            await asyncio.Event().wait()

        with pytest.raises(AgentTimeoutError):
            await kernel.execute(slow, timeout=0.02)
        assert [(label, sig) for label, _, sig in calls] == [("alarm", AgentSignal.SIGALRM)]
        assert calls[0][1] == kernel.current_agent_id


async def test_the_reference_handlers_run_on_a_rules_on_violation(closing: Closing) -> None:
    """The reference's two handlers, as written, on a dispatcher built the reference's way; the
    signals come from the policy (``on_violation``), not from the dispatcher."""
    flight_recorder = closing(FlightRecorder(storage="memory"))
    kernel = closing(KernelSpace(policy=open_policy(), flight_recorder=flight_recorder))
    dispatcher = SignalDispatcher(kernel, queue_size=1000, async_delivery=True)
    ran: list[str] = []

    @dispatcher.register_handler(AgentSignal.SIGTERM)
    async def graceful_shutdown(agent_id: str, signal: AgentSignal) -> bool:
        ran.append("graceful_shutdown")
        agent = kernel.get_agent(agent_id)
        await agent.cleanup()
        await agent.save_state()
        return True  # Allow termination

    @dispatcher.register_handler(AgentSignal.SIGUSR1)
    async def dump_state(agent_id: str, signal: AgentSignal) -> None:
        ran.append("dump_state")
        agent = kernel.get_agent(agent_id)
        state = await agent.get_state()
        await flight_recorder.log_state_dump(agent_id, state)

    rogue = closing(AMB("memory", memory_url("signals"), agent_id="rogue"))
    kernel.attach(rogue)
    await rogue.connect()
    process = kernel.get_agent("rogue")
    process.data["task"] = "export"
    closed: list[str] = []
    process.add_cleanup(lambda: closed.append("connection"))

    with pytest.raises(PolicyViolationError):
        await rogue.publish("tasks.phi.record", 1)  # on_violation: SIGUSR1
    await wait_until(lambda: ran == ["dump_state"], what="dump_state")
    await dispatcher.drain()
    (dump,) = await flight_recorder.query(event_type="state_dump", agent_id="rogue")
    assert dump.data["state"]["state"] == "running"
    assert dump.data["state"]["violations_count"] == 1
    assert dump.data["state"]["data"] == {"task": "export"}

    with pytest.raises(PolicyViolationError):
        await rogue.publish("tasks.fatal", 2)  # on_violation: SIGTERM
    await wait_until(lambda: kernel.get_agent_status("rogue").state == "terminated", what="termination")
    assert ran == ["dump_state", "graceful_shutdown"]
    assert closed == ["connection"]  # by the handler's cleanup(); not again by the kernel's
    (saved,) = await flight_recorder.query(event_type="state_saved", agent_id="rogue")
    assert saved.data["state"]["state"] == "running"  # saved before the termination
    assert saved.data["state"]["violations_count"] == 2
    signals = await flight_recorder.query(event_type="signal", agent_id="rogue")
    assert [(s.data["signal"], s.data["sender"]) for s in signals] == [
        ("SIGUSR1", "policy"),
        ("SIGTERM", "policy"),
    ]
    await rogue.close()
    await kernel.close()


async def test_a_reference_style_dispatcher_runs_its_handlers_on_signals_over_the_bus(
    closing: Closing,
) -> None:
    where = memory_url("signals")
    remote_kernel = closing(KernelSpace(policy=open_policy()))
    dispatcher = SignalDispatcher(remote_kernel, async_delivery=False)
    calls: Calls = []
    recording(dispatcher, calls, "usr1", AgentSignal.SIGUSR1)
    recording(dispatcher, calls, "usr2", AgentSignal.SIGUSR2)
    remote = closing(AMB("memory", where, agent_id="remote-agent"))
    remote_kernel.attach(remote)
    await remote.connect()
    # A plain client's request on the agent's control subject.
    plain = closing(AMB("memory", where, agent_id="supervisor"))
    reply = await plain.request(control_subject("remote-agent"), {"signal": "SIGUSR1"})
    assert reply == {"ok": True}
    assert calls == [("usr1", "remote-agent", AgentSignal.SIGUSR1)]  # before the reply
    # Another kernel's send_signal for an agent it does not have goes the same way.
    local_kernel = closing(KernelSpace(policy=open_policy()))
    local = closing(AMB("memory", where, agent_id="local"))
    local_kernel.attach(local)
    await local.connect()
    assert await local_kernel.send_signal("remote-agent", AgentSignal.SIGUSR2)
    assert calls[1:] == [("usr2", "remote-agent", AgentSignal.SIGUSR2)]
    signals = await remote_kernel.recorder.query(event_type="signal")
    assert [(s.data["signal"], s.data["sender"]) for s in signals] == [
        ("SIGUSR1", "supervisor"),
        ("SIGUSR2", "local"),
    ]
    for client in (plain, local, remote):
        await client.close()
    await local_kernel.close()
    await remote_kernel.close()


async def test_two_dispatchers_bound_to_one_kernel_share_their_handlers(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy="permissive"))
    default = kernel.signals
    calls: Calls = []
    recording(default, calls, "default", AgentSignal.SIGUSR1)
    first = SignalDispatcher(kernel, async_delivery=False)
    recording(first, calls, "first", AgentSignal.SIGUSR1)
    second = SignalDispatcher(kernel, queue_size=3)  # background delivery
    recording(second, calls, "second", AgentSignal.SIGUSR1)
    assert kernel.signals is second
    assert first.kernel is kernel
    aid, task = await start_idle(kernel)
    everyone = [(label, aid, AgentSignal.SIGUSR1) for label in ("default", "first", "second")]

    assert await first.send(aid, AgentSignal.SIGUSR1)  # first's own async_delivery: False
    assert calls == everyone
    assert await kernel.send_signal(aid, AgentSignal.SIGUSR1)  # the kernel's: second's (background)
    await first.drain()  # any bound dispatcher waits for the others' background deliveries
    assert calls == everyone * 2
    assert await default.send(aid, AgentSignal.SIGUSR1)  # the replaced default still sends
    await default.drain()
    assert calls == everyone * 3
    assert kernel.get_agent(aid).hold_limit == 3
    await finish(kernel, aid, task)


async def test_a_dispatcher_created_before_the_kernel_keeps_its_handlers(closing: Closing) -> None:
    early = SignalDispatcher(None, queue_size=2, async_delivery=False)
    calls: Calls = []
    recording(early, calls, "early", AgentSignal.SIGUSR2)
    with pytest.raises(SignalError, match="not bound"):
        await early.send("anyone", AgentSignal.SIGUSR2)
    kernel = closing(KernelSpace(policy="permissive", signal_dispatcher=early))
    assert kernel.signals is early
    assert early.kernel is kernel
    aid, task = await start_idle(kernel)
    assert kernel.get_agent(aid).hold_limit == 2
    assert await kernel.send_signal(aid, AgentSignal.SIGUSR2)
    assert calls == [("early", aid, AgentSignal.SIGUSR2)]
    later = SignalDispatcher(kernel, async_delivery=False)
    recording(later, calls, "later", AgentSignal.SIGUSR2)
    assert await kernel.send_signal(aid, AgentSignal.SIGUSR2)
    assert calls[1:] == [("early", aid, AgentSignal.SIGUSR2), ("later", aid, AgentSignal.SIGUSR2)]
    with pytest.raises(KernelError, match="another KernelSpace"):
        KernelSpace(signal_dispatcher=early)
    await finish(kernel, aid, task)


async def test_the_adopted_dispatchers_queue_size_bounds_every_hold_queue(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy=open_policy()))
    agent = closing(AMB("memory", memory_url("signals"), agent_id="agent"))
    kernel.attach(agent)  # before the dispatcher: its hold queue is bounded by it too
    await agent.connect()
    SignalDispatcher(kernel, queue_size=2)
    await kernel.send_signal("agent", AgentSignal.SIGSTOP)
    held = [asyncio.create_task(agent.publish("tasks.out", i)) for i in range(2)]
    await wait_until(lambda: kernel.get_agent("agent").held == 2)
    with pytest.raises(HoldQueueFull):
        await agent.publish("tasks.out", 2)
    await kernel.send_signal("agent", AgentSignal.SIGCONT)
    await asyncio.gather(*held)
    await agent.close()
    await kernel.close()


# -- get_state, save_state, cleanup --------------------------------------------------------------


async def test_get_state_is_the_status_and_what_the_agent_published() -> None:
    async with KernelSpace(policy="permissive") as kernel:
        with pytest.raises(AgentNotFound):
            _ = kernel.current_agent
        published = asyncio.Event()
        go_on = asyncio.Event()

        @kernel.register(permissions=["write", "read"])
        async def worker() -> str:
            kernel.current_agent.data["step"] = 1
            published.set()
            await go_on.wait()
            kernel.current_agent.data["step"] = 2
            return "done"

        task = asyncio.create_task(kernel.execute(worker))
        await published.wait()
        aid = kernel.current_agent_id or ""
        agent = kernel.get_agent(aid)
        status = kernel.get_agent_status(aid)
        state = await agent.get_state()
        assert state == {
            "id": aid,
            "name": "worker",
            "state": "running",
            "started_at": status.started_at.isoformat(),
            "actions_count": 0,
            "violations_count": 0,
            "parent_id": None,
            "permissions": ["read", "write"],
            "held": 0,
            "data": {"step": 1},
        }
        state["data"]["step"] = 99
        assert agent.data == {"step": 1}  # get_state returns a copy
        await kernel.send_signal(aid, AgentSignal.SIGSTOP)
        assert (await agent.get_state())["state"] == "stopped"
        await kernel.send_signal(aid, AgentSignal.SIGCONT)
        go_on.set()
        assert await task == "done"
        final = await agent.get_state()
        assert (final["state"], final["data"]) == ("terminated", {"step": 2})


async def test_save_state_records_one_state_saved_record_and_returns_it(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy="permissive"))
    aid, task = await start_idle(kernel)
    agent = kernel.get_agent(aid)
    agent.data.update(step=3, cursor="abc")
    saved = await agent.save_state()
    assert saved == await agent.get_state()
    records = await kernel.recorder.query(event_type="state_saved")
    assert len(records) == 1
    record = records[0]
    assert (record.agent_id, record.execution_id, record.severity) == (aid, aid, "info")
    assert record.data == {"name": "idle", "state": saved}
    replayed = await kernel.recorder.replay(aid, aid)
    assert replayed["state"]["data"] == {"step": 3, "cursor": "abc"}
    with pytest.raises(KernelError, match="no flight recorder"):
        await AgentProcess("loose", "loose").save_state()
    await finish(kernel, aid, task)


async def test_cleanup_runs_the_callbacks_once_and_leaves_the_agent_working(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy=open_policy()))
    where = memory_url("signals")
    agent = closing(AMB("memory", where, agent_id="agent"))
    peer = closing(AMB("memory", where, agent_id="peer"))
    kernel.attach(agent)
    got = Collector()
    await agent.subscribe("tasks.in", got)
    process = kernel.get_agent("agent")
    order: list[str] = []

    async def close_async() -> None:
        order.append("async")

    process.add_cleanup(lambda: order.append("sync"))
    process.add_cleanup(close_async)
    await kernel.send_signal("agent", AgentSignal.SIGSTOP)
    await peer.publish("tasks.in", "held")
    await wait_until(lambda: process.held == 1)

    assert await process.cleanup() == 2
    assert order == ["async", "sync"]  # most recent first
    assert await process.cleanup() == 0  # each callback runs once
    assert order == ["async", "sync"]
    # Not killed: still stopped, the held delivery waits, SIGCONT delivers it to the handler.
    assert kernel.get_agent_status("agent").state == "stopped"
    assert process.held == 1
    await kernel.send_signal("agent", AgentSignal.SIGCONT)
    await got.wait_for(1)
    assert got.messages == ["held"]
    await peer.close()
    await agent.close()
    await kernel.close()


async def test_cleanup_runs_every_callback_and_then_raises_the_failures() -> None:
    process = AgentProcess("a", "a")
    ran: list[str] = []

    def fail(name: str) -> None:
        ran.append(name)
        raise RuntimeError(name)

    process.add_cleanup(lambda: fail("first"))
    process.add_cleanup(lambda: ran.append("second"))
    process.add_cleanup(lambda: fail("third"))
    with pytest.raises(ExceptionGroup) as info:
        await process.cleanup()
    assert ran == ["third", "second", "first"]
    assert [str(e) for e in info.value.exceptions] == ["third", "first"]
    assert "2 of 3 cleanup callbacks of agent a failed" in str(info.value)
    assert await process.cleanup() == 0


async def test_sigterm_runs_the_cleanups_no_handler_ran_and_a_veto_or_sigkill_runs_none() -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher) as kernel:
        veto = True

        @dispatcher.register_handler(AgentSignal.SIGTERM)
        async def maybe(agent_id: str, signal: AgentSignal) -> bool:
            return not veto

        closed: list[str] = []
        aid, task = await start_idle(kernel)
        kernel.get_agent(aid).add_cleanup(lambda: closed.append(aid))
        assert not await kernel.send_signal(aid, AgentSignal.SIGTERM)  # vetoed
        assert closed == []
        assert kernel.get_agent_status(aid).state == "running"
        veto = False
        assert await kernel.send_signal(aid, AgentSignal.SIGTERM)
        assert closed == [aid]  # no handler cleaned up: the kernel did, before terminating
        with pytest.raises(AgentStoppedError):
            await task

        killed, killed_task = await start_idle(kernel)
        kernel.get_agent(killed).add_cleanup(lambda: closed.append(killed))
        assert await kernel.send_signal(killed, AgentSignal.SIGKILL)
        with pytest.raises(AgentStoppedError):
            await killed_task
        assert closed == [aid]  # SIGKILL runs no cleanup

        failing, failing_task = await start_idle(kernel)

        def broken() -> None:
            raise OSError("disk gone")

        kernel.get_agent(failing).add_cleanup(broken)
        assert await kernel.send_signal(failing, AgentSignal.SIGTERM)
        with pytest.raises(AgentStoppedError):
            await failing_task  # terminated all the same
        outcomes = [
            (s.data["outcome"], s.data["detail"])
            for s in await kernel.recorder.query(event_type="signal", agent_id=failing)
        ]
        assert outcomes[0] == ("delivered", "")
        assert outcomes[1][0] == "cleanup_error"
        assert "disk gone" in outcomes[1][1]


async def test_a_bus_agents_handler_publishes_its_state(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy=open_policy()))
    where = memory_url("signals")
    agent = closing(AMB("memory", where, agent_id="counter"))
    peer = closing(AMB("memory", where, agent_id="peer"))
    kernel.attach(agent)

    async def count(message: int, metadata: Metadata) -> None:
        me = kernel.current_agent
        me.data["total"] = me.data.get("total", 0) + message

    await agent.subscribe("tasks.count", count)
    for n in (1, 2, 3):
        await peer.publish("tasks.count", n)
    await wait_until(lambda: agent.stats.handled == 3)
    state = await kernel.get_agent("counter").get_state()
    assert state["data"] == {"total": 6}
    assert state["actions_count"] == 3  # three deliveries allowed
    await peer.close()
    await agent.close()
    await kernel.close()
