"""services._identity: the one way the services decide who a message acts for (fail closed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent_os.amb import Envelope, Metadata
from agent_os.iatp import IATP
from agent_os.services._identity import (
    Unauthenticated,
    VerificationRequired,
    require_verification,
    sender_identity,
)


def metadata(sender: Any = "claimed", result: Any = None) -> Metadata:
    meta = Metadata(Envelope("id1", "emk.store", sender, None, timestamp=1), "emk.store", 1, {})
    if result is not None:
        meta.context["iatp"] = result
    return meta


@pytest.mark.parametrize("trust_bus", [False, True])
async def test_a_valid_iatp_result_names_the_sender_whatever_the_envelope_claims(trust_bus: bool) -> None:
    iatp = IATP()
    await iatp.register_agent("alice")
    signed = await iatp.sign("alice", {"q": 1}, topic="emk.store")
    result = await iatp.verify(signed)
    assert result.valid
    assert sender_identity(metadata("mallory", result), trust_bus=trust_bus) == "alice"
    assert (
        sender_identity(metadata("mallory", {"valid": True, "sender": "bob"}), trust_bus=trust_bus) == "bob"
    )


@pytest.mark.parametrize("trust_bus", [False, True])
@pytest.mark.parametrize(
    "result",
    [
        SimpleNamespace(valid=False, sender="alice", reason="unsigned"),
        {"valid": False, "sender": "alice"},
        {"valid": True, "sender": ""},
        {"valid": True, "sender": 7},
        {"valid": "yes", "sender": "alice"},
        SimpleNamespace(sender="alice"),
    ],
)
def test_an_invalid_result_is_refused_even_when_trusting_the_bus(result: Any, trust_bus: bool) -> None:
    with pytest.raises(Unauthenticated, match="not valid"):
        sender_identity(metadata("alice", result), trust_bus=trust_bus)


def test_without_a_result_the_claimed_sender_counts_only_on_a_trusted_bus() -> None:
    with pytest.raises(Unauthenticated, match="not verified by IATP"):
        sender_identity(metadata("alice"))
    assert sender_identity(metadata("alice"), trust_bus=True) == "alice"
    with pytest.raises(Unauthenticated, match="no sender"):
        sender_identity(metadata(""), trust_bus=True)


def test_require_verification() -> None:
    require_verification(True, False, "svc")
    require_verification(False, True, "svc")
    with pytest.raises(VerificationRequired, match="refusing to run the svc without sender verification"):
        require_verification(False, False, "svc")
    with pytest.raises(VerificationRequired, match="contradicts"):
        require_verification(True, True, "svc")
    assert issubclass(VerificationRequired, ValueError)
