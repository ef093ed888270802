"""The verifier service on the real NATS server answers what it refuses, and bounds what it
sends to the models.

An unsigned request gets the documented ``{"ok": false, "error": "unauthenticated"}`` (not a
timeout), counted; a prompt, response or context beyond ``max_text_bytes`` gets ``too_large``,
counted, and no model is asked; the service answers a valid request afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent_os.amb import AMB
from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.iatp import IATP
from agent_os.services.verifier_service import (
    MAX_TEXT_BYTES,
    RequestTooLarge,
    VerifierRefused,
    VerifierService,
    request_verification,
)
from tests.support.identities import identities
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


@dataclass
class Setup:
    subject: str
    service: VerifierService
    caller: AMB
    unsigned: AMB
    llm: ScriptedLLMServer
    keys: dict[str, IATP]


@pytest.fixture
async def s() -> AsyncIterator[Setup]:
    tag = uuid.uuid4().hex[:10]
    subject = f"cmvk{tag}.verify"
    keys = await identities("verifier-service", "alice")
    async with ScriptedLLMServer(default=Reply(verdict("supported", 0.9))) as llm:
        cmvk = CMVK(
            [ModelSpec(n, model=f"openai/{n}") for n in ("a", "b")], api_base=llm.url, api_key="k", retries=0
        )
        service_mw = keys["verifier-service"].middleware()
        bus = AMB("nats", NATS_URL, agent_id="verifier-service", middleware=[service_mw])
        service = VerifierService(bus, cmvk, subject=subject, queue=f"q{tag}")
        caller = AMB("nats", NATS_URL, agent_id="alice", middleware=[keys["alice"].middleware()])
        unsigned = AMB("nats", NATS_URL, agent_id="alice")
        try:
            await service.start()
            yield Setup(subject, service, caller, unsigned, llm, keys)
        finally:
            await service.stop()
            for client in (caller, unsigned, bus):
                await client.close()


async def still_answers(s: Setup) -> None:
    reply = await request_verification(s.caller, "What is 6 x 7?", "42", subject=s.subject, timeout=20)
    assert reply["verified"] is True


async def test_an_unsigned_request_is_answered_unauthenticated_not_left_to_time_out(s: Setup) -> None:
    with pytest.raises(VerifierRefused):
        await request_verification(s.unsigned, "What is 6 x 7?", "42", subject=s.subject, timeout=5)
    reply = await s.unsigned.request(s.subject, {"prompt": "p", "response": "r"}, timeout=5)
    assert (reply["ok"], reply["error"]) == (False, "unauthenticated")
    assert s.service.stats.unauthenticated == 2
    assert s.llm.requests == []
    await still_answers(s)


@pytest.mark.parametrize(
    "request_fields",
    [
        {"prompt": "x" * 900_000, "response": "42"},
        {"prompt": "What is 6 x 7?", "response": "y" * 900_000},
        {"prompt": "What is 6 x 7?", "response": "42", "context": {"notes": "z" * 900_000}},
        {"prompt": ["a"] * 40_000, "response": "42"},  # JSON of a list: 200 KB sent to a model
        {"prompt": "é" * (MAX_TEXT_BYTES // 2 + 1), "response": "42"},  # bytes, not characters
    ],
    ids=["prompt", "response", "context", "list-prompt", "multibyte"],
)
async def test_an_oversized_request_is_refused_and_no_model_is_asked(
    s: Setup, request_fields: dict[str, Any]
) -> None:
    with pytest.raises(RequestTooLarge, match="limit"):
        await request_verification(
            s.caller,
            request_fields["prompt"],
            request_fields["response"],
            request_fields.get("context"),
            subject=s.subject,
            timeout=20,
        )
    assert s.service.stats.too_large == 1
    assert s.llm.requests == []
    await still_answers(s)
    assert s.service.stats.verified == 1


async def test_a_request_at_the_limit_is_verified(s: Setup) -> None:
    reply = await request_verification(s.caller, "q" * MAX_TEXT_BYTES, "42", subject=s.subject, timeout=20)
    assert reply["ok"] is True
    assert s.service.stats.too_large == 0
