"""Policies in YAML, validated with the line and field of every error.

:func:`load_policy` (text or a file) and :func:`load_policy_text` (text only: the admin API's
reload) raise :class:`~agent_os.control_plane.errors.PolicyLoadError` naming the line and field
of the first problem. The schema and the bounds (size, rules, nesting, numbers) are in
``docs/control-plane.md`` (Policies in YAML).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Final

import yaml

from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import PatternError, PolicyError, PolicyLoadError, SignalError
from agent_os.control_plane.policy.decision import Rule
from agent_os.control_plane.policy.patterns import Pattern
from agent_os.control_plane.policy.policy import Policy
from agent_os.control_plane.policy.ratelimit import RateLimit

MAX_POLICY_BYTES: Final = 1 << 20
"""The largest policy document, in bytes of UTF-8."""
MAX_RULES: Final = 10_000
"""The most rules one policy document may hold."""
MAX_DEPTH: Final = 32
"""The deepest nesting of mappings and lists in a policy document."""
MAX_INT: Final = (1 << 63) - 1
"""The largest integer (in absolute value) a policy document may write."""

_TOP: Final = {"name", "version", "default_action", "inheritance", "mode", "require_verified_sender", "rules"}
_RULE: Final = {
    "name",
    "action",
    "operation",
    "resource",
    "match_type",
    "exclude",
    "conditions",
    "reason",
    "on_violation",
    "rate_limit",
}


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _mapping(node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise PolicyLoadError(f"{what} must be a mapping", line=_line(node))
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            raise PolicyLoadError("keys must be plain names", line=_line(key))
        if key.value in out:
            raise PolicyLoadError("duplicate key", line=_line(key), field=key.value)
        out[key.value] = (key, value)
    return out


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing (while composing, before anything is built) documents
    nested deeper than MAX_DEPTH, aliases (one node reached many times), integers beyond
    MAX_INT and numbers that are not finite."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise PolicyLoadError("aliases are not allowed in a policy", line=self._next_line())
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise PolicyLoadError(f"nested deeper than {MAX_DEPTH} levels", line=self._next_line())
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.ScalarNode):
            self._check_number(node)
        return node

    def _next_line(self) -> int:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        return int(event.start_mark.line) + 1

    def _check_number(self, node: yaml.ScalarNode) -> None:
        if node.tag == "tag:yaml.org,2002:int":
            digits = node.value.lstrip("+-").replace("_", "")
            if len(digits) > 24 or abs(self.construct_yaml_int(node)) > MAX_INT:
                raise PolicyLoadError(f"an integer beyond ±{MAX_INT}", line=_line(node))
        elif node.tag == "tag:yaml.org,2002:float" and not math.isfinite(self.construct_yaml_float(node)):
            raise PolicyLoadError(f"a number must be finite, got {node.value!r}", line=_line(node))


def load_policy(source: str | Path) -> Policy:
    """Build a Policy from YAML text or a ``.yaml``/``.yml`` file (a Path, or a one-line string
    ending in ``.yaml``/``.yml``). Raises PolicyLoadError. Text from outside (a request body)
    goes to :func:`load_policy_text`, which never opens a file."""
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
    ):
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise PolicyLoadError(f"cannot read {source}: {exc}") from None
    else:
        text = source
    return load_policy_text(text)


def load_policy_text(text: str) -> Policy:
    """Build a Policy from YAML *text* only: a string that looks like a path is parsed as YAML
    (a scalar, so it fails validation), never opened. Raises PolicyLoadError, also for
    anything but a str."""
    if not isinstance(text, str):
        raise PolicyLoadError(f"policy YAML must be text, got {type(text).__name__}")
    if len(text) > MAX_POLICY_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyLoadError(f"a policy is at most {MAX_POLICY_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PolicyLoadError("empty policy document", line=1)
        top = _mapping(root, "a policy")

        def value(node: yaml.Node, field: str, kind: type | tuple[type, ...]) -> Any:
            try:
                v = loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError) as exc:
                raise PolicyLoadError(str(exc), line=_line(node), field=field) from None
            if not isinstance(v, kind) or (isinstance(v, bool) and bool not in _kinds(kind)):
                names = "/".join(k.__name__ for k in _kinds(kind))
                raise PolicyLoadError(f"must be {names}, got {v!r}", line=_line(node), field=field)
            return v

        for key, (knode, _) in top.items():
            if key not in _TOP:
                raise PolicyLoadError(
                    f"unknown field (allowed: {', '.join(sorted(_TOP))})", line=_line(knode), field=key
                )
        if "name" not in top:
            raise PolicyLoadError("a policy needs a name", line=_line(root), field="name")
        opts: dict[str, Any] = {}
        for field, kind in (
            ("name", str),
            ("version", (str, int, float)),
            ("default_action", str),
            ("inheritance", str),
            ("mode", str),
            ("require_verified_sender", bool),
        ):
            if field in top:
                opts[field] = value(top[field][1], field, kind)
        if "version" in opts:
            opts["version"] = str(opts["version"])
        try:
            policy = Policy(**opts)
        except PolicyError as exc:
            bad = next((f for f in ("default_action", "inheritance", "mode") if f in str(exc)), None)
            raise PolicyLoadError(
                str(exc), line=_line(top[bad][1]) if bad in top else None, field=bad
            ) from None
        if "rules" in top:
            rules_node = top["rules"][1]
            if not isinstance(rules_node, yaml.SequenceNode):
                raise PolicyLoadError("must be a list of rules", line=_line(rules_node), field="rules")
            if len(rules_node.value) > MAX_RULES:
                raise PolicyLoadError(
                    f"{len(rules_node.value)} rules: a policy holds at most {MAX_RULES}",
                    line=_line(rules_node),
                    field="rules",
                )
            rules = [_rule(rnode, i, value) for i, rnode in enumerate(rules_node.value)]
            policy = Policy(**opts, rules=rules)  # installed (and indexed) once
        return policy
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PolicyLoadError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}", line=mark.line + 1 if mark is not None else None
        ) from None
    finally:
        loader.dispose()


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _rule(node: yaml.Node, index: int, value: Any) -> Rule:
    """The rule at ``rules[index]``, checked as :meth:`Policy.add_rule` checks one."""
    where = f"rules[{index}]"
    fields = _mapping(node, f"{where} (a rule)")
    for key, (knode, _) in fields.items():
        if key not in _RULE:
            raise PolicyLoadError(
                f"unknown rule field (allowed: {', '.join(sorted(_RULE))})",
                line=_line(knode),
                field=f"{where}.{key}",
            )
    if "action" not in fields:
        raise PolicyLoadError(
            "a rule needs an action (allow or deny)", line=_line(node), field=f"{where}.action"
        )
    kinds: dict[str, type | tuple[type, ...]] = {
        "name": str,
        "action": str,
        "operation": str,
        "resource": str,
        "match_type": str,
        "exclude": list,
        "conditions": dict,
        "reason": str,
        "on_violation": (str, int),
        "rate_limit": (int, str),
    }
    got = {k: value(vnode, f"{where}.{k}", kinds[k]) for k, (_, vnode) in fields.items()}
    named = f"rule {got['name']!r}: " if "name" in got else ""
    try:
        pattern = Pattern(
            got.get("operation", "*"),
            got.get("resource", "*"),
            got.get("match_type", "glob"),
            got.get("conditions"),
            got.get("exclude"),
        )
    except PatternError as exc:
        node = fields[exc.part][1] if exc.part in fields else node
        raise PolicyLoadError(f"{named}{exc}", line=_line(node), field=f"{where}.{exc.part}") from None
    try:
        action = got["action"]
        if action not in ("allow", "deny"):
            raise PolicyError(f"action must be 'allow' or 'deny', got {action!r}")
        try:
            signal = AgentSignal.parse(got["on_violation"]) if "on_violation" in got else None
        except SignalError as exc:
            raise PolicyError(f"on_violation: {exc}") from None
        return Rule(
            action=action,
            pattern=pattern,
            reason=got.get("reason", ""),
            on_violation=signal,
            rate_limit=RateLimit.parse(got["rate_limit"]) if "rate_limit" in got else None,
            name=got.get("name") or f"rule-{index + 1}",
        )
    except PolicyError as exc:
        field = _guess_field(str(exc), fields)
        line = _line(fields[field][1]) if field in fields else _line(node)
        raise PolicyLoadError(
            f"{named}{exc}", line=line, field=f"{where}.{field}" if field else where
        ) from None


def _guess_field(message: str, fields: dict[str, Any]) -> str | None:
    for field, needle in (
        ("on_violation", "on_violation"),
        ("rate_limit", "rate limit"),
        ("rate_limit", "rate-limit"),
        ("action", "action"),
    ):
        if needle in message and field in fields:
            return field
    return None
