"""Agent-loop benchmark: what AgentLoop adds per tool call, beside the model server's latency.

    .venv/bin/python -m benchmarks.agent_loop [--quick]

Each round runs, in turn: an AgentLoop of two turns against the scripted OpenAI-compatible
server (the first reply asks for K tool calls of a no-op action, the second answers), through
litellm and ``kernel.submit`` (permissive policy, in-memory recorder), timing the run and,
inside it, its model calls; the same two model calls made directly with ``litellm.acompletion``
on the very messages the loop sent (the baseline: the model server's own latency as litellm
sees it); and K ``kernel.submit`` calls alone. The loop's overhead per tool call is (run - its
model calls) / K, of which ``submit`` is its share and the rest is the loop's own (argument
parsing, mapping, message building, logs). Writes the section
"agent_loop" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from typing import Any

from agent_os import ActionRequest, AgentLoop, ToolDef
from agent_os.cmvk._client import ensure_client
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, tool_call
from agent_os.control_plane import KernelSpace
from benchmarks._report import write_section

TOOL = ToolDef(
    "noop",
    "Does nothing",
    {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
    "bench.noop",
    "x",
)


class Noop:
    def resource(self, request: ActionRequest) -> str:
        return request.target

    async def run(self, request: ActionRequest) -> Any:
        return "ok"


async def one_round(kernel: KernelSpace, server: ScriptedLLMServer, k: int, stream: bool) -> dict[str, float]:
    calls = [tool_call("noop", {"x": f"item-{i}"}) for i in range(k)]
    server.script("bench", [Reply(tool_calls=calls), Reply(content="done")])
    loop = AgentLoop(kernel.submit, [TOOL], "openai/bench", api_base=server.url, api_key="k", stream=stream)
    in_model = 0.0
    complete = loop._complete

    async def timed(messages: list[dict[str, Any]], turn: int) -> Any:
        nonlocal in_model
        t = time.perf_counter()
        try:
            return await complete(messages, turn)
        finally:
            in_model += time.perf_counter() - t

    loop._complete = timed  # type: ignore[method-assign]  # instrumentation: time in model calls
    agent = kernel.register(loop.run, name=f"bench-{stream}")
    t = time.perf_counter()
    result = await kernel.execute(agent, "go")
    loop_s = time.perf_counter() - t - in_model
    assert result.text == "done"
    assert len(result.tool_calls) == k
    assert all(c.ok for c in result.tool_calls), [c.error for c in result.tool_calls if not c.ok][:2]

    litellm = await ensure_client()
    msgs = list(result.messages)
    server.script("bench", [Reply(tool_calls=calls), Reply(content="done")])
    options: dict[str, Any] = {"api_base": server.url, "api_key": "k", "tools": [TOOL.to_openai()]}
    t = time.perf_counter()
    for history in (msgs[:1], msgs[:-1]):
        if stream:
            response = await litellm.acompletion(
                model="openai/bench",
                messages=history,
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )
            chunks = [c async for c in response]
            litellm.stream_chunk_builder(chunks, messages=history)
        else:
            await litellm.acompletion(model="openai/bench", messages=history, **options)
    model_s = time.perf_counter() - t

    t = time.perf_counter()
    for i in range(k):
        await kernel.submit(ActionRequest("bench.noop", f"item-{i}", agent_id=kernel.external("bench").id))
    submit_s = time.perf_counter() - t
    return {"loop": loop_s, "model": model_s, "submit": submit_s}


async def measure(rounds: int, k: int, stream: bool) -> list[dict[str, float]]:
    async with KernelSpace("permissive") as kernel, ScriptedLLMServer() as server:
        kernel.actions.register("bench.noop", Noop(), "read")
        await one_round(kernel, server, k, stream)  # warm-up: imports, first connections
        return [await one_round(kernel, server, k, stream) for _ in range(rounds)]


def row(label: str, runs: list[dict[str, float]], k: int) -> str:
    per_call = [r["loop"] / k * 1e6 for r in runs]
    submit = [r["submit"] / k * 1e6 for r in runs]
    own = [p - s for p, s in zip(per_call, submit, strict=True)]
    model_turn = [r["model"] / 2 * 1e3 for r in runs]
    ratio = [r["loop"] / k / (r["model"] / 2) for r in runs]
    return (
        f"| {label} | {statistics.median(model_turn):.2f} | {statistics.median(per_call):.0f} "
        f"({min(per_call):.0f}-{max(per_call):.0f}) | {statistics.median(submit):.0f} "
        f"| {statistics.median(own):.0f} | {statistics.median(ratio) * 100:.1f}% "
        f"({min(ratio) * 100:.1f}-{max(ratio) * 100:.1f}%) |"
    )


async def main(quick: bool) -> None:
    logging.getLogger("agent_os.control_plane.actions.loop").setLevel(logging.WARNING)
    rounds, k = (3, 10) if quick else (15, 30)  # at most MAX_TOOL_CALLS (32) per reply
    plain = await measure(rounds, k, stream=False)
    streamed = await measure(rounds, k, stream=True)
    body = f"""
### AgentLoop overhead per tool call (scripted model server on 127.0.0.1, {rounds} rounds; median)

Each round: a loop of two model calls, the first asking for {k} tool calls of a no-op action
through `kernel.submit` (permissive policy, in-memory recorder), the second answering, timed
with the time inside its model calls taken out; then the same two model calls made directly
through `litellm.acompletion` with the messages the loop sent (the baseline: the model call's
latency); then {k} `kernel.submit` calls alone. Overhead per tool call = (run - its model calls)
/ {k}: `submit` (decision + 2 records) and the loop's own share (parsing, mapping, message
building, logs). The ratio is each round's overhead per tool call over its model call's latency.

| reply | model call ms | overhead per tool call µs (range) | of which submit µs | loop's own µs | per tool call / model call (range) |
|---|---|---|---|---|---|
{row("plain JSON", plain, k)}
{row("streamed (SSE)", streamed, k)}

The loop's own share also carries the run's fixed costs (`execute` and its records) spread over
the {k} calls, and litellm's work after each reply that runs on the same event loop (its logging
callbacks; more for a streamed reply). The model call here is a local scripted server: a real
provider's call takes 0.3-10 s, so the loop's share of an agent's time is smaller by that factor
again.
"""
    write_section("agent_loop", "python -m benchmarks.agent_loop" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
