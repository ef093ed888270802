"""kernel.submit: identity, permissions, policy, rate limits, signals; one decision record and
one outcome record per allowed action, one record of the denial's kind per denial."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import (
    VIOLATION_EVENTS,
    AgentSignal,
    KernelSpace,
    Pattern,
    Policy,
    RateLimitExceeded,
    SignalDispatcher,
)
from agent_os.control_plane.recorder.records import FREQUENT_EVENTS
from tests.support import wait_until


async def _events(kernel: KernelSpace) -> list[tuple[str, str | None, str | None]]:
    """(event type, action, decision or status) of every action record, in order."""
    records = await kernel.recorder.query(event_type=["policy_decision", *VIOLATION_EVENTS, "action_outcome"])
    return [
        (r.event_type, r.data.get("action"), r.data.get("decision", r.data.get("status"))) for r in records
    ]


async def test_round_trip_records_one_decision_and_one_outcome_each(tmp_path: Path) -> None:
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:

        @kernel.register(permissions=["read", "write"])
        async def worker() -> list[ActionResult]:
            return [
                await kernel.submit(
                    ActionRequest("fs.write", "notes/a.txt", {"content": "hi", "parents": True})
                ),
                await kernel.submit(ActionRequest("fs.read", "notes/a.txt")),
                await kernel.submit(ActionRequest("fs.list", "notes")),
                await kernel.submit(ActionRequest("fs.delete", "notes/a.txt")),
                await kernel.submit(ActionRequest("fs.list", "notes")),
            ]

        write, read, listed, deleted, empty = await kernel.execute(worker)
        assert write.ok
        assert write.output == {"path": str(tmp_path / "notes/a.txt"), "bytes": 2}
        assert read.ok
        assert read.output == "hi"
        assert listed.output == [{"name": "a.txt", "type": "file", "size": 2}]
        assert deleted.ok
        assert not (tmp_path / "notes/a.txt").exists()
        assert empty.output == []
        events = await _events(kernel)
        actions = ["fs.write", "fs.read", "fs.list", "fs.delete", "fs.list"]
        assert events == [
            e for a in actions for e in (("policy_decision", a, "allow"), ("action_outcome", a, "ok"))
        ]
        outcome = await kernel.recorder.query(event_type="action_outcome", limit=1)
        assert outcome[0].id == write.record_id
        decision = (await kernel.recorder.query(event_type="policy_decision", limit=1))[0]
        assert outcome[0].data["decision_id"] == decision.id
        assert decision.data["operation"] == "write"
        assert decision.data["resource"] == str(tmp_path / "notes/a.txt")
        assert (await kernel.recorder.verify()).ok
        # An allowed action's decision is of the type SQLite leaves out of its index; its
        # outcome is not (actions can be rare beside messages: a query for them uses it).
        assert [e in FREQUENT_EVENTS for e, _, _ in events[:2]] == [True, False]


async def test_an_agent_without_write_cannot_write_or_delete(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("kept")
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:

        @kernel.register(permissions=["read"])
        async def reader() -> list[ActionResult]:
            return [
                await kernel.submit(ActionRequest("fs.read", "keep.txt")),
                await kernel.submit(ActionRequest("fs.write", "new.txt", {"content": "x"})),
                await kernel.submit(ActionRequest("fs.delete", "keep.txt")),
            ]

        read, write, delete = await kernel.execute(reader)
        assert read.output == "kept"
        for denied in (write, delete):
            assert not denied.allowed
            assert denied.output is None
            assert denied.error == "agent reader lacks permission for write"
        assert not (tmp_path / "new.txt").exists()
        assert (tmp_path / "keep.txt").read_text() == "kept"
        violations = await kernel.recorder.query(event_type="permission_denied")
        assert [v.id for v in violations] == [write.record_id, delete.record_id]
        assert [v.data["action"] for v in violations] == ["fs.write", "fs.delete"]
        assert await kernel.recorder.query(event_type="policy_violation") == []
        assert await _events(kernel) == [
            ("policy_decision", "fs.read", "allow"),
            ("action_outcome", "fs.read", "ok"),
            ("permission_denied", "fs.write", "deny"),
            ("permission_denied", "fs.delete", "deny"),
        ]


async def test_policy_rules_judge_the_permission_the_path_and_the_action(tmp_path: Path) -> None:
    (tmp_path / "public").mkdir()
    (tmp_path / "public/a.txt").write_text("a")
    no_delete = Policy("no-delete", default_action="allow")
    no_delete.add_rule("deny", Pattern("write", "*", conditions={"action": "fs.delete"}), reason="no deletes")
    policies = [Policy.file_access(str(tmp_path / "public")), no_delete]
    async with KernelSpace("permissive", policies=policies, workspace=tmp_path) as kernel:

        @kernel.register
        async def agent() -> list[ActionResult]:
            return [
                await kernel.submit(ActionRequest("fs.write", "public/b.txt", {"content": "b"})),
                await kernel.submit(ActionRequest("fs.write", "private.txt", {"content": "p"})),
                await kernel.submit(ActionRequest("fs.delete", "public/a.txt")),
            ]

        inside, outside, delete = await kernel.execute(agent)
        assert inside.ok
        assert (tmp_path / "public/b.txt").read_text() == "b"
        assert not outside.allowed
        assert outside.error == f"write outside {tmp_path / 'public'}"
        assert not (tmp_path / "private.txt").exists()
        assert not delete.allowed
        assert delete.error == "no deletes"
        assert (tmp_path / "public/a.txt").exists()
        found = await kernel.recorder.query(event_type="policy_violation")
        assert [(r.data["rule"], r.data["reason"]) for r in found] == [
            ("write-outside-root", outside.error),
            (found[1].data["rule"], "no deletes"),
        ]


async def test_rate_limits_count_per_agent_across_its_executions(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    async with KernelSpace(Policy.rate_limit(5, "1h"), workspace=tmp_path) as kernel:

        @kernel.register
        async def busy() -> list[bool]:
            return [(await kernel.submit(ActionRequest("fs.read", "a.txt"))).allowed for _ in range(2)]

        @kernel.register
        async def other() -> bool:
            return (await kernel.submit(ActionRequest("fs.read", "a.txt"))).allowed

        # runs and actions take from one bucket per agent: 5 = run, read, read, run, read
        assert await kernel.execute(busy) == [True, True]
        assert await kernel.execute(busy) == [True, False]  # the same agent, a new execution
        assert await kernel.execute(other) is True
        with pytest.raises(RateLimitExceeded):
            await kernel.execute(busy)
        denied = await kernel.recorder.query(event_type="rate_limit_exceeded")
        assert len(denied) == 2
        assert "rate limit" in denied[0].data["reason"]
        assert denied[0].data["agent_name"] == "busy"
        assert (denied[1].data["operation"], denied[1].data["resource"]) == ("run", "busy")


async def test_unknown_agents_and_impersonation_are_denied(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        ghost = await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="ghost"))
        assert not ghost.allowed
        assert ghost.error == "unknown agent 'ghost'"
        anonymous = await kernel.submit(ActionRequest("fs.read", "a.txt"))
        assert not anonymous.allowed
        assert "needs an agent_id" in (anonymous.error or "")
        kernel.external("bob")
        assert (await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="bob"))).output == "a"

        @kernel.register
        async def mallory() -> ActionResult:
            return await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="bob"))

        posing = await kernel.execute(mallory)
        assert not posing.allowed
        assert posing.error == "agent mallory cannot act as 'bob'"
        unknown_action = await kernel.submit(ActionRequest("fs.chmod", "a.txt", agent_id="bob"))
        assert not unknown_action.allowed
        assert unknown_action.error == "unknown action 'fs.chmod'"
        events = await _events(kernel)
        assert [e[0] for e in events] == [
            "action_blocked",
            "action_blocked",
            "policy_decision",
            "action_outcome",
            "action_blocked",
            "action_blocked",
        ]
        assert kernel.get_agent_status("bob").violations_count == 1


async def test_a_stopped_agent_waits_for_sigcont_and_a_killed_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace("permissive", workspace=tmp_path, signal_dispatcher=dispatcher) as kernel:
        kernel.external("bob")
        assert await kernel.send_signal("bob", AgentSignal.SIGSTOP)
        pending = asyncio.create_task(kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="bob")))
        await wait_until(lambda: len(kernel.get_agent("bob")._continue._waiters) > 0, what="submit waits")
        assert not pending.done()
        assert await _events(kernel) == []
        assert await kernel.send_signal("bob", AgentSignal.SIGCONT)
        result = await asyncio.wait_for(pending, 5)
        assert result.output == "a"
        records = await kernel.recorder.query(event_type=["signal", "policy_decision"])
        kinds = [r.data.get("signal", r.event_type) for r in records]
        assert kinds == ["SIGSTOP", "SIGCONT", "policy_decision"]  # decided after the SIGCONT

        assert await kernel.send_signal("bob", AgentSignal.SIGKILL)
        killed = await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="bob"))
        assert not killed.allowed
        assert killed.error == "agent bob was killed or has finished"
        last = (await kernel.recorder.query(event_type="action_blocked"))[-1]
        assert last.id == killed.record_id


async def test_a_kill_while_stopped_refuses_the_waiting_submit(tmp_path: Path) -> None:
    dispatcher = SignalDispatcher(None, async_delivery=False)
    async with KernelSpace("permissive", workspace=tmp_path, signal_dispatcher=dispatcher) as kernel:
        kernel.external("bob")
        await kernel.send_signal("bob", AgentSignal.SIGSTOP)
        pending = asyncio.create_task(kernel.submit(ActionRequest("fs.list", ".", agent_id="bob")))
        await wait_until(lambda: len(kernel.get_agent("bob")._continue._waiters) > 0, what="submit waits")
        await kernel.send_signal("bob", AgentSignal.SIGKILL)
        result = await asyncio.wait_for(pending, 5)
        assert not result.allowed
        assert "killed" in (result.error or "")
        assert [e[0] for e in await _events(kernel)] == ["action_blocked"]


class Lookup:
    """A custom provider: looks a name up in a table."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table

    def resource(self, request: ActionRequest) -> str:
        return f"crm:{request.target}"

    async def run(self, request: ActionRequest) -> Any:
        return self.table[request.target]


async def test_custom_providers_are_governed_like_the_built_in_ones() -> None:
    policy = Policy("crm", default_action="allow")
    policy.add_rule("deny", Pattern("read", "crm:vip*"), reason="VIPs are private")
    async with KernelSpace(policy) as kernel:
        kernel.actions.register("crm.lookup", Lookup({"ann": 1, "vip-bo": 2}), "read")
        kernel.external("bob")
        found = await kernel.submit(ActionRequest("crm.lookup", "ann", agent_id="bob"))
        vip = await kernel.submit(ActionRequest("crm.lookup", "vip-bo", agent_id="bob"))
        missing = await kernel.submit(ActionRequest("crm.lookup", "zed", agent_id="bob"))
        assert found.ok
        assert found.output == 1
        assert not vip.allowed
        assert vip.error == "VIPs are private"
        assert missing.allowed
        assert not missing.ok
        assert missing.error == "'zed'"
        assert await _events(kernel) == [
            ("policy_decision", "crm.lookup", "allow"),
            ("action_outcome", "crm.lookup", "ok"),
            ("policy_violation", "crm.lookup", "deny"),
            ("policy_decision", "crm.lookup", "allow"),
            ("action_outcome", "crm.lookup", "error"),
        ]
        failed = (await kernel.recorder.query(event_type="action_outcome"))[-1]
        assert failed.id == missing.record_id
        assert failed.severity == "error"


async def test_an_audit_policy_lets_the_action_run_and_records_the_violation(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    audit = Policy("watch", default_action="allow", mode="audit")
    audit.add_rule("deny", Pattern("read", "*"), reason="reads are watched")
    async with KernelSpace(audit, workspace=tmp_path) as kernel:
        kernel.external("bob")
        result = await kernel.submit(ActionRequest("fs.read", "a.txt", agent_id="bob"))
        assert result.output == "a"
        assert await _events(kernel) == [
            ("policy_violation", "fs.read", "audit"),
            ("action_outcome", "fs.read", "ok"),
        ]


class Echo:
    """A provider with neither a ``permission`` nor a ``context`` method."""

    def resource(self, request: ActionRequest) -> str:
        return request.target

    async def run(self, request: ActionRequest) -> Any:
        return request.target


def _decision_rules(rng: random.Random) -> Policy:
    """Rules on the fields a cached decision is keyed by (``agent_id``) and on those it is not
    (``action``, ``target``, ``params``), in a random order, with a random default."""
    policy = Policy("mixed", default_action=rng.choice(["allow", "deny"]))
    conditions: list[dict[str, Any] | None] = [
        None,
        {"agent_id": "ann"},
        {"agent_id": {"$in": ["bob", "cy"]}},
        {"action": "echo.b"},
        {"target": {"$regex": "^t[12]"}},
        {"params.n": {"$gt": 1}},
        {"agent_name": "bob"},
    ]
    for i in range(rng.randint(1, 8)):
        pattern = Pattern(
            rng.choice(["read", "*"]), rng.choice(["t*", "t1", "*", "u*"]), conditions=rng.choice(conditions)
        )
        policy.add_rule(rng.choice(["allow", "deny"]), pattern, name=f"r{i}")
    return policy


async def _decisions(
    policy: Policy, steps: list[tuple[str, str, str, int]], cached: bool
) -> list[tuple[Any, ...]]:
    async with KernelSpace(policy) as kernel:
        if not cached:
            kernel.gate.cached_action = lambda *_args: None  # type: ignore[method-assign]
        kernel.actions.register("echo.a", Echo(), "read")
        kernel.actions.register("echo.b", Echo(), "read")
        for name, permissions in (("ann", {"read"}), ("bob", None), ("cy", {"write"})):
            kernel.external(name).permissions = None if permissions is None else frozenset(permissions)
        for i, (agent, action, target, n) in enumerate(steps):
            if i % 10 == 9:  # permissions change under decisions already cached
                ann = kernel.external("ann")
                ann.permissions = frozenset({"write"} if ann.permissions == frozenset({"read"}) else {"read"})
            await kernel.submit(ActionRequest(action, target, {"n": n}, agent_id=agent))
        records = await kernel.recorder.query(event_type=["policy_decision", *VIOLATION_EVENTS])
        return [(r.event_type, r.data["decision"], r.data["rule"], r.data["reason"]) for r in records]


async def test_a_cached_action_decision_equals_the_one_built_from_the_whole_context() -> None:
    # submit skips building the context when the policy has the decision cached: each step's
    # decision must be the one the whole context gives, whatever the rules look at.
    rng = random.Random(5)
    for _ in range(20):
        policy_seed = rng.random()
        steps = [
            (
                rng.choice(["ann", "bob", "cy"]),
                rng.choice(["echo.a", "echo.b"]),
                rng.choice(["t1", "t2", "u3"]),
                rng.randint(0, 2),
            )
            for _ in range(30)
        ]
        fast = await _decisions(_decision_rules(random.Random(policy_seed)), steps, cached=True)
        slow = await _decisions(_decision_rules(random.Random(policy_seed)), steps, cached=False)
        assert fast == slow


def test_the_fast_constructors_build_equal_frozen_results_and_decisions() -> None:
    from agent_os.control_plane.actions.registry import ActionSpec
    from agent_os.control_plane.actions.request import action_result
    from agent_os.control_plane.kernel.submit import ActionDecision, action_decision
    from agent_os.control_plane.policy.decision import Decision

    result = action_result(True, {"x": 1}, None, "evt_1")
    assert result == ActionResult(True, {"x": 1}, None, "evt_1")
    assert result.ok
    request = ActionRequest("echo.a", "t1")
    spec = ActionSpec("echo.a", Echo(), "read")
    allow = Decision(True, "allow", "ok", "p")
    fields = (request, "ann-1", spec, {"action": "echo.a"}, allow, "evt_2")
    decided = action_decision(*fields)
    assert decided == ActionDecision(*fields)
    assert decided.allowed
    for frozen, name in ((result, "error"), (decided, "record_id")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, name, "changed")


async def test_provider_hooks_given_after_registration_are_asked_for_each_request() -> None:
    # A provider configured after it was registered: its permission and context methods and its
    # snapshot store count from then on (a hook missed would turn a denial into an allow).
    policy = Policy("p", default_action="allow")
    policy.add_rule("deny", Pattern("read", "*", conditions={"host": "evil.example"}), reason="evil host")
    async with KernelSpace(policy) as kernel:
        provider: Any = Echo()
        kernel.actions.register("echo.a", provider, "read")
        kernel.external("ann").permissions = frozenset({"read"})
        assert (await kernel.submit(ActionRequest("echo.a", "t1", agent_id="ann"))).ok  # cached allow
        provider.context = lambda request: {"host": "evil.example"}
        denied = await kernel.submit(ActionRequest("echo.a", "t1", agent_id="ann"))
        assert not denied.allowed
        assert denied.error == "evil host"
        del provider.context
        provider.permission = lambda request: "write"
        lacking = await kernel.submit(ActionRequest("echo.a", "t1", agent_id="ann"))
        assert not lacking.allowed
        assert lacking.error == "agent ann lacks permission for write"


class OddResource(str):
    """A resource whose hash raises: a provider's bug."""

    def __hash__(self) -> int:
        raise ValueError("no hash")

    __eq__ = str.__eq__


async def test_a_resource_the_decision_cache_cannot_take_is_still_judged_and_recorded() -> None:
    class Odd(Echo):
        def resource(self, request: ActionRequest) -> str:
            return OddResource(request.target)

    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("read", "t1"))
    async with KernelSpace(policy) as kernel:
        kernel.actions.register("odd.act", Odd(), "read")
        kernel.external("ann")
        allowed = await kernel.submit(ActionRequest("odd.act", "t1", agent_id="ann"))  # no ValueError
        denied = await kernel.submit(ActionRequest("odd.act", "t2", agent_id="ann"))
        assert allowed.ok
        assert not denied.allowed
        assert await _events(kernel) == [
            ("policy_decision", "odd.act", "allow"),
            ("action_outcome", "odd.act", "ok"),
            ("policy_violation", "odd.act", "deny"),
        ]
