"""The ``bus.publish`` and ``bus.request`` actions on the in-memory broker."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent_os import ActionRequest
from agent_os.amb import AMB, Metadata
from agent_os.control_plane import BusActions, KernelSpace
from agent_os.control_plane.actions import ActionRefused, ActionRegistry
from tests.support import Collector, memory_url
from tests.support.bus_actions import ask_and_answer
from tests.support.closing import Closing


async def test_agent_a_asks_agent_b_and_is_recorded() -> None:
    await ask_and_answer("memory", memory_url("bus-actions"))


async def test_publish_goes_out_through_the_governed_client(closing: Closing) -> None:
    url = memory_url("bus-publish")
    async with KernelSpace("permissive") as kernel:
        a = closing(AMB("memory", url, agent_id="a"))
        b = closing(AMB("memory", url, agent_id="b"))
        kernel.attach(a)
        BusActions(a).register(kernel.actions)
        got = Collector()
        b.subscribe("news.today")(got)
        async with a, b:

            @kernel.register(name="teller", permissions=["write"])
            async def teller() -> Any:
                return await kernel.submit(
                    ActionRequest("bus.publish", "news.today", {"payload": {"n": 1}, "recipient": "b"})
                )

            result = await kernel.execute(teller)
            assert result.ok
            assert isinstance(result.output["id"], str)
            await got.wait_for(1)
            assert got.messages == [{"n": 1}]
            assert got.metadata[0].sender == "a"
            assert got.metadata[0].recipient == "b"


def _request(target: object, **params: Any) -> ActionRequest:
    return ActionRequest("bus.request", target, params)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "params", "why"),
    [
        ("_INBOX.x", {}, "platform's own"),
        ("a.*", {}, "wildcard"),
        ("", {}, "empty|subject"),
        (42, {}, "string"),
        ("a.b", {"timeout": 0}, "timeout"),
        ("a.b", {"timeout": 1e9}, "timeout"),
        ("a.b", {"timeout": "3"}, "timeout"),
        ("a.b", {"timeout": float("nan")}, "timeout"),
        ("a.b", {"recipient": 7}, "recipient"),
    ],
)
def test_bad_targets_and_params_are_refused_before_the_decision(
    target: object, params: dict[str, Any], why: str
) -> None:
    registry = ActionRegistry()
    BusActions(AMB("memory", memory_url())).register(registry)
    spec = registry.get("bus.request")
    assert spec is not None
    assert spec.permission == "request"
    with pytest.raises(ActionRefused, match=why):
        spec.provider.resource(_request(target, **params))


async def test_a_request_nobody_answers_is_an_error_result(closing: Closing) -> None:
    url = memory_url("bus-timeout")
    async with KernelSpace("permissive") as kernel:
        a = closing(AMB("memory", url, agent_id=f"a-{uuid.uuid4().hex[:6]}"))
        kernel.attach(a)
        BusActions(a).register(kernel.actions)
        async with a:

            @kernel.register(name="asker")
            async def asker() -> Any:
                return await kernel.submit(ActionRequest("bus.request", "nobody.home", {"timeout": 0.2}))

            result = await kernel.execute(asker)
            assert result.allowed
            assert result.error is not None
            outcome = (await kernel.recorder.query(event_type="action_outcome"))[-1]
            assert outcome.data["status"] == "error"


async def test_messages_reach_b_unchanged(closing: Closing) -> None:
    url = memory_url("bus-meta")
    async with KernelSpace("permissive") as kernel:
        a = closing(AMB("memory", url, agent_id="a"))
        b = closing(AMB("memory", url, agent_id="b"))
        kernel.attach(a)
        BusActions(a).register(kernel.actions)

        @b.subscribe("echo")
        async def echo(message: Any, metadata: Metadata) -> None:
            await b.reply(metadata, message)

        async with a, b:

            @kernel.register(name="asker")
            async def asker() -> Any:
                return await kernel.submit(ActionRequest("bus.request", "echo", {"payload": [1, "two"]}))

            assert (await kernel.execute(asker)).output == [1, "two"]
