"""Hostile numbers against policy conditions (issue 14, class 5): never a deny turned into an allow.

NaN is neither above nor below 10000, so ``amount = NaN`` slipped past ``min_payload.amount:
10000`` to the next allow rule. Every comparison that cannot be decided (NaN, the infinities,
a string, a bool or None compared with a number, ...) now matches a deny rule and does not match
an allow rule, in every numeric form, from Python and from YAML, and on messages decoded from
JSON and msgpack; operands nothing compares with are refused when the policy is built.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from agent_os.amb import AMB
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.amb.serializers.json_format import JsonSerializer
from agent_os.amb.serializers.msgpack_format import MsgpackSerializer
from agent_os.control_plane import (
    DECISION_EVENTS,
    KernelSpace,
    Pattern,
    PatternError,
    Policy,
    PolicyLoadError,
)
from tests.support import Collector, memory_url
from tests.support.closing import Closing
from tests.support.envelopes import make_env

NAN, INF = float("nan"), float("inf")
HUGE = 10**4000  # JSON carries it; it compares exactly
# Values a numeric condition cannot decide.
UNDECIDABLE: list[Any] = [NAN, INF, -INF, "100000", "NaN", True, False, None, [100000], {"v": 100000}]

# Deny rules (then an allow rule): a value the condition cannot decide must be denied. Each
# form comes with a value it decides to let through, to show the rule is not a blanket deny.
DENY_FORMS: list[tuple[dict[str, Any], Any]] = [
    ({"min_payload.amount": 10000}, 5),
    ({"max_payload.amount": 0}, 5),
    ({"payload.amount": {"$gt": 10000}}, 5),
    ({"payload.amount": {"$gte": 10000}}, 5),
    ({"payload.amount": {"$lt": 0}}, 5),
    ({"payload.amount": {"$lte": 0}}, 5),
    ({"payload.amount": {"$gt": 10000, "$exists": True}}, 5),
    ({"payload.amount": {"$gt": 10000.5}}, 10000),
    ({"payload.amount": 13}, 5),
    ({"payload.amount": {"$eq": 13}}, 5),
    ({"payload.amount": [13, 666]}, 5),
    ({"payload.amount": {"$in": [13, 666]}}, 5),
    ({"payload.amount": {"$ne": 0}}, 0),
    ({"payload.amount": {"$nin": [1, 2, 3]}}, 2),
]
# Allow rules (deny by default): a value the condition cannot decide must not be allowed.
ALLOW_FORMS: list[tuple[dict[str, Any], Any]] = [
    ({"max_payload.amount": 100}, 5),
    ({"min_payload.amount": 1}, 5),
    ({"payload.amount": {"$lt": 100}}, 5),
    ({"payload.amount": {"$lte": 100}}, 5),
    ({"payload.amount": {"$gt": 0}}, 5),
    ({"payload.amount": {"$gte": 1, "$lte": 100}}, 5),
    ({"payload.amount": 5}, 5),
    ({"payload.amount": {"$eq": 5}}, 5),
    ({"payload.amount": [5, 6]}, 5),
    ({"payload.amount": {"$in": [5, 6]}}, 5),
    ({"payload.amount": {"$ne": 0}}, 5),
    ({"payload.amount": {"$nin": [0]}}, 5),
]


def _build(source: str, rules: list[tuple[str, dict[str, Any]]], default: str) -> Policy:
    """The policy from Python, or from the same rules written as YAML."""
    if source == "python":
        policy = Policy("numbers", default_action=default)  # type: ignore[arg-type]
        for i, (action, conditions) in enumerate(rules):
            policy.add_rule(action, Pattern("*", "*", conditions=conditions), name=f"r{i}")  # type: ignore[arg-type]
        return policy
    doc = {
        "name": "numbers",
        "default_action": default,
        "rules": [
            {"name": f"r{i}", "action": action, **({"conditions": c} if c else {})}
            for i, (action, c) in enumerate(rules)
        ],
    }
    return Policy.from_yaml(yaml.safe_dump(doc, sort_keys=False))


def _form_id(form: tuple[dict[str, Any], Any]) -> str:
    return repr(form[0])


@pytest.mark.parametrize("source", ["python", "yaml"])
@pytest.mark.parametrize("form", DENY_FORMS, ids=_form_id)
def test_an_undecidable_value_matches_a_deny_rule(source: str, form: tuple[dict[str, Any], Any]) -> None:
    conditions, passing = form
    policy = _build(source, [("deny", conditions), ("allow", {})], "deny")
    assert policy.evaluate("pay", "x", {"payload": {"amount": passing}}).allowed
    for value in UNDECIDABLE:
        decision = policy.evaluate("pay", "x", {"payload": {"amount": value}})
        assert not decision.allowed, (conditions, value)
        assert decision.rule_name == "r0", (conditions, value)
        assert "could not be decided" in decision.reason
        linear = policy.evaluate_linear("pay", "x", {"payload": {"amount": value}})
        assert (linear.allowed, linear.rule_name) == (False, "r0")


@pytest.mark.parametrize("source", ["python", "yaml"])
@pytest.mark.parametrize("form", ALLOW_FORMS, ids=_form_id)
def test_an_undecidable_value_does_not_match_an_allow_rule(
    source: str, form: tuple[dict[str, Any], Any]
) -> None:
    conditions, passing = form
    policy = _build(source, [("allow", conditions)], "deny")
    assert policy.evaluate("pay", "x", {"payload": {"amount": passing}}).allowed
    for value in UNDECIDABLE:
        for evaluate in (policy.evaluate, policy.evaluate_linear):
            decision = evaluate("pay", "x", {"payload": {"amount": value}})
            assert not decision.allowed, (conditions, value)
            assert decision.rule is None, (conditions, value)  # the default decided


def test_huge_integers_compare_exactly() -> None:
    policy = _build("python", [("deny", {"min_payload.amount": 10000}), ("allow", {})], "deny")
    assert not policy.evaluate("pay", "x", {"payload": {"amount": HUGE}}).allowed
    assert policy.evaluate("pay", "x", {"payload": {"amount": -HUGE}}).allowed
    big_float = _build("python", [("deny", {"payload.amount": {"$gt": 1e308}}), ("allow", {})], "deny")
    assert not big_float.evaluate("pay", "x", {"payload": {"amount": HUGE}}).allowed


def test_a_decided_false_condition_wins_over_an_undecidable_one() -> None:
    # Three-valued AND: the rule cannot match when another of its conditions is decided false.
    policy = _build(
        "python", [("deny", {"sender": "mallory", "min_payload.amount": 10000}), ("allow", {})], "deny"
    )
    assert policy.evaluate("pay", "x", {"sender": "alice", "payload": {"amount": NAN}}).allowed
    assert not policy.evaluate("pay", "x", {"sender": "mallory", "payload": {"amount": NAN}}).allowed


def test_key_fields_on_the_decision_cache_fail_closed_too() -> None:
    policy = Policy("trust", default_action="deny")
    policy.add_rule("deny", Pattern("*", "*", conditions={"trust_level": {"$lt": 0.5}}), name="low")
    policy.add_rule("allow", Pattern("*", "*", conditions={"trust_level": {"$gte": 0.5}}), name="ok")
    for _ in range(2):  # the second answer comes from the decision cache
        assert policy.evaluate("publish", "t", {"sender": "a", "trust_level": 0.9}).allowed
        assert policy.evaluate("publish", "t", {"sender": "a", "trust_level": NAN}).rule_name == "low"
        assert policy.evaluate("publish", "t", {"sender": "a", "trust_level": "high"}).rule_name == "low"
        assert not policy.evaluate("publish", "t", {"sender": "a", "trust_level": NAN}).allowed


def test_a_time_window_whose_clock_is_not_a_time_fails_closed() -> None:
    deny = Policy("hours", default_action="allow")
    deny.add_rule("deny", Pattern("*", "*", conditions={"time_window": {"start": "22:00", "end": "06:00"}}))
    allow = Policy("hours", default_action="deny")
    allow.add_rule("allow", Pattern("*", "*", conditions={"time_window": {"start": "09:00", "end": "17:00"}}))
    noon = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert deny.evaluate("publish", "t", {"now": noon}).allowed
    assert allow.evaluate("publish", "t", {"now": noon}).allowed
    for now in (NAN, "12:00", 43200, [noon]):
        assert not deny.evaluate("publish", "t", {"now": now}).allowed
        assert not allow.evaluate("publish", "t", {"now": now}).allowed


BAD_OPERANDS: list[dict[str, Any]] = [
    {"min_payload.amount": NAN},
    {"max_payload.amount": INF},
    {"min_payload.amount": -INF},
    {"max_payload.amount": True},
    {"max_payload.amount": "100"},
    {"payload.amount": NAN},
    {"payload.amount": [1, NAN]},
    {"payload.amount": [1, "one"]},
    {"payload.amount": [True, 1]},
    {"payload.amount": {"$gt": NAN}},
    {"payload.amount": {"$lte": INF}},
    {"payload.amount": {"$gt": True}},
    {"payload.amount": {"$gt": None}},
    {"payload.amount": {"$gt": [1]}},
    {"payload.amount": {"$eq": NAN}},
    {"payload.amount": {"$ne": -INF}},
    {"payload.amount": {"$in": [1, NAN]}},
    {"payload.amount": {"$in": "123"}},
    {"payload.amount": {"$nin": 5}},
    {"payload.amount": {"$in": [1, "1"]}},
    {"payload.amount": {"$exists": "no"}},
    {"payload.amount": {"$regex": 5}},
]


@pytest.mark.parametrize("conditions", BAD_OPERANDS, ids=repr)
def test_operands_nothing_compares_with_are_refused_when_built(conditions: dict[str, Any]) -> None:
    with pytest.raises(PatternError, match="condition") as built:
        Pattern("*", "*", conditions=conditions)
    assert built.value.part == "conditions"
    if _non_finite(conditions):  # the YAML reader refuses the literal before any rule is built
        with pytest.raises(PolicyLoadError, match="a number must be finite") as info:
            _build("yaml", [("deny", conditions)], "deny")
        assert info.value.line is not None
    else:
        with pytest.raises(PolicyLoadError, match="rule 'r0'") as info:
            _build("yaml", [("deny", conditions)], "deny")
        assert info.value.field == "rules[0].conditions"


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


@pytest.mark.parametrize("literal", [".nan", ".NaN", ".inf", "-.inf", "1.0e+400"])
def test_yaml_nan_and_infinity_literals_are_refused(literal: str) -> None:
    text = (
        "name: p\nrules:\n  - name: big\n    action: deny\n"
        f"    conditions:\n      min_payload.amount: {literal}\n"
    )
    with pytest.raises(PolicyLoadError, match="a number must be finite") as info:
        Policy.from_yaml(text)
    assert info.value.line == 6


def _json_envelopes(literals: list[str]) -> list[bytes]:
    """JSON envelopes on ``pay.x`` whose payload's amount is each literal, as raw bytes (the
    JSON encoder refuses NaN, a hostile sender does not)."""
    base = JsonSerializer().encode(_env({"amount": 123456789}))
    assert base.count(b"123456789") == 1
    return [base.replace(b"123456789", literal.encode()) for literal in literals]


def _env(payload: Any) -> Any:
    return make_env(
        topic="pay.x", sender="raw", recipient=None, reply_to=None, correlation_id=None, payload=payload
    )


async def test_hostile_numbers_in_messages_never_pass_a_numeric_deny(closing: Closing) -> None:
    policy = Policy("payments", default_action="deny")
    policy.add_rule("deny", Pattern("deliver", "pay.*", conditions={"min_payload.amount": 10000}), name="big")
    policy.add_rule("allow", Pattern("*", "*"), name="rest")
    kernel = closing(KernelSpace(policy=policy))
    where = memory_url("numbers")
    receiver = closing(AMB("memory", where, agent_id="receiver"))
    kernel.attach(receiver)
    raw = closing(AMB("memory", where, agent_id="raw"))  # not attached: its bytes go straight to the broker
    watcher = closing(AMB("memory", where, agent_id="watcher"))
    got, dead = Collector(), Collector()
    hostile = _json_envelopes(
        ["NaN", "Infinity", "-Infinity", "1e999", str(HUGE), '"1e9"', "true", "null", "[20000]"]
    )
    msgpack = MsgpackSerializer()
    hostile += [msgpack.encode(_env({"amount": v})) for v in (NAN, INF, -INF, "20000", True, None)]
    try:
        for client in (receiver, raw, watcher):
            await client.connect()
        await receiver.subscribe("pay.>", got)
        await watcher.subscribe("_DLQ.>", dead)
        for data in hostile:
            await raw.broker.publish("pay.x", data)
        await raw.broker.publish("pay.x", _json_envelopes(["5"])[0])
        await raw.broker.publish("pay.x", msgpack.encode(_env({"amount": 6.5})))
        await got.wait_for(2)
        await dead.wait_for(len(hostile))
        assert got.messages == [{"amount": 5}, {"amount": 6.5}]
        assert len(dead.messages) == len(hostile)
        # Denied by the rule (or refused by the decoder: never delivered either way).
        reasons = [m.headers[DLQ_REASON] for m in dead.metadata]
        assert set(reasons) <= {"policy_denied", "malformed"}
        decisions = await kernel.recorder.query(event_type=DECISION_EVENTS, filters={"data.rule": "big"})
        assert len(decisions) == reasons.count("policy_denied")
        assert {d.data["decision"] for d in decisions} == {"deny"}
    finally:
        for client in (receiver, raw, watcher):
            await client.close()
        await kernel.close()
