"""Opt-in: the agent loop against a real provider. Runs when OPENAI_API_KEY is set (model:
AGENT_OS_TEST_MODEL, default ``openai/gpt-4o-mini``); skipped, visibly, otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent_os import AgentLoop
from agent_os.control_plane import BUILTIN_TOOLS, KernelSpace

pytestmark = pytest.mark.skipif(
    not os.environ.get("OPENAI_API_KEY"), reason="set OPENAI_API_KEY to run the agent loop against OpenAI"
)


async def test_a_real_model_reads_a_file_through_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("The code word is PELICAN.")
    model = os.environ.get("AGENT_OS_TEST_MODEL", "openai/gpt-4o-mini")
    async with KernelSpace("permissive", workspace=tmp_path) as kernel:
        loop = AgentLoop(
            kernel.submit,
            [BUILTIN_TOOLS["fs.read"], BUILTIN_TOOLS["fs.list"]],
            model,
            system="You answer using the tools. Files are relative to the workspace.",
            max_turns=6,
        )
        agent = kernel.register(loop.run, name="reader", permissions=["read"])
        result = await kernel.execute(agent, "Read secret.txt and tell me the code word.")
        assert any(c.action == "fs.read" and c.ok for c in result.tool_calls)
        assert "PELICAN" in result.text.upper()
        outcomes = await kernel.recorder.query(event_type="action_outcome")
        assert outcomes
        assert (await kernel.recorder.verify()).ok
