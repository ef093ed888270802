"""The ``bus.request`` action over NATS: A asks B through its governed client."""

from __future__ import annotations

import pytest

from tests.support.bus_actions import ask_and_answer
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats


async def test_agent_a_asks_agent_b_over_nats() -> None:
    await ask_and_answer("nats", NATS_URL)
