"""Hostile regular expressions in policy (issue 14, class 4): no pattern may stall decisions.

Every regex from policy (resource patterns, exclusions, ``$regex`` conditions) runs on RE2, in
time linear in the text; what RE2 cannot run is refused when the policy is built, naming the
rule, through every way a policy is built (Python, YAML text or file, ``Policy.reload``, the
admin API's reload); the text a ``$regex`` condition reads is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_os.control_plane import KernelSpace, Pattern, PatternError, Policy, PolicyLoadError
from agent_os.control_plane.admin import AdminAPI
from agent_os.control_plane.policy.conditions import MAX_MATCH_CHARS

ISSUE_PATTERN = r"tasks\.([a-z0-9]+\.?)+"
TOKEN = "t" * 32

# Evaluated in a child process, so that on a backtracking engine the test fails at its timeout
# instead of holding the suite: each case is (name, rules, resource, context, expected allowed).
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from agent_os.control_plane import Pattern, Policy

    cases = json.loads(sys.stdin.read())
    out = {}
    for name, rules, resource, context, _ in cases:
        policy = Policy(name, default_action="allow")
        for action, kwargs in rules:
            policy.add_rule(action, Pattern(**kwargs))
        start = time.perf_counter()
        decision = policy.evaluate("publish", resource, context)
        out[name] = [time.perf_counter() - start, decision.allowed]
    print(json.dumps(out))
    """
)


def _cases() -> list[tuple[str, list[Any], str, dict[str, Any], bool]]:
    issue = [("deny", {"operation": "publish", "resource": ISSUE_PATTERN, "match_type": "regex"})]
    nested = [("deny", {"resource": r"(x+x+)+y", "match_type": "regex"})]
    excluded = [("deny", {"resource": "*", "exclude": [r"(a|aa)+b"], "match_type": "glob"})]
    excluded_rx = [("deny", {"resource": r".*", "exclude": [r"(a|aa)+b"], "match_type": "regex"})]
    memo = [("deny", {"conditions": {"payload.memo": {"$regex": r"^(a+)+$"}}})]
    stars = [("deny", {"resource": "*a*a*a*a*a*a*a*a*a*a*a*a*b"})]  # a glob: fnmatch, atomic
    long_memo = "a" * (MAX_MATCH_CHARS - 1) + "!"
    return [
        # The issue's 34-character topic: seconds on a backtracking engine, doubling per character.
        ("issue-34", issue, "tasks." + "a" * 27 + "!", {}, True),
        ("issue-long", issue, "tasks." + "a" * 20_000 + "!", {}, True),
        ("issue-match", issue, "tasks.a1.b2.c3", {}, False),
        ("nested", nested, "x" * 20_000, {}, True),
        ("exclude-glob-rule", excluded, "a" * 40 + "c", {}, False),
        ("exclude-regex-rule", excluded_rx, "a" * 40 + "c", {}, False),
        ("regex-condition", memo, "t", {"payload": {"memo": "a" * 40 + "!"}}, True),
        ("regex-condition-long", memo, "t", {"payload": {"memo": long_memo}}, True),
        ("glob-stars", stars, "a" * 50_000, {}, True),
    ]


def test_hostile_patterns_decide_in_bounded_time() -> None:
    cases = _cases()
    try:
        run = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a policy decision on a hostile pattern did not finish in 30 s")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for name, _, _, _, allowed in cases:
        seconds, decided = got[name]
        assert decided is allowed, name
        assert seconds < 0.5, f"{name}: {seconds:.3f} s"


UNSUPPORTED = [
    pytest.param(r"(a)\1", id="backreference"),
    pytest.param(r"(?P<n>a)(?P=n)", id="named-backreference"),
    pytest.param(r"tasks\.(?=x)", id="lookahead"),
    pytest.param(r"tasks\.(?!x)", id="negative-lookahead"),
    pytest.param(r"(?<=a)b", id="lookbehind"),
    pytest.param(r"(?<!a)b", id="negative-lookbehind"),
    pytest.param(r"(?>a+)b", id="atomic-group"),
    pytest.param(r"a*+b", id="possessive"),
    pytest.param(r"(a)?(?(1)b|c)", id="conditional"),
    pytest.param(r"tasks\Z", id="python-end-anchor"),
    pytest.param(r"(a{1000}){1000}", id="oversized"),
]


@pytest.mark.parametrize("regex", UNSUPPORTED)
def test_python_patterns_re2_cannot_run_are_refused(regex: str) -> None:
    with pytest.raises(PatternError, match="RE2") as info:
        Pattern("publish", regex, match_type="regex")
    assert info.value.part == "resource"
    with pytest.raises(PatternError, match="RE2") as info:
        Pattern("publish", ".*", match_type="regex", exclude=[regex])
    assert info.value.part == "exclude"
    with pytest.raises(PatternError, match="RE2") as info:
        Pattern("publish", "*", conditions={"payload.memo": {"$regex": regex}})
    assert info.value.part == "conditions"


def _policy_yaml(where: str, regex: str) -> str:
    rule = {
        "resource": f"      resource: '{regex}'\n      match_type: regex\n",
        "exclude": f"      resource: '.*'\n      match_type: regex\n      exclude: ['{regex}']\n",
        "condition": f"      conditions:\n        payload.memo: {{$regex: '{regex}'}}\n",
    }[where]
    return (
        "name: hostile\n"
        "rules:\n"
        "    - name: fine\n"
        "      action: allow\n"
        "      resource: 'ok.*'\n"
        "    - name: the-bad-rule\n"
        "      action: deny\n" + rule
    )


@pytest.mark.parametrize("where", ["resource", "exclude", "condition"])
@pytest.mark.parametrize("regex", UNSUPPORTED)
def test_yaml_patterns_re2_cannot_run_are_refused_naming_the_rule(
    where: str, regex: str, tmp_path: Path
) -> None:
    text = _policy_yaml(where, regex)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    field = {"resource": "resource", "exclude": "exclude", "condition": "conditions"}[where]
    for source in (text, path):
        with pytest.raises(PolicyLoadError, match="the-bad-rule") as info:
            Policy.from_yaml(source)
        assert info.value.field == f"rules[1].{field}"
        assert info.value.line is not None
        assert info.value.line >= 6
        assert "RE2" in str(info.value)
    current = Policy("current", default_action="deny")
    current.add_rule("allow", Pattern("*", "keep.*"), name="keep")
    with pytest.raises(PolicyLoadError, match="the-bad-rule"):
        current.reload(text)
    assert [r.name for r in current.rules] == ["keep"]  # the rules in force stay


async def test_the_admin_reload_refuses_a_pattern_re2_cannot_run() -> None:
    current = Policy("current", default_action="deny")
    current.add_rule("allow", Pattern("*", "keep.*"), name="keep")
    kernel = KernelSpace(policy=current)
    api = AdminAPI(kernel, TOKEN)
    port = await api.start()
    try:
        for where in ("resource", "exclude", "condition"):
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{port}/policy/reload",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    data=_policy_yaml(where, ISSUE_PATTERN + r"(?=x)"),
                ) as resp,
            ):
                body = await resp.json()
                assert resp.status == 400, body
            assert "the-bad-rule" in body["error"]
            assert "RE2" in body["error"]
            assert body["field"].startswith("rules[1].")
        assert [r.name for r in current.rules] == ["keep"]  # the rules in force stay
    finally:
        await api.stop()
        await kernel.close()


def test_regex_conditions_read_a_bounded_text_and_fail_closed_past_it() -> None:
    policy = Policy("memo", default_action="deny")
    policy.add_rule(
        "deny", Pattern("*", "*", conditions={"payload.memo": {"$regex": "DROP"}}), name="no-drop"
    )
    policy.add_rule("allow", Pattern("*", "*", conditions={"payload.memo": {"$regex": "^ok"}}), name="ok")
    at_bound = "ok" + "a" * (MAX_MATCH_CHARS - 2)
    past = at_bound + "a"
    assert policy.evaluate("publish", "t", {"payload": {"memo": at_bound}}).allowed
    decision = policy.evaluate("publish", "t", {"payload": {"memo": past}})
    assert not decision.allowed  # the deny rule cannot tell: it matches
    assert decision.rule_name == "no-drop"
    allow_only = Policy("memo", default_action="deny")
    allow_only.add_rule("allow", Pattern("*", "*", conditions={"payload.memo": {"$regex": "^ok"}}))
    decision = allow_only.evaluate("publish", "t", {"payload": {"memo": past}})
    assert not decision.allowed
    assert decision.rule is None


def test_the_regex_dialect_is_re2() -> None:
    # Accepted RE2 syntax beyond the common core: \z, named groups both ways, POSIX classes.
    for regex in (r"tasks\.[a-z]+\z", r"(?P<t>tasks)\..*", r"(?<t>tasks)\..*", r"[[:alpha:]]+\.x"):
        assert Pattern("publish", regex, match_type="regex").targets("publish", "tasks.x")
    # \d is ASCII in RE2 (Python's re matches every Unicode digit).
    assert not Pattern("publish", r"n\d", match_type="regex").targets("publish", "n\u0663")
