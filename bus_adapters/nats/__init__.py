"""The NATS broker adapter: core NATS for ephemeral pub/sub, JetStream for durable subscriptions.

``NatsBroker("nats://127.0.0.1:4222", max_deliver=5)``; needs ``agent-os[nats]``, imported when
the broker connects. Semantics and options are in ``docs/bus.md`` ("nats").
"""

from __future__ import annotations

import importlib.util

from agent_os.bus_adapters.nats._config import DEFAULT_URL, INSTALL_HINT, NatsConfig

if importlib.util.find_spec("nats") is None:  # fail at import, with the hint, not at connect
    raise ImportError(INSTALL_HINT)

from agent_os.bus_adapters.nats._broker import NatsBroker
from agent_os.bus_adapters.nats._publish import AckWindow
from agent_os.bus_adapters.nats._subscriptions import JetStreamDelivery

__all__ = ["DEFAULT_URL", "INSTALL_HINT", "AckWindow", "JetStreamDelivery", "NatsBroker", "NatsConfig"]
