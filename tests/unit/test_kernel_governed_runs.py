"""The kernel's own examples: exactly the policies given, runs governed on their arguments,
@kernel.govern, rate limits per agent, and one record per decision of the violation's kind."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agent_os import ActionRequest
from agent_os.amb import AMB
from agent_os.control_plane import (
    DECISION_EVENTS,
    VIOLATION_EVENTS,
    KernelError,
    KernelSpace,
    Pattern,
    Policy,
    PolicyError,
    PolicySet,
    PolicyViolationError,
    RateLimitExceeded,
)
from agent_os.control_plane.policy.content import MAX_DEPTH, MAX_TEXTS, argument_texts
from tests.support import memory_url
from tests.support.closing import Closing


def _readme_kernel() -> KernelSpace:
    return KernelSpace(
        policies=[Policy.no_destructive_sql(), Policy.file_access("/workspace"), Policy.rate_limit(100, "1m")]
    )


# -- exactly the policies given --------------------------------------------------------------


async def test_policies_alone_apply_exactly_those_policies() -> None:
    async with _readme_kernel() as kernel:
        assert isinstance(kernel.policy, PolicySet)
        assert [p.name for p in kernel.policy.policies] == [
            "no_destructive_sql:any",
            "file_access:/workspace",
            "rate_limit:100/1m",
        ]
        assert kernel.decide("sql", "SELECT 1").allowed
        assert kernel.decide("read", "/workspace/a.txt").allowed
        assert not kernel.decide("read", "/etc/passwd").allowed
        assert not kernel.decide("sql", "DROP TABLE users").allowed


async def test_a_default_applies_only_when_no_policy_is_given() -> None:
    async with KernelSpace() as kernel:
        assert isinstance(kernel.policy, Policy)
        assert kernel.policy.name == "strict"
        assert not kernel.decide("read", "/workspace/a.txt").allowed
    async with KernelSpace(policies=[Policy("one", default_action="allow")]) as kernel:
        assert isinstance(kernel.policy, Policy)  # one policy is itself, not a set
        assert kernel.policy.name == "one"
    with pytest.raises(PolicyError, match="names no policy"):
        KernelSpace(policies=[])


async def test_policy_and_policies_both_apply_and_all_must_allow() -> None:
    extra = Policy("extra", default_action="allow")
    extra.add_rule("deny", Pattern("write", "/workspace/locked/*"), reason="locked")
    async with KernelSpace("permissive", policies=[extra]) as kernel:
        assert isinstance(kernel.policy, PolicySet)
        assert kernel.policy.name == "permissive+extra"
        assert kernel.decide("write", "/workspace/a.txt").allowed
        assert kernel.decide("write", "/workspace/locked/a.txt").reason == "locked"
    async with KernelSpace("strict", policies=[extra]) as kernel:
        assert kernel.decide("write", "/workspace/a.txt").reason == "default deny"


async def test_the_permissions_hook_goes_to_every_policy() -> None:
    first, second = Policy("a"), Policy("b")

    def hook(from_agent: str, to_agent: str) -> list[str]:
        return []

    async with KernelSpace(policies=[first, second], permissions=hook):
        assert first.permissions is hook
        assert second.permissions is hook


# -- runs governed on their arguments ------------------------------------------------------------


async def test_the_readme_example_blocks_drop_table_and_runs_the_rest() -> None:
    async with _readme_kernel() as kernel:

        @kernel.register
        async def data_analyst(query: str) -> str:
            return f"Analysis of {query}"

        assert await kernel.execute(data_analyst, "revenue by region") == "Analysis of revenue by region"
        with pytest.raises(PolicyViolationError) as caught:
            await kernel.execute(data_analyst, "DROP TABLE users")
        assert not isinstance(caught.value, RateLimitExceeded)
        assert caught.value.decision is not None
        assert caught.value.decision.rule_name == "no-destructive-sql-arguments"
        denied = await kernel.recorder.query(event_type="policy_violation")
        assert len(denied) == 1
        assert denied[0].data["operation"] == "run"
        assert denied[0].data["resource"] == "data_analyst"
        assert denied[0].data["reason"] == "destructive SQL in the arguments"
        assert "DROP" not in str(denied[0].data)  # the arguments are not recorded
        runs = await kernel.recorder.query(event_type="execute")
        assert [r.data["decision"] for r in runs] == ["allow"]
        assert await kernel.recorder.query(event_type="agent_completed") != []
        status = kernel.get_agent_status(denied[0].agent_id)
        assert status.violations_count == 1


HOSTILE = [
    "DROP TABLE users",
    "drop table users",
    "DrOp TaBlE users",
    "   \n\t DROP TABLE users",
    "/* harmless */ DROP TABLE users",
    "/* /* nested */ */ DROP TABLE users",
    "-- a comment\nDROP TABLE users",
    "DROP/**/TABLE users",
    "SELECT 1; DROP TABLE users",
    "SELECT 1;DROP TABLE users;",
    "revenue by region; DROP TABLE users",
    "DROP TABLE users; and then some words",
    "DROP TABLE users -- revenue by region",
    "drop table `users`",
    "DROP\u00a0TABLE users",
    "ｓｅｌｅｃｔ 1; DROP TABLE users",
    "DELETE FROM users",
    "TRUNCATE users",
    "UPDATE users SET admin = true",
    "SELECT pg_terminate_backend(42)",
    "/*! DROP TABLE users */",  # MySQL runs executable comments; no parser shows a statement
    "/*M!100000 DROP TABLE users */",
    "\x00DROP TABLE users",
    "BEGIN; DROP TABLE users; COMMIT;",
    "Robert'); DROP TABLE Students;--",
    "DROP TABLE u\u0455ers",  # a Cyrillic letter in the name: still an identifier to PostgreSQL
    # statements MySQL runs that sqlglot falls back on (a Command) and PostgreSQL does not read
    "PREPARE s FROM 'DROP TABLE users'; EXECUTE s",
    "EXECUTE IMMEDIATE 'DROP TABLE users'",
    "LOAD DATA INFILE '/tmp/rows' REPLACE INTO TABLE users",
    "CREATE TRIGGER t AFTER INSERT ON log FOR EACH ROW DELETE FROM users",
    "DELETE users FROM users JOIN log ON 1 = 1",
    "BEGIN NOT ATOMIC DELETE FROM users; END",
    "x" * 9000 + " SELECT 1",  # over the guard's bound, holding a statement word: refused
]

FREE_TEXT = [
    "revenue by region",
    "Analyze: revenue by region",
    "Show me revenue by region",
    "Explain revenue trends for Q3",
    "Please drop me a note when the report is ready",
    "Select the best region and update me",
    "What is 2+2?",
    "Update the dashboard",
    "Drop the report for me",
    "Create a chart of revenue",
    "Load the truck",
    "Call me maybe",
    "Replace the bulb",
    "Set up the report",
    "Execute the plan for Q3",
    "",
    "ＤＲＯＰ TABLE users",  # fullwidth letters: no parser reads this as a statement
    "SELECT region, sum(amount) FROM sales GROUP BY region",
    "DELETE FROM users WHERE id = 7",
    "x" * 9000,
]


@pytest.mark.parametrize("text", HOSTILE)
async def test_destructive_sql_in_the_arguments_is_blocked(text: str) -> None:
    async with KernelSpace(policies=[Policy.no_destructive_sql()]) as kernel:

        @kernel.register
        async def agent(query: str) -> str:
            return query

        with pytest.raises(PolicyViolationError):
            await kernel.execute(agent, text)
        assert len(await kernel.recorder.query(event_type="policy_violation")) == 1
        assert await kernel.recorder.query(event_type="execute") == []


@pytest.mark.parametrize("text", FREE_TEXT)
async def test_free_text_and_harmless_sql_run(text: str) -> None:
    async with KernelSpace(policies=[Policy.no_destructive_sql()]) as kernel:

        @kernel.register
        async def agent(query: str) -> str:
            return query

        assert await kernel.execute(agent, text) == text
        assert await kernel.recorder.query(event_type=list(VIOLATION_EVENTS)) == []


async def test_texts_in_keyword_arguments_lists_and_dicts_are_judged() -> None:
    async with KernelSpace(policies=[Policy.no_destructive_sql()]) as kernel:

        @kernel.register
        async def agent(*args: Any, **kwargs: Any) -> int:
            return len(args) + len(kwargs)

        assert await kernel.execute(agent, 1, None, b"DROP TABLE users", task="revenue") == 4  # not text
        cases: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            ((), {"query": "DROP TABLE users"}),
            ((["a", ("b", "DROP TABLE users")],), {}),
            (({"DROP TABLE users": 1},), {}),
            (({"q": {"inner": ["TRUNCATE users"]}},), {}),
        ]
        for args, kwargs in cases:
            with pytest.raises(PolicyViolationError):
                await kernel.execute(agent, *args, **kwargs)
        assert len(await kernel.recorder.query(event_type="policy_violation")) == 4


def test_argument_texts_are_bounded_and_say_when_they_are_incomplete() -> None:
    assert argument_texts(("a", ["b", {"c": "d"}]), {"k": "e"}) == (("a", "b", "c", "d", "e"), True)
    deep: list[Any] = ["bottom"]
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    assert argument_texts((deep,), {})[1] is False
    many = ["t"] * (MAX_TEXTS + 1)
    texts, complete = argument_texts((many,), {})
    assert len(texts) == MAX_TEXTS
    assert not complete
    cyclic: list[Any] = ["x"]
    cyclic.append(cyclic)
    assert argument_texts((cyclic,), {}) == (("x",), False)


async def test_arguments_past_the_bounds_fail_closed_only_under_a_content_rule() -> None:
    deep: list[Any] = ["revenue"]
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    async with KernelSpace(policies=[Policy.no_destructive_sql()]) as kernel:

        @kernel.register
        async def agent(data: Any) -> str:
            return "ran"

        with pytest.raises(PolicyViolationError, match="could not be decided"):
            await kernel.execute(agent, deep)
    async with KernelSpace("permissive") as kernel:

        @kernel.register
        async def other(data: Any) -> str:
            return "ran"

        assert await kernel.execute(other, deep) == "ran"


async def test_registration_is_still_the_grant_to_run_under_strict() -> None:
    async with KernelSpace("strict") as kernel:

        @kernel.register
        async def agent(query: str) -> str:
            return query

        assert await kernel.execute(agent, "DROP TABLE users") == "DROP TABLE users"  # no SQL rule here
        run = (await kernel.recorder.query(event_type="execute"))[0]
        assert (run.data["decision"], run.data["reason"]) == ("allow", "default allow")


async def test_rules_on_the_run_operation_judge_the_agent_and_its_context() -> None:
    policy = Policy("runs", default_action="deny")
    policy.add_rule("deny", Pattern("run", "intern_*"), reason="interns do not run unattended")
    policy.add_rule(
        "deny", Pattern("run", "*", conditions={"context.tenant": "blocked"}), reason="tenant blocked"
    )
    async with KernelSpace(policy) as kernel:

        @kernel.register(name="intern_bot")
        async def intern() -> str:
            return "x"

        @kernel.register
        async def analyst() -> str:
            return "y"

        with pytest.raises(PolicyViolationError, match="interns do not run"):
            await kernel.execute(intern)
        with pytest.raises(PolicyViolationError, match="tenant blocked"):
            await kernel.execute(analyst, context={"tenant": "blocked"})
        assert await kernel.execute(analyst, context={"tenant": "ok"}) == "y"


async def test_an_audit_policy_records_the_run_violation_and_runs() -> None:
    audit = Policy.no_destructive_sql()
    audit.mode = "audit"
    async with KernelSpace(policies=[audit]) as kernel:

        @kernel.register
        async def agent(query: str) -> str:
            return "ran"

        assert await kernel.execute(agent, "DROP TABLE users") == "ran"
        records = await kernel.recorder.query(event_type=["policy_violation", "execute", "agent_completed"])
        assert [(r.event_type, r.data.get("decision")) for r in records] == [
            ("policy_violation", "audit"),
            ("agent_completed", None),
        ]


# -- @kernel.govern ----------------------------------------------------------------------------


async def test_govern_wraps_an_async_function_as_a_governed_execution() -> None:
    async with KernelSpace(policy="strict", policies=[Policy.no_destructive_sql()]) as kernel:

        @kernel.govern
        async def my_langchain_agent(task: str) -> str:
            return f"done: {task}"

        assert await my_langchain_agent("summarize") == "done: summarize"
        with pytest.raises(PolicyViolationError):
            await my_langchain_agent("DROP TABLE users")
        runs = await kernel.recorder.query(event_type="execute")
        assert [r.data["agent"] for r in runs] == ["my_langchain_agent"]
        assert kernel.govern(my_langchain_agent) is my_langchain_agent  # already governed


async def test_govern_runs_a_plain_function_in_a_worker_thread_with_options() -> None:
    async with KernelSpace("permissive") as kernel:
        main = threading.get_ident()

        def invoke(task: str) -> tuple[str, bool]:
            return task.upper(), threading.get_ident() != main

        governed = kernel.govern(invoke, name="framework_agent", rate_limit=1)
        assert await governed("go") == ("GO", True)
        with pytest.raises(RateLimitExceeded):
            await governed("again")
        assert [r.data["name"] for r in await kernel.recorder.query(event_type="rate_limit_exceeded")] == [
            "framework_agent"
        ]

        class Callable_:
            async def __call__(self, x: int) -> int:
                return x + 1

        assert await kernel.govern(Callable_())(1) == 2  # an awaitable result is awaited
        with pytest.raises(KernelError, match="needs a function"):
            kernel.govern(42)  # type: ignore[call-overload]


# -- rate limits per agent ---------------------------------------------------------------------


async def test_250_runs_of_one_agent_100_allowed_the_rest_denied_and_recorded() -> None:
    # A window of an hour: the bucket does not refill measurably while the test runs.
    async with KernelSpace(policies=[Policy.rate_limit(100, "1h")]) as kernel:

        @kernel.register
        async def busy() -> int:
            return 1

        @kernel.register
        async def other() -> int:
            return 2

        allowed = denied = 0
        for _ in range(250):
            try:
                allowed += await kernel.execute(busy)
            except RateLimitExceeded:
                denied += 1
        assert (allowed, denied) == (100, 150)
        assert await kernel.execute(other) == 2  # its own budget
        records = await kernel.recorder.query(event_type="rate_limit_exceeded", limit=1000)
        assert len(records) == 150
        assert {r.data["name"] for r in records} == {"busy"}
        assert await kernel.recorder.query(event_type="policy_violation") == []


async def test_runs_actions_and_messages_of_an_agent_share_its_budget(
    tmp_path: Path, closing: Closing
) -> None:
    (tmp_path / "a.txt").write_text("a")
    async with KernelSpace(policies=[Policy.rate_limit(4, "1h")], workspace=tmp_path) as kernel:
        bus = closing(AMB("memory", memory_url("runs"), agent_id="bob"))
        kernel.attach(bus)
        await bus.connect()

        @kernel.register(name="bob")
        async def bob() -> bool:
            return (await kernel.submit(ActionRequest("fs.read", "a.txt"))).allowed

        assert await kernel.execute(bob) is True  # tokens 1 (run) and 2 (action)
        await bus.publish("reports.daily", {"n": 1})  # token 3 (message)
        assert await kernel.execute(bob) is False  # token 4 (run); the action has none left
        with pytest.raises(RateLimitExceeded):
            await bus.publish("reports.daily", {"n": 2})
        with pytest.raises(RateLimitExceeded):
            await kernel.execute(bob)
        limited = await kernel.recorder.query(event_type="rate_limit_exceeded")
        assert [r.data["operation"] for r in limited] == ["read", "publish", "run"]  # one each


async def test_message_denials_are_recorded_by_kind(closing: Closing) -> None:
    policy = Policy("bus", default_action="allow")
    policy.add_rule("deny", Pattern("publish", "secrets.*"), reason="no secrets")
    async with KernelSpace(policy) as kernel:
        bus = closing(AMB("memory", memory_url("kinds"), agent_id="carol"))
        kernel.attach(bus)
        await bus.connect()
        await bus.publish("reports.daily", 1)
        with pytest.raises(PolicyViolationError):
            await bus.publish("secrets.keys", 2)
        kernel.get_agent("carol").permissions = frozenset({"read"})
        with pytest.raises(PolicyViolationError):
            await bus.publish("reports.daily", 3)
        records = await kernel.recorder.query(event_type=DECISION_EVENTS)
        assert [(r.event_type, r.data["resource"]) for r in records] == [
            ("policy_decision", "reports.daily"),
            ("policy_violation", "secrets.keys"),
            ("permission_denied", "reports.daily"),
        ]


def test_a_default_given_to_evaluate_is_cached_apart_from_the_policys_own() -> None:
    strict = Policy.builtin("strict")
    for _ in range(2):  # the second round answers from the decision cache
        assert strict.evaluate("run", "agent", {"agent_id": "agent"}, default="allow").allowed
        assert not strict.evaluate("run", "agent", {"agent_id": "agent"}).allowed
    sql = Policy.no_destructive_sql()
    for text, allowed in [("revenue", True), ("DROP TABLE t", False), ("revenue", True)]:
        ctx = {"agent_id": "agent", "content": (text,)}
        assert sql.evaluate("run", "agent", ctx, default="allow").allowed is allowed  # never cached
