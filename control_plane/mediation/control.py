"""Control subjects: where an agent receives signals sent from other processes over the bus."""

from __future__ import annotations

from typing import Final

CONTROL_PREFIX: Final = "_ctl.signal"


def control_subject(agent_id: str) -> str:
    """The subject on which ``agent_id`` receives signals from other processes."""
    return f"{CONTROL_PREFIX}.{agent_id}"
