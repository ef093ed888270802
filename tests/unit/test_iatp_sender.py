"""iatp.sender_identity: who a delivered message acts for, decided one way, failing closed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent_os.amb import Envelope, Metadata
from agent_os.iatp import IATP, RESULT, Reason, Unauthenticated, sender_identity
from agent_os.iatp.result import invalid


def metadata(sender: Any = "claimed", result: Any = None) -> Metadata:
    meta = Metadata(Envelope("id1", "svc.request", sender, None, timestamp=1), "svc.request", 1, {})
    if result is not None:
        meta.context[RESULT] = result
    return meta


@pytest.mark.parametrize("trust_bus", [False, True])
async def test_a_valid_result_names_the_sender_whatever_the_envelope_claims(trust_bus: bool) -> None:
    iatp = IATP()
    await iatp.register_agent("alice")
    result = await iatp.verify(await iatp.sign("alice", {"q": 1}))
    assert result.valid
    assert sender_identity(metadata("mallory", result), trust_bus=trust_bus) == "alice"
    # a plain mapping of the API reference's shape counts the same way
    assert (
        sender_identity(metadata("mallory", {"valid": True, "sender": "bob"}), trust_bus=trust_bus) == "bob"
    )


@pytest.mark.parametrize("trust_bus", [False, True])
@pytest.mark.parametrize(
    "result",
    [
        invalid(Reason.UNSIGNED, "alice", 1),
        invalid(Reason.BAD_SIGNATURE, "alice", 1),
        {"valid": False, "sender": "alice"},
        {"valid": "yes", "sender": "alice"},  # only True counts
        {"valid": 1, "sender": "alice"},
        {"valid": True, "sender": ""},
        {"valid": True, "sender": None},
        {"valid": True},
        SimpleNamespace(valid=True, sender=42),
        "valid",
    ],
)
def test_a_result_that_is_not_valid_is_refused_even_on_a_trusted_bus(result: Any, trust_bus: bool) -> None:
    with pytest.raises(Unauthenticated):
        sender_identity(metadata("alice", result), trust_bus=trust_bus)


def test_without_a_result_only_a_trusted_bus_gives_the_claimed_sender() -> None:
    with pytest.raises(Unauthenticated, match="not verified"):
        sender_identity(metadata("alice"))
    assert sender_identity(metadata("alice"), trust_bus=True) == "alice"
    with pytest.raises(Unauthenticated, match="no sender"):
        sender_identity(metadata(""), trust_bus=True)
    with pytest.raises(Unauthenticated):
        sender_identity(object(), trust_bus=True)  # not a delivery at all


def test_the_error_belongs_to_iatps_tree() -> None:
    from agent_os.iatp import IATPError

    assert issubclass(Unauthenticated, IATPError)
