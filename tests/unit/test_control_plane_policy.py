"""The policy engine: matching, order, conditions, fail-closed, YAML, reload, compiled index."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent_os.control_plane import AgentSignal, Pattern, Policy, PolicyError, PolicyLoadError, PolicySet


def test_first_match_wins_in_rule_order() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("deny", Pattern("read", "data/secret/*"), reason="secret", name="no-secret")
    policy.add_rule("allow", Pattern("read", "data/*"), name="read-data")
    assert policy.evaluate("read", "data/secret/x").rule_name == "no-secret"
    assert not policy.evaluate("read", "data/secret/x").allowed
    assert policy.evaluate("read", "data/public/x").rule_name == "read-data"
    assert policy.evaluate("read", "data/public/x").allowed
    reordered = Policy("q", rules=[policy.rules[1], policy.rules[0]])
    assert reordered.evaluate("read", "data/secret/x").allowed  # now the allow comes first


def test_default_action_applies_when_nothing_matches() -> None:
    strict, permissive = Policy.builtin("strict"), Policy.builtin("permissive")
    assert not strict.evaluate("write", "anything").allowed
    assert strict.evaluate("write", "anything").rule is None
    assert permissive.evaluate("write", "anything").allowed
    with pytest.raises(PolicyError):
        Policy.builtin("lenient")


def test_audit_mode_allows_but_marks_the_violation() -> None:
    audit = Policy.builtin("audit")
    audit.add_rule("deny", Pattern("write", "db/*"), reason="no writes")
    decision = audit.evaluate("write", "db/users")
    assert decision.allowed
    assert decision.violation
    assert decision.action == "audit"
    assert decision.reason == "no writes"
    assert not audit.evaluate("read", "db/users").violation


def test_exclude_removes_resources_from_a_match() -> None:
    policy = Policy("p")
    policy.add_rule("allow", Pattern("read", "data/*", exclude=["data/phi/*", "data/pii/*"]))
    assert policy.evaluate("read", "data/reports/q1").allowed
    assert not policy.evaluate("read", "data/phi/p1").allowed
    assert not policy.evaluate("read", "data/pii/p1").allowed


def test_regex_must_match_the_whole_resource() -> None:
    policy = Policy("p")
    policy.add_rule("allow", Pattern("write", r"db/users/\d+", match_type="regex"))
    assert policy.evaluate("write", "db/users/42").allowed
    assert not policy.evaluate("write", "db/users/42/extra").allowed
    assert not policy.evaluate("write", "db/users/abc").allowed
    with pytest.raises(PolicyError, match="invalid regex"):
        Pattern("write", "db/(", match_type="regex")
    with pytest.raises(PolicyError, match="match_type"):
        Pattern("write", "x", match_type="fuzzy")  # type: ignore[arg-type]


def test_operation_globs() -> None:
    policy = Policy("p")
    policy.add_rule("allow", Pattern("*", "api/*", exclude=["api/admin/*"]))
    policy.add_rule("allow", Pattern("re*", "files/*"))
    assert policy.evaluate("anything", "api/v1").allowed
    assert not policy.evaluate("anything", "api/admin/x").allowed
    assert policy.evaluate("request", "files/a").allowed
    assert not policy.evaluate("publish", "files/a").allowed


def test_conditions_on_sender_trust_headers_and_payload() -> None:
    policy = Policy("p")
    policy.add_rule(
        "allow",
        Pattern(
            "publish",
            "pay.*",
            conditions={
                "sender": ["billing", "treasury"],
                "min_trust_level": 0.8,
                "headers.x-tenant": "acme",
                "payload.amount": {"$lte": 1000},
                "payload.memo": {"$regex": "^inv-"},
            },
        ),
    )
    ok = {
        "sender": "billing",
        "trust_level": 0.9,
        "headers": {"x-tenant": "acme"},
        "payload": {"amount": 10, "memo": "inv-1"},
    }
    assert policy.evaluate("publish", "pay.out", ok).allowed
    for change in (
        {"sender": "mallory"},
        {"trust_level": 0.5},
        {"headers": {"x-tenant": "evil"}},
        {"payload": {"amount": 5000, "memo": "inv-1"}},
        {"payload": {"amount": 1, "memo": "x"}},
    ):
        assert not policy.evaluate("publish", "pay.out", {**ok, **change}).allowed, change
    missing = dict(ok)
    del missing["trust_level"]
    assert not policy.evaluate("publish", "pay.out", missing).allowed  # missing field: no match


def test_reference_conditions_with_time_window_and_max_cost() -> None:
    pattern = Pattern(
        "execute",
        "tools/*",
        conditions={
            "user_role": ["admin", "operator"],
            "time_window": {"start": "09:00", "end": "17:00"},
            "max_cost": 100.0,
        },
    )
    policy = Policy("p", rules=None)
    policy.add_rule("allow", pattern)
    noon = datetime(2024, 1, 15, 12, 0, tzinfo=UTC)
    night = datetime(2024, 1, 15, 23, 0, tzinfo=UTC)
    ctx = {"user_role": "admin", "cost": 50.0, "now": noon}
    assert policy.evaluate("execute", "tools/grep", ctx).allowed
    assert not policy.evaluate("execute", "tools/grep", {**ctx, "now": night}).allowed
    assert not policy.evaluate("execute", "tools/grep", {**ctx, "cost": 150.0}).allowed
    assert not policy.evaluate("execute", "tools/grep", {**ctx, "user_role": "guest"}).allowed
    with pytest.raises(PolicyError):
        Pattern("x", "y", conditions={"time_window": {"start": "nine"}})
    with pytest.raises(PolicyError):
        Pattern("x", "y", conditions={"amount": {"$between": [1, 2]}})


def test_permission_condition_uses_the_trust_edge_hook() -> None:
    edges = {("b", "a"): {"send_data"}, ("c", "a"): {"request_action"}}  # (grantor, grantee)
    calls: list[tuple[str, str]] = []

    def permissions(src: str, dst: str) -> set[str]:
        calls.append((src, dst))
        return edges.get((src, dst), set())

    policy = Policy("p", permissions=permissions)
    policy.add_rule("allow", Pattern("publish", "*", conditions={"permission": "send_data"}))
    assert policy.evaluate("publish", "t", {"sender": "a", "recipient": "b"}).allowed
    assert not policy.evaluate("publish", "t", {"sender": "a", "recipient": "c"}).allowed
    assert not policy.evaluate("publish", "t", {"sender": "a"}).allowed  # no recipient: no edge
    assert ("b", "a") in calls
    assert ("c", "a") in calls
    no_hook = Policy("q", rules=policy.rules)
    assert not no_hook.evaluate("publish", "t", {"sender": "a", "recipient": "b"}).allowed


def test_an_error_during_evaluation_denies() -> None:
    def broken(src: str, dst: str) -> set[str]:
        raise RuntimeError("trust store down")

    policy = Policy("p", default_action="allow", permissions=broken)
    policy.add_rule("allow", Pattern("publish", "*", conditions={"permission": "x"}))
    decision = policy.evaluate("publish", "t", {"sender": "a", "recipient": "b"})
    assert not decision.allowed
    assert decision.reason.startswith("evaluation_error")
    # A comparison that cannot be decided is not an error: it matches a deny rule only
    # (tests/hostile/test_policy_numbers.py covers every form).
    typed = Policy("q", default_action="allow")
    typed.add_rule("deny", Pattern("*", "*", conditions={"payload.n": {"$gt": 3}}))
    assert not typed.evaluate("publish", "t", {"payload": {"n": "a string"}}).allowed


def test_require_verified_sender() -> None:
    policy = Policy("p", default_action="allow", require_verified_sender=True)
    assert not policy.evaluate("deliver", "t", {"sender": "x", "verified": False}).allowed
    assert policy.evaluate("deliver", "t", {"sender": "x", "verified": True}).allowed


def test_on_violation_signal_is_in_the_decision() -> None:
    policy = Policy("healthcare_policy", default_action="deny")
    policy.add_rule(
        "deny",
        Pattern("write", "data/phi/*"),
        reason="PHI write requires explicit approval",
        on_violation="SIGKILL",
    )
    decision = policy.evaluate("write", "data/phi/patient_001.json")
    assert decision.signal is AgentSignal.SIGKILL
    assert decision.violation
    assert policy.evaluate("write", "elsewhere").signal is None
    with pytest.raises(PolicyError):
        policy.add_rule("deny", Pattern("x", "y"), on_violation="SIGNOPE")
    with pytest.raises(PolicyError):
        policy.add_rule("maybe", Pattern("x", "y"))  # type: ignore[arg-type]


def test_readme_helpers() -> None:
    sql = Policy.no_destructive_sql()
    assert not sql.evaluate("sql", "DROP TABLE users").allowed
    assert not sql.evaluate("sql", "delete from users").allowed
    assert sql.evaluate("sql", "DELETE FROM users WHERE id = 1").allowed
    assert sql.evaluate("sql", "SELECT * FROM users").allowed
    files = Policy.file_access("/workspace")
    assert files.evaluate("read", "/workspace/a.txt").allowed
    assert not files.evaluate("write", "/etc/passwd").allowed
    assert not files.evaluate("read", "/workspace/../etc/passwd").allowed
    assert files.evaluate("network", "https://x").allowed  # not a file operation
    limited = Policy.rate_limit(3, "1m")
    results = [limited.evaluate("call", "x", {"agent_id": "a"}).allowed for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert limited.evaluate("call", "x", {"agent_id": "b"}).allowed  # per agent
    combined = PolicySet([Policy.no_destructive_sql(), Policy.file_access("/workspace")])
    assert not combined.evaluate("sql", "TRUNCATE t").allowed
    assert not combined.evaluate("write", "/tmp/x").allowed
    assert combined.evaluate("write", "/workspace/x").allowed


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 1; DROP TABLE users",
        "/* x */ DROP TABLE users",
        "WITH d AS (DELETE FROM users RETURNING *) SELECT 1",
        "WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d WHERE true",
        "DELETE FROM users -- where",
        "DELETE FROM users /* where id = 1 */",
        "delete\nfrom users",
        "UPDATE users SET admin = true",
        "UPDATE users SET a = (SELECT b FROM c WHERE c.id = 1)",
        "DELETE FROM users WHERE id = 1; DELETE FROM users",
        "SELECT '--'; DROP TABLE users",
        "SELECT 'it''s'; TRUNCATE users",
        "SELECT E'\\''; DROP TABLE users; --'",  # backslash escapes: DROP is code in one reading
        "/* /* */ DROP TABLE users; */",  # MySQL does not nest comments: DROP is code there
        "/*! DROP TABLE users */",  # MySQL runs executable comments
        "SELECT 1 # x\n; DROP TABLE users",
        "EXPLAIN ANALYZE DELETE FROM users WHERE id = 1",
        "ALTER TABLE users DROP COLUMN email",
        "SELECT * FROM t WHERE x = 'unterminated",
        "DELETE FROM users /* where",
    ],
)
def test_no_destructive_sql_denies_hidden_and_nested_statements(statement: str) -> None:
    policy = Policy.no_destructive_sql()
    assert not policy.evaluate("sql", statement).allowed, statement
    assert not policy.evaluate_linear("sql", statement).allowed


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM users",
        "SELECT 'DROP TABLE users', \"drop\" FROM t",
        "SELECT * FROM t -- DROP TABLE users",
        "SELECT * FROM t /* TRUNCATE t */",
        "DELETE FROM users WHERE id = 1",
        "UPDATE users SET a = 1 WHERE id IN (SELECT id FROM x)",
        "SELECT * FROM accounts WHERE id = 1 FOR UPDATE",
        "CREATE TABLE t (u int REFERENCES users ON DELETE CASCADE ON UPDATE CASCADE)",
        "SELECT dropped_at, updated FROM t;",
        "",
    ],
)
def test_no_destructive_sql_allows_what_is_not_destructive(statement: str) -> None:
    assert Policy.no_destructive_sql().evaluate("sql", statement).allowed, statement


def test_no_destructive_sql_reads_dialect_only_syntax_in_its_dialect() -> None:
    upsert = "INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 1"  # MySQL only
    assert Policy.no_destructive_sql("mysql").evaluate("sql", upsert).allowed
    assert not Policy.no_destructive_sql().evaluate("sql", upsert).allowed  # PostgreSQL cannot read it


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/data", True),
        ("/data/a.txt", True),
        ("/data/./sub/b", True),
        ("/data/..", False),
        ("/data/../etc/passwd", False),
        ("/data/sub/../../etc", False),
        ("/data/sub/../a", False),  # inside after normalizing, but a '..' segment is refused
        ("/database/x", False),
        ("/etc/passwd", False),
        ("data/a.txt", False),  # relative: not under the root
        ("//data/a", False),
        ("/data\\..\\etc", False),
        ("", False),
    ],
)
def test_file_access_normalizes_paths(path: str, allowed: bool) -> None:
    policy = Policy.file_access("/data/")
    assert policy.evaluate("read", path).allowed is allowed, path
    assert policy.evaluate_linear("write", path).allowed is allowed
    assert policy.evaluate("network", path).allowed  # not a file operation


def test_file_access_needs_an_absolute_root() -> None:
    with pytest.raises(PolicyError, match="absolute"):
        Policy.file_access("data")
    root = Policy.file_access("/")
    assert root.evaluate("read", "/anything/at/all").allowed
    assert not root.evaluate("read", "/a/../b").allowed


def _random_policy(rng: random.Random, n: int) -> Policy:
    policy = Policy("random", default_action=rng.choice(["allow", "deny"]))
    tokens = ["tasks", "data", "events", "api", "db"]
    for i in range(n):
        op = rng.choice(["publish", "deliver", "read", "*", "re*"])
        kind = rng.random()
        if kind < 0.5:
            resource = f"{rng.choice(tokens)}.{rng.choice(['*', 'a', 'b.*', 'c'])}"
        elif kind < 0.7:
            resource = rng.choice(["*", "ta*", "d*.*", "*.a"])
        elif kind < 0.85:
            resource = f"{rng.choice(tokens)}/{rng.choice(['*', 'x'])}"
        else:
            resource = rng.choice([r"tasks\.\w+", r"(data|db)\..*", r".*\.c"])
        policy.add_rule(
            rng.choice(["allow", "deny"]),
            Pattern(
                op,
                resource,
                "regex" if "\\" in resource or "(" in resource or resource == r".*\.c" else "glob",
                exclude=[f"{rng.choice(tokens)}.b.x"]
                if "\\" not in resource
                and "(" not in resource
                and resource != r".*\.c"
                and rng.random() < 0.2
                else None,
            ),
            name=f"r{i}",
        )
    return policy


def test_compiled_index_decides_exactly_like_a_linear_scan() -> None:
    rng = random.Random(7)
    resources = [
        "tasks.a",
        "tasks.b.x",
        "data.c",
        "events.z",
        "api/x",
        "db.c",
        "tasksx",
        "d.a",
        "",
        ".a",
        "data/x",
        "x",
    ]
    ops = ["publish", "deliver", "read", "request", "write"]
    for _ in range(30):
        policy = _random_policy(rng, rng.randint(1, 60))
        for op in ops:
            for res in resources:
                fast, slow = policy.evaluate(op, res), policy.evaluate_linear(op, res)
                assert (fast.allowed, fast.rule_name) == (slow.allowed, slow.rule_name), (op, res)


def test_compiled_index_skips_rules_of_other_topics() -> None:
    policy = Policy("big")
    for i in range(1000):
        policy.add_rule("allow", Pattern("publish", f"svc{i}.events.*"))
    assert policy.evaluate("publish", "svc999.events.x").rule_name == "rule-1000"
    assert len(policy._compiled.candidates("publish", "svc999.events.x")) == 1
    assert not policy.evaluate("publish", "other.events.x").allowed


YAML = """\
name: healthcare
version: 2
default_action: deny
rules:
  - name: read-data
    action: allow
    operation: read
    resource: "data/*"
    exclude: ["data/phi/*"]
  - name: phi-write
    action: deny
    operation: write
    resource: "data/phi/*"
    reason: PHI write requires explicit approval
    on_violation: SIGKILL
  - action: allow
    operation: network
    resource: "https://api.approved-service.com/*"
    rate_limit: 2
"""


def test_yaml_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(YAML)
    policy = Policy.from_yaml(path)
    assert (policy.name, policy.version, len(policy.rules)) == ("healthcare", "2", 3)
    assert policy.evaluate("read", "data/x").allowed
    assert policy.evaluate("write", "data/phi/1").signal is AgentSignal.SIGKILL
    url = "https://api.approved-service.com/v1"
    got = [policy.evaluate("network", url, {"agent_id": "a"}).allowed for _ in range(3)]
    assert got == [True, True, False]


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("version: 1\n", 1, "name"),
        ("name: p\ncolour: red\n", 2, "colour"),
        ("name: p\ndefault_action: maybe\n", 2, "default_action"),
        ("name: p\nrules:\n  - operation: read\n", 3, "rules[0].action"),
        ("name: p\nrules:\n  - action: allow\n    resourse: x\n", 4, "rules[0].resourse"),
        (
            "name: p\nrules:\n  - action: allow\n    resource: '('\n    match_type: regex\n",
            4,
            "rules[0].resource",
        ),
        ("name: p\nrules:\n  - action: deny\n    on_violation: SIGFOO\n", 4, "rules[0].on_violation"),
        ("name: p\nrules:\n  - action: deny\n    rate_limit: lots\n", 4, "rules[0].rate_limit"),
        ("name: p\nrules:\n  - action: deny\n    exclude: notalist\n", 4, "rules[0].exclude"),
        ("name: p\nrules: {}\n", 2, "rules"),
        ("name: p\nrequire_verified_sender: sometimes\n", 2, "require_verified_sender"),
        ("name: [p\n", 2, None),
    ],
)
def test_yaml_errors_name_the_line_and_field(text: str, line: int, field: str | None) -> None:
    with pytest.raises(PolicyLoadError) as info:
        Policy.from_yaml(text)
    assert info.value.line == line, str(info.value)
    assert info.value.field == field, str(info.value)


def test_reload_swaps_rules_and_keeps_them_on_error() -> None:
    policy = Policy("p")
    policy.add_rule("allow", Pattern("publish", "a.*"))
    assert policy.evaluate("publish", "a.x").allowed
    policy.reload(
        "name: p\nversion: '2'\nrules:\n  - action: allow\n    operation: publish\n    resource: b.*\n"
    )
    assert policy.version == "2"
    assert not policy.evaluate("publish", "a.x").allowed
    assert policy.evaluate("publish", "b.x").allowed
    with pytest.raises(PolicyLoadError):
        policy.reload("name: p\nrules:\n  - action: nope\n")
    assert policy.evaluate("publish", "b.x").allowed  # the old rules stay in force


# -- the decision cache ---------------------------------------------------------------------------


def _conditional_policy(rng: random.Random, n: int) -> Policy:
    policy = Policy("cached", default_action=rng.choice(["allow", "deny"]))
    conditions = [
        None,
        {"sender": "alice"},
        {"sender": ["alice", "bob"], "verified": True},
        {"min_trust_level": 0.5},
        {"recipient": {"$regex": "^svc"}},
        {"payload.amount": {"$lt": 100}},
        {"headers.x-tenant": "t1"},
        {"agent_id": {"$exists": False}},
    ]
    for i in range(n):
        policy.add_rule(
            rng.choice(["allow", "deny"]),
            Pattern(
                rng.choice(["publish", "deliver", "*"]),
                rng.choice(["tasks.*", "tasks.a", "*", "data.*"]),
                conditions=rng.choice(conditions),
            ),
            name=f"r{i}",
        )
    return policy


def test_cached_decisions_equal_a_fresh_linear_scan() -> None:
    rng = random.Random(11)
    for _ in range(25):
        policy = _conditional_policy(rng, rng.randint(1, 12))
        for _ in range(200):
            ctx: dict[str, object] = {
                "sender": rng.choice(["alice", "bob", "mallory"]),
                "recipient": rng.choice(["svc1", "other", None]),
                "verified": rng.choice([True, False]),
                "trust_level": rng.choice([0.0, 0.4, 0.9]),
                "payload": {"amount": rng.choice([5, 500])},
                "headers": {"x-tenant": rng.choice(["t1", "t2"])},
            }
            if rng.random() < 0.5:
                ctx["agent_id"] = "a1"
            op, res = rng.choice(["publish", "deliver"]), rng.choice(["tasks.a", "tasks.b", "data.x", "x"])
            fast, slow = policy.evaluate(op, res, ctx), policy.evaluate_linear(op, res, ctx)
            assert (fast.allowed, fast.rule_name, fast.reason) == (slow.allowed, slow.rule_name, slow.reason)


def test_a_repeated_decision_comes_from_the_cache() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("deliver", "tasks.*", conditions={"sender": "alice"}))
    ctx = {"sender": "alice", "verified": True}
    first = policy.evaluate("deliver", "tasks.a", ctx)
    assert first.allowed
    assert policy.evaluate("deliver", "tasks.a", dict(ctx)) is first
    assert not policy.evaluate("deliver", "tasks.a", {"sender": "bob", "verified": True}).allowed


def test_payload_conditions_are_evaluated_every_time() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "pay.*", conditions={"max_payload.amount": 100}))
    assert policy.evaluate("publish", "pay.x", {"sender": "a", "payload": {"amount": 5}}).allowed
    assert not policy.evaluate("publish", "pay.x", {"sender": "a", "payload": {"amount": 500}}).allowed
    assert policy.evaluate("publish", "pay.x", {"sender": "a", "payload": {"amount": 5}}).allowed
    assert not policy._compiled.decisions


def test_permission_conditions_follow_the_hook_and_are_not_cached() -> None:
    granted: set[str] = set()
    policy = Policy("p", default_action="deny", permissions=lambda _from, _to: granted)
    policy.add_rule("allow", Pattern("deliver", "*", conditions={"permission": "send_data"}))
    ctx = {"sender": "alice", "recipient": "bob"}
    assert not policy.evaluate("deliver", "t", ctx).allowed
    granted.add("send_data")
    assert policy.evaluate("deliver", "t", ctx).allowed


def test_rate_limited_rules_take_a_token_on_every_cached_decision() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "*"), rate_limit="2/1m")
    ctx = {"sender": "alice", "agent_id": "alice"}
    assert [policy.evaluate("publish", "t", ctx).allowed for _ in range(4)] == [True, True, False, False]
    assert policy.evaluate("publish", "t", {"sender": "bob", "agent_id": "bob"}).allowed


def test_settings_changes_and_reloads_clear_the_cache() -> None:
    policy = Policy("p", default_action="deny")
    policy.add_rule("deny", Pattern("write", "db.*"), reason="no writes")
    assert not policy.evaluate("read", "x").allowed
    policy.default_action = "allow"
    assert policy.evaluate("read", "x").allowed
    assert not policy.evaluate("write", "db.t").allowed
    policy.mode = "audit"
    assert policy.evaluate("write", "db.t").allowed
    policy.require_verified_sender = True
    assert policy.evaluate("read", "x").violation
    policy.reload(Policy("p2", default_action="deny"))
    assert not policy.evaluate("read", "x", {"verified": True}).allowed
    policy.add_rule("allow", Pattern("read", "x"))
    assert policy.evaluate("read", "x", {"verified": True}).allowed
    assert policy.evaluate("read", "x", {"verified": [1]}).allowed  # unhashable: evaluated uncached
