"""Policy: ordered rules with a default action, first match wins; the built-in policies.

Evaluation goes through the rule index and a decision cache, and fails closed; how, and the
audit mode, are in ``docs/control-plane.md`` (Policies).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import PolicyError, SignalError
from agent_os.control_plane.policy.decision import Action, Decision, RateCheck, Rule
from agent_os.control_plane.policy.guards import path_refusal
from agent_os.control_plane.policy.index import RuleIndex
from agent_os.control_plane.policy.patterns import CheckedPattern, ContentPattern, Context, Pattern
from agent_os.control_plane.policy.ratelimit import (
    RateLimit,
    RateLimiter,
    SharedRateLimits,
    parse_window,
    shared_key,
)
from agent_os.control_plane.policy.sql_content import SqlContent
from agent_os.control_plane.policy.sql_guard import MAX_SQL_LENGTH, SqlGuard

PermissionSource = Callable[[str, str], Collection[str]]
"""``permissions(from_agent, to_agent)``: what ``from_agent`` grants ``to_agent`` (IATP's trust
edges). A message from S to R needs the permission in ``permissions(R, S)``."""

RUN_OPERATION: Final = "run"
"""The operation of the decision on running an agent (``kernel.execute``): the resource is the
agent's name, ``context["content"]`` the texts of its arguments."""

_DECISIONS_MAX: Final = 16384
# The context fields a cached decision is keyed by (beyond operation and resource).
KEY_FIELDS: Final = ("sender", "recipient", "verified", "trust_level", "agent_id")
ABSENT: Final = object()
"""In a decision's cache key (:meth:`Policy.cached`): a :data:`KEY_FIELDS` field the context
does not have."""
_KEYED: Final = frozenset(KEY_FIELDS)
# Policy attributes a decision depends on: setting one clears the decision cache.
_SETTINGS: Final = frozenset({"name", "default_action", "mode", "require_verified_sender", "permissions"})


def _undecided(rule: Rule) -> str:
    return f"{rule.reason or 'denied'} (a condition could not be decided: fail closed)"


class Policy:
    """An ordered list of rules with a default action.

    Args:
        name, version: identify the policy in decisions and records.
        rules: initial rules (in order).
        default_action: ``"deny"`` (the default: fail closed) or ``"allow"``.
        inheritance: how spawned children get permissions: ``"strict"`` (the child's are a
            subset of the parent's), ``"permissive"`` (the child may be given its own),
            ``"none"`` (the child inherits nothing).
        mode: ``"enforce"`` or ``"audit"`` (record violations, block nothing).
        require_verified_sender: deny any message whose sender IATP has not verified.
        permissions: a hook ``permissions(from_agent, to_agent) -> collection of names`` used
            by ``conditions={"permission": ...}`` (e.g. IATP's trust edges).
        shared_limits: keep rule rate limits in this store, shared with every process using
            it (see :class:`~agent_os.control_plane.policy.ratelimit.SharedRateLimits`);
            default: in this process.

    Raises PolicyError on invalid arguments.
    """

    def __init__(
        self,
        name: str,
        version: str = "1.0.0",
        rules: Iterable[Rule] | None = None,
        default_action: Action = "deny",
        inheritance: Literal["strict", "permissive", "none"] = "strict",
        *,
        mode: Literal["enforce", "audit"] = "enforce",
        require_verified_sender: bool = False,
        permissions: PermissionSource | None = None,
        shared_limits: SharedRateLimits | None = None,
    ) -> None:
        if default_action not in ("allow", "deny"):
            raise PolicyError(f"default_action must be 'allow' or 'deny', got {default_action!r}")
        if inheritance not in ("strict", "permissive", "none"):
            raise PolicyError(f"inheritance must be strict, permissive or none, got {inheritance!r}")
        if mode not in ("enforce", "audit"):
            raise PolicyError(f"mode must be 'enforce' or 'audit', got {mode!r}")
        self.name = name
        self.version = version
        self.default_action: Action = default_action
        self.inheritance = inheritance
        self.mode = mode
        self.require_verified_sender = require_verified_sender
        self.permissions = permissions
        self.shared_limits = shared_limits
        self._compiled = RuleIndex(())
        if rules:
            self._install(list(rules))

    # -- building ------------------------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._compiled.rules

    def add_rule(
        self,
        action: Action,
        pattern: Pattern,
        reason: str = "",
        on_violation: AgentSignal | str | None = None,
        rate_limit: RateLimit | int | str | None = None,
        *,
        name: str | None = None,
    ) -> Rule:
        """Append a rule (evaluated after the existing ones) and return it.

        ``on_violation`` is a signal (``"SIGKILL"`` or :class:`AgentSignal`) sent to the agent
        when the rule denies it; ``rate_limit`` is per minute (int) or ``"100/1m"``, counted per
        agent. Raises PolicyError for an invalid action, signal or rate limit.
        """
        if action not in ("allow", "deny"):
            raise PolicyError(f"action must be 'allow' or 'deny', got {action!r}")
        if not isinstance(pattern, Pattern):
            raise PolicyError("pattern must be a Pattern")
        try:
            signal = AgentSignal.parse(on_violation) if on_violation is not None else None
        except SignalError as exc:
            raise PolicyError(f"on_violation: {exc}") from None
        rule = Rule(
            action=action,
            pattern=pattern,
            reason=reason,
            on_violation=signal,
            rate_limit=RateLimit.parse(rate_limit) if rate_limit is not None else None,
            name=name or f"rule-{len(self.rules) + 1}",
        )
        self._install([*self.rules, rule], start=len(self.rules))
        return rule

    def _install(self, rules: list[Rule], start: int = 0) -> None:
        for i in range(start, len(rules)):
            rule = rules[i]
            rule.index = i
            if rule.rate_limit is not None and rule.limiter is None:
                rule.limiter = RateLimiter(rule.rate_limit)
        self._compiled = RuleIndex(rules)  # one assignment: evaluations see old or new, not a mix

    def reload(self, source: Policy | str | Path) -> None:
        """Replace this policy's rules and settings with ``source`` (a Policy, YAML text or a
        YAML file) without interrupting evaluations. Raises PolicyLoadError on invalid YAML,
        leaving the current rules in force."""
        new = source if isinstance(source, Policy) else Policy.from_yaml(source)
        self.version = new.version
        self.default_action = new.default_action
        self.inheritance = new.inheritance
        self.mode = new.mode
        self.require_verified_sender = new.require_verified_sender
        if new.permissions is not None:
            self.permissions = new.permissions
        self._install(list(new.rules))

    @classmethod
    def from_yaml(cls, source: str | Path) -> Policy:
        """Load a policy from YAML text or a file path; see :mod:`agent_os.control_plane.policy.loader`."""
        from agent_os.control_plane.policy.loader import load_policy  # the loader builds Policies

        return load_policy(source)

    # -- evaluating ----------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _SETTINGS:
            compiled = self.__dict__.get("_compiled")
            if compiled is not None:
                compiled.decisions.clear()

    def evaluate(
        self,
        operation: str,
        resource: str,
        context: Context | None = None,
        *,
        default: Action | None = None,
    ) -> Decision:
        """Decide on ``operation`` on ``resource``; first matching rule wins, else the default
        (``default``, when given, instead of the policy's ``default_action``, cached apart: the
        kernel's ``run`` decisions use ``"allow"``, as registration is the grant to run).

        A condition that cannot be decided (NaN, a string compared with a number ...) matches
        a deny rule and not an allow rule. Never raises: an error while evaluating denies
        (reason ``evaluation_error``).
        """
        ctx: Context = context if context is not None else {}
        compiled = self._compiled
        fallback: Action = self.default_action if default is None else default
        try:
            get = ctx.get
            key: tuple[Any, ...] | None
            key = (
                operation,
                resource,
                get("sender", ABSENT),
                get("recipient", ABSENT),
                get("verified", ABSENT),
                get("trust_level", ABSENT),
                get("agent_id", ABSENT),
            )
            if default is not None:  # another default, another decision: never the same key
                key += (default,)
            hit = compiled.decisions.get(key)
        except Exception:  # an unhashable context value: evaluate without the cache
            key = hit = None
        if hit is not None:
            if type(hit) is Decision:
                return hit
            assert isinstance(hit, Rule)
            return self._finish(hit, hit.action, hit.reason, ctx)
        try:
            if self.permissions is not None and "_permissions" not in ctx:
                ctx = {**ctx, "_permissions": self.permissions}
            cacheable = key is not None
            if self.require_verified_sender and not ctx.get("verified", False):
                decision = self._finish(None, "deny", "sender not verified (require_verified_sender)", ctx)
            else:
                for rule in compiled.candidates(operation, resource):
                    pattern = rule.pattern
                    if not pattern.targets(operation, resource):
                        continue
                    fields = pattern.cache_fields
                    if fields is None or (fields and not fields <= _KEYED):
                        cacheable = False
                    held = pattern.holds(ctx)
                    if held is None:  # undecidable: a deny rule matches, an allow rule does not
                        if rule.action != "deny":
                            continue
                        decision = self._deny(rule, _undecided(rule))
                        break
                    if held:
                        decision = self._finish(rule, rule.action, rule.reason, ctx)
                        if cacheable and rule.limiter is not None:
                            self._remember(compiled, key, rule)
                            return decision
                        break
                else:
                    decision = self._finish(None, fallback, f"default {fallback}", ctx)
            if cacheable:
                self._remember(compiled, key, decision)
            return decision
        except Exception as exc:
            return Decision(
                False, "deny", f"evaluation_error: {type(exc).__name__}: {exc}", self.name, violation=True
            )

    def cached(
        self,
        operation: str,
        resource: str,
        sender: Any,
        recipient: Any,
        verified: Any,
        trust_level: Any,
        agent_id: Any,
    ) -> Decision | None:
        """The decision :meth:`evaluate` would return for a context with these
        :data:`KEY_FIELDS` values (:data:`ABSENT` for a field the context lacks), when it is in
        the decision cache (no rate limit to apply); None otherwise: then call
        :meth:`evaluate`. Lets a caller skip building the context. Raises TypeError for an
        unhashable value."""
        hit = self._compiled.decisions.get(
            (operation, resource, sender, recipient, verified, trust_level, agent_id)
        )
        return hit if type(hit) is Decision else None

    @staticmethod
    def _remember(compiled: RuleIndex, key: tuple[Any, ...] | None, outcome: Decision | Rule) -> None:
        if key is None:
            return
        decisions = compiled.decisions
        if len(decisions) >= _DECISIONS_MAX:
            decisions.clear()
        decisions[key] = outcome

    def evaluate_linear(self, operation: str, resource: str, context: Context | None = None) -> Decision:
        """The same decision by scanning every rule in order (reference and benchmark baseline)."""
        ctx: Context = context if context is not None else {}
        try:
            if self.permissions is not None and "_permissions" not in ctx:
                ctx = {**ctx, "_permissions": self.permissions}
            if self.require_verified_sender and not ctx.get("verified", False):
                return self._finish(None, "deny", "sender not verified (require_verified_sender)", ctx)
            for rule in self._compiled.rules:
                matched = rule.pattern.matches(operation, resource, ctx)
                if matched is None and rule.action == "deny":
                    return self._deny(rule, _undecided(rule))
                if matched:
                    return self._finish(rule, rule.action, rule.reason, ctx)
            return self._finish(None, self.default_action, f"default {self.default_action}", ctx)
        except Exception as exc:
            return Decision(
                False, "deny", f"evaluation_error: {type(exc).__name__}: {exc}", self.name, violation=True
            )

    def _finish(self, rule: Rule | None, action: str, reason: str, ctx: Context) -> Decision:
        if action == "allow":
            if rule is not None and rule.limiter is not None:
                agent = ctx.get("agent_id") or ctx.get("sender") or ""
                shared = self.shared_limits
                if shared is not None:  # decided when the gate has taken the token
                    limit = rule.limiter.limit
                    denied = self._deny(rule, f"rate limit {rule.rate_limit} exceeded", rate_limited=True)
                    key = shared_key(self.name, rule.name, limit, str(agent))
                    check = RateCheck(shared, key, limit, denied)
                    return Decision(True, "allow", reason or "allowed", self.name, rule, rate_checks=(check,))
                if not rule.limiter.take(agent):
                    return self._deny(rule, f"rate limit {rule.rate_limit} exceeded", rate_limited=True)
            return Decision(True, "allow", reason or "allowed", self.name, rule)
        return self._deny(rule, reason or "denied")

    def _deny(self, rule: Rule | None, reason: str, rate_limited: bool = False) -> Decision:
        signal = rule.on_violation if rule is not None else None
        if self.mode == "audit":
            return Decision(True, "audit", reason, self.name, rule, True, signal, rate_limited)
        return Decision(False, "deny", reason, self.name, rule, True, signal, rate_limited)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "default_action": self.default_action,
            "inheritance": self.inheritance,
            "mode": self.mode,
            "require_verified_sender": self.require_verified_sender,
            "rules": [r.to_dict() for r in self.rules],
        }

    def __repr__(self) -> str:
        return (
            f"Policy({self.name!r}, version={self.version!r}, rules={len(self.rules)}, "
            f"default_action={self.default_action!r})"
        )

    # -- built-ins and helpers ----------------------------------------------------------------

    @classmethod
    def builtin(cls, name: str) -> Policy:
        """``"strict"`` (deny by default), ``"permissive"`` (allow by default) or ``"audit"``
        (allow, record violations). Raises PolicyError for another name."""
        if name == "strict":
            return cls("strict", default_action="deny")
        if name == "permissive":
            return cls("permissive", default_action="allow")
        if name == "audit":
            return cls("audit", default_action="allow", mode="audit")
        raise PolicyError(f"unknown built-in policy {name!r}: strict, permissive or audit")

    @classmethod
    def no_destructive_sql(
        cls, dialect: str = "any", *, allow: Collection[str] = (), max_length: int = MAX_SQL_LENGTH
    ) -> Policy:
        """Deny ``sql`` operations whose resource (the SQL text) is destructive, read by a real
        parser for ``dialect``; deny running an agent (``kernel.execute``, operation ``run``)
        when a text of its arguments reads as SQL and is destructive (see
        :class:`~agent_os.control_plane.policy.sql_content.SqlContent`); allow everything else.

        Destructive: ``DROP``, ``TRUNCATE``, ``RENAME``, ``MERGE``, ``DELETE``/``UPDATE`` without
        a top-level ``WHERE`` or inside another statement, ``ALTER`` other than adding, text the
        parser cannot read, a statement kind the guard does not list as harmless, text over
        ``max_length`` characters, and the categories not named in ``allow`` (``"dynamic"``,
        ``"routines"``, ``"server"``, ``"privileges"``, ``"maintenance"``). ``dialect`` is
        ``"any"`` (every reading of PostgreSQL, MySQL/MariaDB and SQLite must parse and be
        harmless), ``"postgresql"``, ``"mysql"``, ``"sqlite"`` or another sqlglot dialect. See
        :class:`agent_os.control_plane.policy.sql_guard.SqlGuard` and ``docs/control-plane.md``
        (Guards). Raises PolicyError for an unknown dialect or category, or a bad ``max_length``."""
        guard = SqlGuard(dialect, allow, max_length)
        policy = cls(f"no_destructive_sql:{guard.dialect}", default_action="allow")
        policy.add_rule(
            "deny",
            CheckedPattern("sql", guard, "<destructive SQL>"),
            reason="destructive SQL",
            name="no-destructive-sql",
        )
        policy.add_rule(
            "deny",
            ContentPattern(RUN_OPERATION, SqlContent(guard), "<destructive SQL in the arguments>"),
            reason="destructive SQL in the arguments",
            name="no-destructive-sql-arguments",
        )
        return policy

    @classmethod
    def file_access(cls, path: str, operations: Sequence[str] = ("read", "write")) -> Policy:
        """Allow file ``operations`` only on ``path`` and below it: a resource that is not an
        absolute path, has a ``..`` segment (or a backslash), or whose ``posixpath.normpath``
        is outside ``path`` is denied (see :mod:`agent_os.control_plane.policy.guards`); other operations are
        left to other policies (allowed here). Raises PolicyError for a relative ``path``."""
        if not path.startswith("/"):
            raise PolicyError(f"file_access needs an absolute path, got {path!r}")
        root = posixpath.normpath(path)
        if root.startswith("//"):
            root = "/" + root.lstrip("/")
        policy = cls(f"file_access:{root}", default_action="allow")

        def outside(resource: str) -> str | None:
            return path_refusal(root, resource)

        for op in operations:
            policy.add_rule(
                "deny",
                CheckedPattern(op, outside, f"<a path outside {root}>"),
                reason=f"{op} outside {root}",
                name=f"{op}-outside-root",
            )
        return policy

    @classmethod
    def rate_limit(cls, limit: int, window: str | float = "1m") -> Policy:
        """Allow every action, at most ``limit`` per ``window`` per agent. Raises PolicyError
        for a limit that is not a positive integer or a window that is not a positive, finite
        time."""
        rate = RateLimit(limit, parse_window(window))  # checked before either is printed
        policy = cls(f"rate_limit:{limit}/{window}", default_action="allow")
        policy.add_rule(
            "allow",
            Pattern("*", "*"),
            rate_limit=rate,
            reason="within rate limit",
            name="rate-limit",
        )
        return policy
