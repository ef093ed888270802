"""The ``bus.*`` actions scenario, run on the memory broker (unit) and on NATS (integration):
agent A asks agent B with ``bus.request`` through A's governed client and gets B's answer; an
agent without the permission is denied; the action and the message are both recorded."""

from __future__ import annotations

import uuid

from agent_os import ActionRequest, ActionResult
from agent_os.amb import AMB, Metadata
from agent_os.control_plane import DECISION_EVENTS, VIOLATION_EVENTS, BusActions, KernelSpace, Pattern, Policy


async def ask_and_answer(backend: str, url: str) -> None:
    prefix = f"busact.{uuid.uuid4().hex[:8]}"
    policy = Policy("bus-actions", default_action="allow")
    policy.add_rule("deny", Pattern("request", f"{prefix}.secret.*", match_type="glob"), "not this one")
    async with KernelSpace(policy) as kernel:
        a = AMB(backend, url, agent_id=f"{prefix}-a")
        b = AMB(backend, url, agent_id=f"{prefix}-b")
        kernel.attach(a)
        BusActions(a).register(kernel.actions)
        asked: list[str] = []

        @b.subscribe(f"{prefix}.b.ask")
        async def answer(message: str, metadata: Metadata) -> None:
            asked.append(message)
            await b.reply(metadata, f"B says: {message}")

        async with a, b:

            @kernel.register(name="asker", permissions=["write"])
            async def asker(subject: str) -> ActionResult:
                return await kernel.submit(
                    ActionRequest("bus.request", subject, {"payload": "hi", "timeout": 3})
                )

            @kernel.register(name="reader", permissions=["read"])
            async def reader() -> ActionResult:
                return await kernel.submit(ActionRequest("bus.request", f"{prefix}.b.ask", {"payload": "x"}))

            result = await kernel.execute(asker, f"{prefix}.b.ask")
            assert result.ok, result.error
            assert result.output == "B says: hi"
            assert asked == ["hi"]

            denied = await kernel.execute(reader)
            assert not denied.allowed
            assert "read" in (denied.error or "") or "permission" in (denied.error or "")
            by_policy = await kernel.execute(asker, f"{prefix}.secret.x")
            assert not by_policy.allowed
            assert by_policy.error == "not this one"
            refused = await kernel.execute(asker, "_ctl.signal.someone")
            assert not refused.allowed
            assert asked == ["hi"]  # nothing else reached B

        records = await kernel.recorder.query()
        actions = [
            (
                r.event_type,
                r.data.get("operation"),
                r.data.get("direction"),
                r.data.get("decision", r.data.get("status")),
            )
            for r in records
            if r.event_type in (*DECISION_EVENTS, "action_outcome")
            and (r.data.get("action") == "bus.request" or r.data.get("direction") == "out")
        ]
        # the action's decision, the message's own decision on A's client, then the outcome
        assert actions[:3] == [
            ("policy_decision", "request", None, "allow"),
            ("policy_decision", "request", "out", "allow"),
            ("action_outcome", "request", None, "ok"),
        ]
        violations = [r for r in records if r.event_type in VIOLATION_EVENTS]
        assert [v.data["action"] for v in violations] == ["bus.request"] * 3
        assert (await kernel.recorder.verify()).ok
