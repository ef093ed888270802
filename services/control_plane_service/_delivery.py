"""Deliveries in mediated mode: who receives an allowed ingress message, and the ``deliver``
decision the policy makes for each of them before the service forwards it to that agent's own
delivery subject (``docs/services.md``, "Deliveries")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from agent_os.amb import MessageRejected, Metadata
from agent_os.amb.envelope import Envelope
from agent_os.control_plane import KernelSpace, PolicyViolationError
from agent_os.control_plane.mediation.identity import message_sender
from agent_os.control_plane.policy.decision import ACTION_BLOCKED, Decision
from agent_os.services.control_plane_service._subjects import check_agent_id

Roster = Callable[[], Iterable[str]]


class Deliveries:
    """The recipients of a message and the ``deliver`` decision for each.

    ``roster``: the agents a message without a ``recipient`` goes to (None: such messages are
    refused, ``no_recipients``); a message with a ``recipient`` goes to that agent only, and
    must name an agent of the roster when there is one. Every decision is recorded once.
    """

    def __init__(self, kernel: KernelSpace, roster: Roster | None, *, trust_bus: bool) -> None:
        self.kernel = kernel
        self.roster = roster
        self.trust_bus = trust_bus
        self.denied = 0

    def recipients(self, envelope: Envelope) -> list[str]:
        """The agents ``envelope`` is for. Raises MessageRejected (the bus dead-letters the
        message with its reason: ``bad_recipient``, ``unknown_recipient``, ``no_recipients``)."""
        roster = self.roster
        if envelope.recipient:
            try:
                recipient = check_agent_id(envelope.recipient)
            except ValueError as exc:
                raise MessageRejected(str(exc), reason="bad_recipient") from None
            if roster is not None and recipient not in set(roster()):
                raise MessageRejected(f"{recipient!r} is no agent of the roster", reason="unknown_recipient")
            return [recipient]
        agents = sorted(set(roster())) if roster is not None else []
        if not agents:
            raise MessageRejected(
                "a message without a recipient needs the service's roster of agents (--agents)",
                reason="no_recipients",
            )
        return agents

    async def allowed(self, recipient: str, topic: str, metadata: Metadata) -> bool:
        """Whether the policy lets ``recipient`` receive the message of ``metadata`` on
        ``topic`` (operation ``deliver``, as the receiver's own mediator would decide in
        embedded mode; a killed recipient receives nothing). Records the decision."""
        envelope = metadata.envelope
        sender, verified, trust, _ = message_sender(metadata, self.trust_bus)
        proc = self.kernel.external(recipient)
        gate = self.kernel.gate
        decision: Decision | None
        if proc.killed:
            killed = f"agent {recipient} was killed"
            decision = Decision(False, "deny", killed, "control-plane", violation=True, kind=ACTION_BLOCKED)
        else:
            decision = gate.cached_decision("deliver", topic, proc, sender, recipient, verified, trust)
        if decision is None:
            ctx: dict[str, Any] = {
                "operation": "deliver",
                "topic": topic,
                "agent_id": recipient,
                "agent_name": proc.name,
                "sender": sender,
                "claimed_sender": envelope.sender,
                "verified": verified,
                "trust_level": trust,
                "recipient": recipient,
                "headers": envelope.headers,
                "payload": envelope.payload,
                "priority": envelope.priority,
            }
            decision = gate.decide("deliver", topic, ctx, proc)
        data = {
            "operation": "deliver",
            "resource": topic,
            "decision": decision.action,
            "reason": decision.reason,
            "rule": decision.rule_name,
            "policy": decision.policy,
            "direction": "deliver",
            "message_id": envelope.id,
            "sender": sender,
            "recipient": recipient,
        }
        pending = gate.note_record(proc, recipient, data, decision, sender if verified else None, True)
        if pending is not None:
            try:
                await pending
            except PolicyViolationError:  # a shared rate limit had no token: recorded as a deny
                self.denied += 1
                return False
        if not decision.allowed:
            self.denied += 1
        return decision.allowed


def fixed_roster(agents: Iterable[str]) -> Roster:
    """A roster of these agents. Raises ValueError for an id :func:`check_agent_id` refuses."""
    frozen = frozenset(check_agent_id(a) for a in agents)
    return lambda: frozen


def identities_roster(iatp: Any, *services: str) -> Roster:
    """The agents whose public identities ``iatp`` knows (``services`` excluded: the service
    itself, its tool service), read at each message, so an identity imported later is in it."""

    def agents() -> Iterable[str]:
        for agent_id in list(iatp.registry.agents):
            if agent_id not in services:
                try:
                    yield check_agent_id(agent_id)
                except ValueError:
                    continue

    return agents
