"""Actions in mediated mode: an agent's action is a request on ``ingress.action.<name>``; the
control-plane service decides it with the kernel's action gate (the decision part of
``kernel.submit``), answers a denial itself, forwards an allowed request to the tool service's
delivery subject, and records the outcome when the tool service's reply passes
(``docs/services.md``, "Actions across processes").

Also the wire format both sides share: the request payload ``{"target", "params",
"agent_id"?}`` and the answer payload, an :class:`ActionResult` as a map.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from agent_os.amb import Metadata
from agent_os.amb.replies import ERROR_HEADER
from agent_os.control_plane import ActionRequest, ActionResult, KernelSpace
from agent_os.control_plane.errors import InboxBusy
from agent_os.control_plane.kernel.submit import ActionDecision
from agent_os.control_plane.mediation.identity import message_sender
from agent_os.control_plane.mediation.replies import PendingRequests
from agent_os.services.control_plane_service._subjects import check_agent_id, delivery_subject

log = logging.getLogger("agent_os.services.control_plane")

ACTION_PREFIX: Final = "action"
"""Topics ``action.<name>`` are actions: ``ingress.action.fs.read`` asks for ``fs.read``."""
TOOL_SERVICE: Final = "tools"
"""The default agent id of the tool service (``agent-os serve tools``)."""
_REQUEST_FIELDS: Final = frozenset({"target", "params", "agent_id"})

Forward = Callable[[str, Metadata], Awaitable[None]]
Answer = Callable[[Metadata, dict[str, Any]], Awaitable[None]]


def action_topic(action: str, prefix: str = ACTION_PREFIX) -> str:
    """The topic of ``action``'s requests: ``<prefix>.<action>`` (``action.fs.read``)."""
    return f"{prefix}.{action}"


def parse_action(action: str, message: Any) -> tuple[ActionRequest, str | None]:
    """The request for ``action`` a payload asks for, and why it cannot be taken (None: it
    can). A payload is a map ``{"target": str, "params": map (optional), "agent_id": str
    (optional)}``; anything else gives a request with an empty target and the reason."""
    if not isinstance(message, Mapping):
        return ActionRequest(action, ""), f"an action request is a map, got {type(message).__name__}"
    unknown = sorted(str(k) for k in set(message) - _REQUEST_FIELDS)
    if unknown:
        return ActionRequest(action, ""), f"unknown action request fields: {', '.join(unknown)}"
    target, params, agent_id = message.get("target"), message.get("params"), message.get("agent_id")
    if not isinstance(target, str):
        return ActionRequest(action, ""), f"an action's target is a string, got {type(target).__name__}"
    if params is not None and not isinstance(params, Mapping):
        return ActionRequest(action, target), f"an action's params are a map, got {type(params).__name__}"
    if agent_id is not None and not isinstance(agent_id, str):
        return ActionRequest(action, target), "an action's agent_id is a string"
    return ActionRequest(action, target, params or {}, agent_id), None


def request_payload(request: ActionRequest) -> dict[str, Any]:
    """The payload of ``request`` on the bus (its action is in the topic)."""
    payload: dict[str, Any] = {"target": request.target, "params": dict(request.params)}
    if request.agent_id is not None:
        payload["agent_id"] = request.agent_id
    return payload


def result_payload(result: ActionResult) -> dict[str, Any]:
    """``result`` as the map an answer carries."""
    return {
        "allowed": result.allowed,
        "output": result.output,
        "error": result.error,
        "record_id": result.record_id,
    }


def result_from_payload(payload: Any) -> ActionResult | None:
    """The :class:`ActionResult` an answer carries, or None when it is not one."""
    if not isinstance(payload, Mapping):
        return None
    allowed, error, record_id = payload.get("allowed"), payload.get("error"), payload.get("record_id")
    if not isinstance(allowed, bool):
        return None
    if not isinstance(error, str | None) or not isinstance(record_id, str | None):
        return None
    return ActionResult(allowed, payload.get("output"), error, record_id)


def outcome_error(message: Any, metadata: Metadata) -> str | None:
    """The error of the tool service's reply (None: the action was done): the bus's error
    header (its handler failed), the answer's ``error``, or a malformed answer."""
    failed = metadata.headers.get(ERROR_HEADER)
    if failed is not None:
        return f"the tool service failed: {failed}"
    result = result_from_payload(message)
    if result is None:
        return "the tool service's answer is not an action result"
    return result.error


class MediatedActions:
    """The action requests passing one control-plane service instance.

    ``tool_service``: the agent id of the tool service the allowed ones go to (on its own
    delivery subjects); ``forward`` publishes a message unchanged to a subject; ``answer``
    replies to a request as the service (signed when the service has IATP); ``trust_bus``:
    as the service's (who sent a message, for the policy's context). Counts in
    ``forwarded``, ``denied``, ``outcomes``, ``failed`` (allowed ones that could not be
    forwarded) and ``answer_failures`` (answers that could not be sent)."""

    def __init__(
        self,
        kernel: KernelSpace,
        pending: PendingRequests,
        forward: Forward,
        answer: Answer,
        *,
        tool_service: str = TOOL_SERVICE,
        delivery_prefix: str,
        prefix: str = ACTION_PREFIX,
        trust_bus: bool = False,
    ) -> None:
        self.kernel = kernel
        self.trust_bus = trust_bus
        self.pending = pending
        self.tool_service = check_agent_id(tool_service)
        self.delivery_prefix = delivery_prefix
        self.prefix = prefix
        self._forward = forward
        self._answer = answer
        self.forwarded = 0
        self.denied = 0
        self.outcomes = 0
        self.failed = 0
        self.answer_failures = 0

    def is_action(self, topic: str) -> bool:
        """Whether ``topic`` (an ingress message's) names an action."""
        return topic.startswith(self.prefix + ".")

    async def request(self, topic: str, message: Any, metadata: Metadata) -> None:
        """Decide on the action request of an ingress message on ``topic`` (the mediator let it
        through: its sender is established, its signals applied, it runs as that agent) and
        answer it or forward it. One decision record; a denial is answered at once."""
        request, why = parse_action(topic[len(self.prefix) + 1 :], message)
        envelope = metadata.envelope
        if why is None and envelope.recipient not in (None, self.tool_service):
            why = f"an action goes to the tool service {self.tool_service!r}, not {envelope.recipient!r}"
        sender, verified, trust, _ = message_sender(metadata, self.trust_bus)
        identity = {"sender": sender, "verified": verified, "trust_level": trust}
        decided = await self.kernel.decide_action(request, refusal=why, context=identity)
        if not decided.allowed:
            self.denied += 1
            await self._reply(metadata, decided.denial())
            return
        reply_to = metadata.reply_to
        assert reply_to is not None  # the mediator lets only requests through
        try:
            self.pending.add(
                reply_to,
                envelope.id,
                str(sender),
                topic,
                self.tool_service,
                envelope.expires_at,
                note=decided,
            )
        except InboxBusy as exc:  # another request on the same inbox slipped in meanwhile
            await self._failed(decided, metadata, f"not forwarded: {exc}")
            return
        subject = delivery_subject(topic, self.delivery_prefix, agent=self.tool_service)
        try:
            await self._forward(subject, metadata)
        except Exception as exc:
            entry = self.pending.get(reply_to)
            if entry is not None:
                entry.answered = True
            await self._failed(decided, metadata, f"could not reach the tool service: {exc!r}")
            return
        self.forwarded += 1

    async def outcome(self, reply_to: str, message: Any, metadata: Metadata) -> None:
        """Record the outcome of the action whose reply (to ``reply_to``) is passing, if it
        answers an action forwarded here (once)."""
        entry = self.pending.get(reply_to)
        if entry is None or not isinstance(entry.note, ActionDecision):
            return
        decided, entry.note = entry.note, None
        await self.kernel.record_action_outcome(decided, outcome_error(message, metadata))
        self.outcomes += 1

    async def _failed(self, decided: ActionDecision, metadata: Metadata, error: str) -> None:
        self.failed += 1
        log.error("action %s of %s: %s", decided.request.action, decided.agent, error)
        done = await self.kernel.record_action_outcome(decided, error)
        await self._reply(metadata, ActionResult(True, None, error, done.id))

    async def _reply(self, metadata: Metadata, result: ActionResult) -> None:
        # Its decision is recorded: a failed answer is logged and counted, never retried (the
        # requester's timeout tells it), so the request is not decided twice.
        try:
            await self._answer(metadata, result_payload(result))
        except Exception as exc:
            self.answer_failures += 1
            log.error("could not answer action request %s: %r", metadata.id, exc)
