"""KernelSpace: execution, permissions, children, signals on running agents, verifier modules."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from agent_os.control_plane import (
    VIOLATION_EVENTS,
    AgentNotFound,
    AgentSignal,
    AgentStoppedError,
    AgentTimeoutError,
    KernelError,
    KernelSpace,
    Pattern,
    Policy,
    PolicyError,
    PolicySet,
    PolicyViolationError,
    RateLimit,
    RateLimiter,
    RateLimitExceeded,
    SignalDispatcher,
    SignalError,
    VerificationFailed,
)
from tests.support import wait_until
from tests.support.closing import Closing


async def test_execute_returns_the_result_and_records_it() -> None:
    async with KernelSpace(policy="strict") as kernel:

        @kernel.register
        async def analyzer(data: str) -> dict[str, Any]:
            return {"analyzed": True, "length": len(data)}

        result = await kernel.execute(
            analyzer, "sample data", context={"user_id": "user_123", "session_id": "s"}
        )
        assert result == {"analyzed": True, "length": 11}
        assert await analyzer("abc") == {"analyzed": True, "length": 3}  # calling it goes through the kernel
        events = [r.event_type for r in await kernel.recorder.query()]
        assert events == ["execute", "agent_completed", "execute", "agent_completed"]
        first = (await kernel.recorder.query(event_type="execute"))[0]
        assert first.data["context"] == {"user_id": "user_123", "session_id": "s"}
        with pytest.raises(KernelError):
            await kernel.execute(lambda: None)


async def test_authorize_is_the_gate_for_other_actions() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("read", "data/*"))
    policy.add_rule("allow", Pattern("network", "*"))
    async with KernelSpace(policy=policy) as kernel:

        @kernel.register(name="data_processor", permissions=["read", "write"], rate_limit=60)
        async def data_processor(path: str) -> str:
            await kernel.authorize("read", path)
            try:
                await kernel.authorize("network", "https://example.com")  # policy allows, permissions do not
            except PolicyViolationError as exc:
                return f"blocked: {exc.decision.reason if exc.decision else ''}"
            return "not blocked"

        assert (await kernel.execute(data_processor, "data/a")).startswith(
            "blocked: agent data_processor lacks"
        )
        with pytest.raises(PolicyViolationError):
            await kernel.execute(data_processor, "secrets/a")
        status = kernel.get_agent_status(kernel.current_agent_id or "")
        assert status.name == "data_processor"
        assert status.violations_count == 1
        decisions = await kernel.recorder.query(event_type=["policy_decision", *VIOLATION_EVENTS])
        assert [(d.event_type, d.data["decision"]) for d in decisions] == [
            ("policy_decision", "allow"),
            ("permission_denied", "deny"),
            ("policy_violation", "deny"),
        ]


async def test_registered_rate_limit_counts_executions() -> None:
    async with KernelSpace(policy="permissive") as kernel:

        @kernel.register(rate_limit=2)
        async def limited() -> int:
            return 1

        assert await kernel.execute(limited) == 1
        assert await kernel.execute(limited) == 1
        with pytest.raises(RateLimitExceeded):
            await kernel.execute(limited)


async def test_spawn_children_inherit_permissions_and_restrictions() -> None:
    async with KernelSpace(policy="permissive") as kernel:
        seen: dict[str, Any] = {}

        @kernel.register(permissions=["read", "write", "network"])
        async def coordinator(tasks: list[str]) -> list[dict[str, Any]]:
            ids = [
                await kernel.spawn(
                    worker_agent, t, parent_id=kernel.current_agent_id, additional_restrictions=["no_network"]
                )
                for t in tasks
            ]
            seen["ids"] = ids
            return await kernel.wait_all(ids)

        @kernel.register(permissions=["read", "network", "execute"])
        async def worker_agent(task: str) -> dict[str, Any]:
            me = kernel.get_agent_status(kernel.current_agent_id or "")
            seen[task] = me
            try:
                await kernel.authorize("network", "https://x")
            except PolicyViolationError:
                return {"task": task, "status": "complete", "network": False}
            return {"task": task, "status": "complete", "network": True}

        results = await kernel.execute(coordinator, ["a", "b"])
        assert results == [{"task": t, "status": "complete", "network": False} for t in ("a", "b")]
        child = seen["a"]
        assert child.permissions == frozenset({"read", "network"})  # strict: parent ∩ own
        assert child.parent_id is not None
        assert kernel.get_agent_status(child.parent_id).name == "coordinator"
        with pytest.raises(AgentNotFound):
            await kernel.wait_all(["nope"])


async def test_async_with_closes_the_kernel_its_agents_and_recorder() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async with KernelSpace(policy="permissive") as kernel:
        kernel.register(forever)
        running = await kernel.spawn(forever)
        await asyncio.wait_for(started.wait(), 5)
        assert kernel.recorder.ready
    assert kernel._runs[running].cancelled()  # the spawned agent is stopped, not left running
    assert not kernel.recorder.ready


async def test_sigkill_stops_a_running_agent_mid_work() -> None:
    async with KernelSpace(policy="permissive") as kernel:
        progress: list[int] = []

        @kernel.register
        async def long_running(iterations: int) -> dict[str, int]:
            for i in range(iterations):
                progress.append(i)
                await asyncio.sleep(0.01)
            return {"completed": iterations}

        task = asyncio.create_task(kernel.execute(long_running, 1000))
        await wait_until(lambda: len(progress) >= 3)
        assert await kernel.send_signal(kernel.current_agent_id or "", AgentSignal.SIGKILL)
        with pytest.raises(AgentStoppedError):
            await task
        # No code of the agent is left to run (its task is done, not merely abandoned), so the
        # progress it made is final.
        process = kernel.get_agent(kernel.current_agent_id or "")
        assert not process.tasks
        assert len(progress) < 1000
        status = kernel.get_agent_status(kernel.current_agent_id or "")
        assert status.state == "terminated"
        assert not await kernel.send_signal(status.id, AgentSignal.SIGCONT)  # a dead agent takes no signals


async def test_sigstop_pauses_cooperative_agent_until_sigcont() -> None:
    async with KernelSpace(policy="strict") as kernel:
        done: list[int] = []

        @kernel.register
        async def long_running_agent(iterations: int) -> dict[str, int]:
            for i in range(iterations):
                if kernel.is_stopped():
                    await kernel.wait_for_continue()
                done.append(i)
                await asyncio.sleep(0.005)
            return {"completed": iterations}

        task = asyncio.create_task(kernel.execute(long_running_agent, 40))
        await wait_until(lambda: len(done) >= 3)
        await kernel.send_signal(kernel.current_agent_id or "", AgentSignal.SIGSTOP)
        assert kernel.get_agent_status(kernel.current_agent_id or "").state == "stopped"
        await asyncio.sleep(0.03)
        paused_at = len(done)
        await asyncio.sleep(0.05)
        assert len(done) == paused_at  # nothing ran while stopped
        await kernel.send_signal(kernel.current_agent_id or "", AgentSignal.SIGCONT)
        assert await task == {"completed": 40}


@pytest.mark.parametrize("async_delivery", [False, True])
async def test_a_sigstop_sent_after_a_sigcont_wins_over_it(async_delivery: bool) -> None:
    # SIGSTOP acts at once, SIGCONT after its handlers: a SIGSTOP sent while they still run
    # must leave the agent stopped, as the order the two were sent in says.
    dispatcher = SignalDispatcher(None, async_delivery=async_delivery)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher) as kernel:
        entered, release = asyncio.Event(), asyncio.Event()

        @dispatcher.register_handler(AgentSignal.SIGCONT)
        async def slow(agent_id: str, signal: AgentSignal) -> None:
            entered.set()
            await release.wait()

        kernel.external("agent")  # a bus agent's process
        assert await kernel.send_signal("agent", AgentSignal.SIGSTOP)
        cont = asyncio.create_task(kernel.send_signal("agent", AgentSignal.SIGCONT))
        await asyncio.wait_for(entered.wait(), 5)
        assert await kernel.send_signal("agent", AgentSignal.SIGSTOP)
        release.set()
        assert await cont
        await dispatcher.drain()
        assert kernel.get_agent_status("agent").state == "stopped"
        # Back to back, with nothing in between to let the SIGCONT's handlers run first.
        await kernel.send_signal("agent", AgentSignal.SIGCONT)
        await kernel.send_signal("agent", AgentSignal.SIGSTOP)
        await dispatcher.drain()
        assert kernel.get_agent_status("agent").state == "stopped"
        # A SIGCONT sent last continues it.
        assert await kernel.send_signal("agent", AgentSignal.SIGCONT)
        await dispatcher.drain()
        assert kernel.get_agent_status("agent").state == "running"
        signals = [r.data["signal"] for r in await kernel.recorder.query(event_type="signal")]
        assert signals == ["SIGSTOP", "SIGCONT", "SIGSTOP", "SIGCONT", "SIGSTOP", "SIGCONT"]


async def test_sigterm_runs_the_handler_then_stops() -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher) as kernel:
        cleaned: list[str] = []

        @dispatcher.register_handler(AgentSignal.SIGTERM)
        async def graceful_shutdown(agent_id: str, signal: AgentSignal) -> bool:
            assert kernel.get_agent_status(agent_id).state == "running"  # still alive while cleaning up
            cleaned.append(agent_id)
            return True

        started = asyncio.Event()

        @kernel.register
        async def forever() -> None:
            started.set()
            await asyncio.sleep(60)

        task = asyncio.create_task(kernel.execute(forever))
        await started.wait()
        agent_id = kernel.current_agent_id or ""
        assert await dispatcher.send(agent_id, AgentSignal.SIGTERM)
        with pytest.raises(AgentStoppedError):
            await task
        assert cleaned == [agent_id]


async def test_usr_signals_run_handlers_and_masks_ignore_them() -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher) as kernel:
        got: list[tuple[str, AgentSignal]] = []

        @dispatcher.register_handler(AgentSignal.SIGUSR1)
        async def dump_state(agent_id: str, signal: AgentSignal) -> None:
            got.append((agent_id, signal))
            await kernel.recorder.log_state_dump(agent_id, {"dumped": True})

        @kernel.register
        async def idle() -> None:
            await asyncio.sleep(60)

        task = asyncio.create_task(kernel.execute(idle))
        await wait_until(lambda: kernel.current_agent_id is not None)
        aid = kernel.current_agent_id or ""
        assert await kernel.send_signal(aid, "SIGUSR1")
        assert got == [(aid, AgentSignal.SIGUSR1)]
        dispatcher.mask(aid, AgentSignal.SIGUSR1)
        assert not await kernel.send_signal(aid, AgentSignal.SIGUSR1)
        assert len(got) == 1
        for sig in (AgentSignal.SIGKILL, AgentSignal.SIGSTOP):
            with pytest.raises(SignalError):
                dispatcher.register_handler(sig)
            with pytest.raises(SignalError):
                dispatcher.mask(aid, sig)
        await kernel.send_signal(aid, AgentSignal.SIGKILL)
        with pytest.raises(AgentStoppedError):
            await task
        signals = await kernel.recorder.query(event_type="signal")
        assert [s.data["outcome"] for s in signals] == ["delivered", "ignored", "delivered"]


async def test_sigalrm_fires_on_an_execution_timeout() -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher, timeout=0.05) as kernel:
        alarms: list[str] = []

        @dispatcher.register_handler(AgentSignal.SIGALRM)
        async def on_alarm(agent_id: str, signal: AgentSignal) -> None:
            alarms.append(agent_id)

        finished: list[bool] = []

        @kernel.register
        async def slow() -> None:
            await asyncio.sleep(5)
            finished.append(True)

        with pytest.raises(AgentTimeoutError):
            await kernel.execute(slow)
        with pytest.raises(AgentTimeoutError):
            await kernel.execute(slow, timeout=0.02)
        assert len(alarms) == 2
        assert not finished


@dataclass
class Verdict:
    verified: bool
    reason: str = ""
    confidence: float = 1.0


class FakeVerifier:
    """Stands in for CMVK: verifies answers that contain the expected word."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.calls: list[tuple[Any, Any, Any]] = []

    async def verify(self, prompt: Any, response: Any, context: Any = None) -> Verdict:
        self.calls.append((prompt, response, context))
        ok = self.word in str(response)
        return Verdict(ok, "" if ok else f"{self.word!r} missing", 0.9 if ok else 0.2)


async def test_verifier_modules_block_unverified_results() -> None:
    async with KernelSpace(policy="strict") as kernel:
        verifier = FakeVerifier("Paris")
        kernel.add_module(verifier)

        @kernel.register
        async def verified_agent(query: str) -> str:
            return "Paris is the capital of France." if "France" in query else "Lyon, probably."

        assert (
            await kernel.execute(verified_agent, "capital of France?", context={"domain": "geo"})
            == "Paris is the capital of France."
        )
        with pytest.raises(VerificationFailed) as info:
            await kernel.execute(verified_agent, "capital of Italy?")
        assert info.value.result.verified is False
        assert verifier.calls[0] == (
            "capital of France?",
            "Paris is the capital of France.",
            {"domain": "geo"},
        )
        checks = await kernel.recorder.query(event_type="verification")
        assert [c.data["decision"] for c in checks] == ["allow", "deny"]
        with pytest.raises(KernelError):
            kernel.add_module(object())  # type: ignore[arg-type]


async def test_admission_respects_max_concurrency_and_priority() -> None:
    async with KernelSpace(policy="permissive", max_concurrent_agents=1) as kernel:
        order: list[str] = []
        gate = asyncio.Event()

        @kernel.register(priority=0)
        async def first() -> None:
            order.append("first")
            await gate.wait()

        @kernel.register(priority=1)
        async def low() -> None:
            order.append("low")

        @kernel.register(priority=5)
        async def high() -> None:
            order.append("high")

        t1 = asyncio.create_task(kernel.execute(first))
        await wait_until(lambda: order == ["first"])
        t2 = asyncio.create_task(kernel.execute(low))
        t3 = asyncio.create_task(kernel.execute(high))
        await wait_until(lambda: len(kernel._admission._waiters) == 2, what="both waiting for admission")
        assert order == ["first"]  # one at a time
        gate.set()
        await asyncio.gather(t1, t2, t3)
        assert order == ["first", "high", "low"]


async def test_rate_limit_is_exact_under_many_concurrent_tasks() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("call", "*"), rate_limit=RateLimit(50, 3600))

    async def attempt() -> bool:
        await asyncio.sleep(0)
        return policy.evaluate("call", "x", {"agent_id": "a"}).allowed

    results = await asyncio.gather(*(attempt() for _ in range(500)))
    assert sum(results) == 50
    other = await asyncio.gather(*(attempt() for _ in range(5)))
    assert not any(other)


def test_rate_limiter_is_exact_across_threads() -> None:
    limiter = RateLimiter(RateLimit(1000, 3600))
    taken = [0] * 8

    def worker(i: int) -> None:
        for _ in range(500):
            if limiter.take(("rule", "agent")):
                taken[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(taken) == 1000


def test_token_bucket_refills_and_evicts_only_full_buckets() -> None:
    limiter = RateLimiter(RateLimit(2, 0.05), max_keys=2)
    assert limiter.take("a")
    assert limiter.take("a")
    assert not limiter.take("a")
    assert limiter.take("b")
    limiter.take("c")  # "a" and "b" are not full yet: nothing evicted, memory grows past max only then
    assert len(limiter) == 3
    import time

    time.sleep(0.06)
    assert limiter.take("a")  # refilled
    limiter.take("d")
    assert len(limiter) <= 3


async def test_finished_executions_are_forgotten_beyond_the_bound(closing: Closing) -> None:
    kernel = closing(KernelSpace(policy="permissive", keep_finished=5))
    release = asyncio.Event()

    @kernel.register
    async def worker(i: int) -> tuple[int, str | None]:
        return i, kernel.current_agent_id

    @kernel.register
    async def long_runner() -> str:
        await release.wait()
        return "done"

    running = await kernel.spawn(long_runner)
    ids = [(await kernel.execute(worker, i))[1] for i in range(50)]
    spawned = [await kernel.spawn(worker, 100 + i) for i in range(3)]
    assert [i for i, _ in await kernel.wait_all(spawned)] == [100, 101, 102]
    statuses = kernel.agents()
    assert len(statuses) == 6  # the running agent and the last five finished executions
    assert kernel.get_agent_status(running).state == "running"  # running agents are always kept
    assert kernel.get_agent_status(str(ids[-1])).state == "terminated"
    with pytest.raises(AgentNotFound):
        kernel.get_agent_status(str(ids[0]))
    with pytest.raises(AgentNotFound):
        await kernel.wait_all([str(ids[0])])
    assert len(kernel._runs) <= 6
    release.set()
    assert await kernel.wait_all([running]) == ["done"]
    with pytest.raises(KernelError):
        KernelSpace(keep_finished=-1)
    await kernel.close()


async def test_a_verifier_sees_keyword_arguments() -> None:
    async with KernelSpace(policy="strict") as kernel:
        verifier = FakeVerifier("ok")
        kernel.add_module(verifier)

        @kernel.register
        async def answer(question: str = "", *, language: str = "en") -> str:
            return f"ok: {question} ({language})"

        await kernel.execute(answer, question="capital of France?", language="fr")
        await kernel.execute(answer, "q", language="de")
        await kernel.execute(answer, "only positional")
        await kernel.execute(answer)
        assert [prompt for prompt, _, _ in verifier.calls] == [
            {"args": [], "kwargs": {"question": "capital of France?", "language": "fr"}},
            {"args": ["q"], "kwargs": {"language": "de"}},
            "only positional",
            (),
        ]


async def test_debug_logs_every_decision_and_signal(caplog: pytest.LogCaptureFixture) -> None:
    cp_logger = logging.getLogger("agent_os.control_plane")
    level = cp_logger.level
    try:
        caplog.set_level(logging.DEBUG, logger="agent_os.control_plane")
        quiet = KernelSpace(policy="strict")
        with pytest.raises(PolicyViolationError):
            await quiet.authorize("read", "x")
        await quiet.close()
        assert [r for r in caplog.records if r.name.startswith("agent_os.control_plane.kernel")] == []
        cp_logger.setLevel(logging.WARNING)
        caplog.handler.setLevel(logging.DEBUG)
        kernel = KernelSpace(policy="strict", debug=True)
        assert cp_logger.level == logging.DEBUG  # debug=True turns the level down

        @kernel.register
        async def agent() -> str:
            with pytest.raises(PolicyViolationError):
                await kernel.authorize("read", "secret")
            return "done"

        await kernel.execute(agent)
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert any("policy_violation" in m and "secret" in m for m in messages), messages
        assert any(m.startswith("agent_completed") for m in messages), messages
        await kernel.close()
    finally:
        cp_logger.setLevel(level)


@pytest.mark.parametrize("async_delivery", [False, True])
async def test_a_sigterm_handler_returning_false_vetoes_termination(async_delivery: bool) -> None:
    dispatcher = SignalDispatcher(None, async_delivery=async_delivery)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher) as kernel:
        allow = False

        @dispatcher.register_handler(AgentSignal.SIGTERM)
        async def maybe(agent_id: str, signal: AgentSignal) -> bool:
            return allow

        started = asyncio.Event()

        @kernel.register
        async def worker() -> str:
            started.set()
            await asyncio.sleep(60)
            return "never"

        task = asyncio.create_task(kernel.execute(worker))
        await started.wait()
        aid = kernel.current_agent_id or ""
        assert await dispatcher.send(aid, AgentSignal.SIGTERM) is async_delivery  # False: vetoed
        await dispatcher.drain()
        assert kernel.get_agent_status(aid).state == "running"
        allow = True
        assert await dispatcher.send(aid, AgentSignal.SIGTERM)
        await dispatcher.drain()
        with pytest.raises(AgentStoppedError):
            await task
        outcomes = [s.data["outcome"] for s in await kernel.recorder.query(event_type="signal")]
        assert outcomes == ["delivered", "vetoed", "delivered"]


async def test_sigkill_cannot_be_vetoed() -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace(policy="permissive", signal_dispatcher=dispatcher) as kernel:

        @dispatcher.register_handler(AgentSignal.SIGTERM)
        async def never(agent_id: str, signal: AgentSignal) -> bool:
            return False

        started = asyncio.Event()

        @kernel.register
        async def worker() -> None:
            started.set()
            await asyncio.sleep(60)

        task = asyncio.create_task(kernel.execute(worker))
        await started.wait()
        aid = kernel.current_agent_id or ""
        assert not await dispatcher.send(aid, AgentSignal.SIGTERM)
        assert await dispatcher.send(aid, AgentSignal.SIGKILL)
        with pytest.raises(AgentStoppedError):
            await task


def test_reload_policy_on_several_policies_names_which() -> None:
    first, second = Policy("base", version="1"), Policy("extra", version="1")
    kernel = KernelSpace(policy=first, policies=[second])
    assert isinstance(kernel.policy, PolicySet)
    with pytest.raises(PolicyError, match="say which one"):
        kernel.reload_policy(Policy("x", version="2"))
    assert (first.version, second.version) == ("1", "1")  # nothing was replaced
    kernel.reload_policy(Policy("x", version="2"), policy="extra")
    assert (first.version, second.version) == ("1", "2")
    kernel.reload_policy(Policy("x", version="3", default_action="allow"), policy=0)
    assert (first.version, first.default_action) == ("3", "allow")
    for wrong in ("nope", 2, -1):
        with pytest.raises(PolicyError):
            kernel.reload_policy(Policy("x", version="4"), policy=wrong)
    single = KernelSpace(policy=Policy("only", version="1"))
    single.reload_policy(Policy("only", version="2"))
    single.reload_policy(Policy("only", version="3"), policy="only")
    assert single.policy.version == "3"  # type: ignore[union-attr]
    with pytest.raises(PolicyError, match="one policy"):
        single.reload_policy(Policy("x"), policy="other")
