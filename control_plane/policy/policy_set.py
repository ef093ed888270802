"""PolicySet: several policies that must all allow."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from agent_os.control_plane.errors import PolicyError
from agent_os.control_plane.policy.decision import Action, Decision, RateCheck
from agent_os.control_plane.policy.policy import Policy


class PolicySet:
    """Several policies that must all allow (``KernelSpace(policies=[...])``).

    Evaluated in order; the first deny decides, else the first policy's allow. Has the same
    ``evaluate`` and ``reload`` shape as :class:`Policy` so the kernel treats both alike.
    """

    def __init__(self, policies: Sequence[Policy]) -> None:
        if not policies:
            raise PolicyError("a policy set needs at least one policy")
        self.policies = list(policies)
        self.name = "+".join(p.name for p in self.policies)

    def evaluate(
        self,
        operation: str,
        resource: str,
        context: Mapping[str, Any] | None = None,
        *,
        default: Action | None = None,
    ) -> Decision:
        """Every policy's decision (``default`` as in :meth:`Policy.evaluate`): the first deny,
        else the first allow, carrying every policy's shared rate-limit checks."""
        first: Decision | None = None
        checks: tuple[RateCheck, ...] = ()
        for policy in self.policies:
            decision = policy.evaluate(operation, resource, context, default=default)
            if not decision.allowed:
                return decision
            first = first or decision
            checks += decision.rate_checks
        assert first is not None
        if checks != first.rate_checks:  # every policy's shared rate limit still applies
            first = dataclasses.replace(first, rate_checks=checks)
        return first

    @property
    def inheritance(self) -> str:
        return self.policies[0].inheritance

    def policy(self, which: int | str) -> Policy:
        """The policy at index ``which``, or named ``which``. Raises PolicyError otherwise."""
        if isinstance(which, int) and not isinstance(which, bool):
            if 0 <= which < len(self.policies):
                return self.policies[which]
            raise PolicyError(f"no policy at index {which} (the set has {len(self.policies)})")
        found = [p for p in self.policies if p.name == which]
        if len(found) != 1:
            what = "no policy" if not found else f"{len(found)} policies"
            raise PolicyError(f"{what} named {which!r} in {self.name}")
        return found[0]
