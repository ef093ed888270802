"""Held messages in mediated mode on the real NATS server: one stopped agent's held messages do
not stop a single service instance (its ingress subscription is a queue group) from forwarding
another agent's traffic, and SIGCONT releases them in order."""

from __future__ import annotations

import pytest

from tests.support.holds import a_stopped_agent_does_not_stall_the_others
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


async def test_a_stopped_agent_does_not_stall_the_others_on_nats() -> None:
    await a_stopped_agent_does_not_stall_the_others("nats", NATS_URL)
