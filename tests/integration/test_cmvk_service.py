"""The verifier service answers cmvk.verify requests over the bus (in-memory broker, real litellm HTTP)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from agent_os.amb import AMB, RequestTimeout
from agent_os.cmvk import CMVK, CMVKError, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.services.verifier_service import (
    InvalidVerifyRequest,
    VerifierRefused,
    VerifierService,
    request_verification,
)
from tests.support.identities import identities


@pytest.fixture
async def setup() -> AsyncIterator[tuple[AMB, VerifierService, ScriptedLLMServer]]:
    url = f"memory://cmvk-{uuid.uuid4().hex}"
    async with (
        ScriptedLLMServer() as llm,
        AMB("memory", url, agent_id="verifier") as bus,
        AMB("memory", url, agent_id="caller") as caller,
    ):
        cmvk = CMVK(
            [ModelSpec(n, model=f"openai/{n}") for n in ("a", "b", "c")],
            api_base=llm.url,
            api_key="k",
            retries=0,
        )
        async with VerifierService(bus, cmvk, trust_bus=True) as service:
            yield caller, service, llm


async def test_a_request_is_verified_and_answered(
    setup: tuple[AMB, VerifierService, ScriptedLLMServer],
) -> None:
    caller, service, llm = setup
    for n in ("a", "b", "c"):
        llm.script(n, Reply(verdict("supported", 0.9)))
    reply = await request_verification(caller, "What is 6 x 7?", "42", {"domain": "math"}, timeout=20)
    assert reply["ok"] is True
    assert reply["verified"] is True
    assert reply["model_votes"] == {"a": True, "b": True, "c": True}
    assert service.stats.as_dict() == {
        "requests": 1,
        "verified": 1,
        "rejected": 0,
        "invalid": 0,
        "failed": 0,
        "unauthenticated": 0,
        "too_large": 0,
        "wrong_subject": 0,
    }


async def test_an_unverified_result_is_answered_too(
    setup: tuple[AMB, VerifierService, ScriptedLLMServer],
) -> None:
    caller, service, llm = setup
    llm.script("a", Reply(verdict("contradicted")))
    llm.script("b", Reply(status=500))
    llm.script("c", Reply(verdict("contradicted")))
    reply = await request_verification(caller, "What is 6 x 7?", "48", timeout=20)
    assert reply["verified"] is False
    assert reply["details"]["b"]["abstention"] == "provider_error"
    assert service.stats.rejected == 1


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ("just a string", "request must be a map"),
        ({"prompt": "q"}, "request lacks response"),
        ({"prompt": "q", "response": "r", "extra": 1}, "unknown request fields: extra"),
        ({"prompt": "q", "response": "r", "context": [1]}, "context must be a map"),
    ],
)
async def test_bad_requests_get_a_reason_and_are_counted(
    setup: tuple[AMB, VerifierService, ScriptedLLMServer], payload: object, why: str
) -> None:
    caller, service, llm = setup
    reply = await caller.request("cmvk.verify", payload, timeout=5)
    assert reply == {"ok": False, "error": "invalid_request", "reason": pytest.approx(reply["reason"])}
    assert why in reply["reason"]
    assert service.stats.invalid == 1
    assert llm.requests == []
    # the service is still serving
    for n in ("a", "b", "c"):
        llm.script(n, Reply(verdict("supported")))
    assert (await request_verification(caller, "q", "r", timeout=20))["verified"] is True


async def test_async_with_starts_and_stops_the_service() -> None:
    url = f"memory://cmvk-{uuid.uuid4().hex}"
    async with (
        ScriptedLLMServer() as llm,
        AMB("memory", url, agent_id="verifier") as bus,
        AMB("memory", url, agent_id="caller") as caller,
    ):
        llm.script("a", Reply(verdict("supported", 0.9)))
        cmvk = CMVK([ModelSpec("a", model="openai/a")], api_base=llm.url, api_key="k", retries=0)
        async with VerifierService(bus, cmvk, trust_bus=True) as service:
            reply = await request_verification(caller, "What is 6 x 7?", "42", timeout=20)
            assert reply["ok"] is True
        with pytest.raises(RequestTimeout):  # stopped: nobody takes the request any more
            await request_verification(caller, "What is 6 x 7?", "42", timeout=0.3)
    assert service.stats.requests == 1


async def test_the_client_helper_raises_on_refusal(
    setup: tuple[AMB, VerifierService, ScriptedLLMServer],
) -> None:
    caller, _, _ = setup
    with pytest.raises(InvalidVerifyRequest, match="context must be a map"):
        await request_verification(caller, "q", "r", context=["x"], timeout=5)  # type: ignore[arg-type]
    assert issubclass(InvalidVerifyRequest, CMVKError)


async def test_without_trust_bus_a_request_needs_a_verified_sender() -> None:
    """Verification on requests: an unsigned request is refused, counted and answered
    ``unauthenticated``, with IATP in the service's chain or without it; a signed request is
    verified and answered."""
    url = f"memory://cmvk-{uuid.uuid4().hex}"
    keys = await identities("verifier", "caller")
    async with ScriptedLLMServer() as llm:
        for n in ("a", "b"):
            llm.script(n, Reply(verdict("supported", 0.9)))
        cmvk = CMVK([ModelSpec(n, model=f"openai/{n}") for n in "ab"], api_base=llm.url, api_key="k")
        async with (
            AMB("memory", url, agent_id="verifier", middleware=[keys["verifier"].middleware()]) as bus,
            AMB("memory", url, agent_id="caller", middleware=[keys["caller"].middleware()]) as caller,
            AMB("memory", url, agent_id="caller") as unsigned,
            VerifierService(bus, cmvk) as service,
        ):
            reply = await request_verification(caller, "What is 6 x 7?", "42", timeout=20)
            assert reply["verified"] is True
            with pytest.raises(VerifierRefused, match="not valid"):
                await request_verification(unsigned, "What is 6 x 7?", "42", timeout=5)
            assert service.stats.unauthenticated == 1
        async with (
            AMB("memory", url, agent_id="verifier-no-iatp") as bus,
            AMB("memory", url, agent_id="caller") as unsigned,
            VerifierService(bus, cmvk) as service,
        ):
            with pytest.raises(VerifierRefused, match="not verified by IATP"):
                await request_verification(unsigned, "What is 6 x 7?", "42", timeout=5)
    assert service.stats.unauthenticated == 1
    assert len(llm.requests) == 2  # only the signed request reached the models
