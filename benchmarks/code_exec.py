"""Code execution benchmarks: how fast a run starts on each backend, cold and pooled, and what a
governed tool call from inside the code costs, each beside a baseline measured in the same round.

    .venv/bin/python -m benchmarks.code_exec [--quick]

Starts (the code is ``1 + 1``):

- Monty cold: our backend made, started, one run, closed; baseline: the same with pydantic-monty
  alone (``Monty()`` entered, a checkout, ``feed_run``, closed).
- Monty pooled: one run on a warm backend; baseline: a checkout and ``feed_run`` on a warm
  pydantic-monty pool.
- CPython cold: one run in a new bubblewrap sandbox (no pool: start, runner ready, job, result,
  kill, workspace read, close); baseline: an unsandboxed ``python -I -c "import msgpack"``.
- CPython pooled: one run on a sandbox of the warm pool (the refill is not timed); baseline: the
  same unsandboxed interpreter start.

Tool calls: a run calling a no-op governed tool 200 times, timed by the code itself, per call,
against ``kernel.submit`` of the same request in the process. Medians over rounds of each
round's figures and ratios, with the range. Writes the section "code_exec" of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent_os import ActionRequest
from agent_os.control_plane import KernelSpace, ToolDef
from agent_os.control_plane.actions.code import CodeLimits
from agent_os.control_plane.actions.code.cpython import CPythonBackend
from agent_os.control_plane.actions.code.job import Job
from agent_os.control_plane.actions.code.monty import MontyBackend
from benchmarks._report import write_section

TARGETS_MS = {"monty": 1.0, "cpython pooled": 10.0, "cpython cold": 150.0}
CALLS = 200
LIMITS = CodeLimits()
JOB = Job("1 + 1", {}, {}, LIMITS)


class Constant:
    """A provider that does nothing: returns a constant."""

    def resource(self, request: ActionRequest) -> str:
        return request.target

    async def run(self, request: ActionRequest) -> Any:
        return 42


TOOL = ToolDef(
    "const", "A constant.", {"type": "object", "properties": {}}, "bench.const", "", fixed_target="x"
)


async def no_tools(name: str, args: Any, kwargs: Any) -> Any:
    raise AssertionError("no tool calls here")


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> float:
    """Median seconds of ``n`` awaits of ``call()``."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def monty_cold() -> None:
    backend = MontyBackend(pool_size=1)
    try:
        outcome = await backend.run(JOB, no_tools)
        assert outcome.value == 2, outcome.error
    finally:
        await backend.close()


def raw_monty_cold() -> None:
    from pydantic_monty import Monty

    with Monty(min_processes=1) as pool, pool.checkout() as session:
        assert session.feed_run("1 + 1") == 2


async def python_start() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-c", "import msgpack")
    assert await proc.wait() == 0


async def round_starts(n: int) -> dict[str, tuple[float, float]]:
    """Per case: (ours, baseline) median seconds."""
    from pydantic_monty import Monty

    out: dict[str, tuple[float, float]] = {}
    loop = asyncio.get_running_loop()
    out["monty cold"] = (
        await timed(monty_cold, n),
        await timed(lambda: loop.run_in_executor(None, raw_monty_cold), n),
    )
    warm = MontyBackend(pool_size=2)
    raw = Monty(min_processes=2)
    raw.__enter__()

    def raw_run() -> None:
        with raw.checkout() as session:
            assert session.feed_run("1 + 1") == 2

    try:
        await warm.start()
        await warm.run(JOB, no_tools)
        out["monty"] = (
            await timed(lambda: warm.run(JOB, no_tools), n * 20),
            await timed(lambda: loop.run_in_executor(None, raw_run), n * 20),
        )
    finally:
        await warm.close()
        raw.__exit__(None, None, None)
    cold = CPythonBackend(LIMITS, pool_size=0)
    try:
        out["cpython cold"] = (await timed(lambda: cold.run(JOB, no_tools), n), await timed(python_start, n))
    finally:
        await cold.close()
    pooled = CPythonBackend(LIMITS, pool_size=2)
    try:
        samples = []
        for _ in range(n):
            await pooled.start()  # the refill, not timed
            start = time.perf_counter()
            outcome = await pooled.run(JOB, no_tools)
            samples.append(time.perf_counter() - start)
            assert outcome.value == 2, outcome.error
        out["cpython pooled"] = (statistics.median(samples), await timed(python_start, n))
    finally:
        await pooled.close()
    return out


async def round_tools(kernel: KernelSpace) -> dict[str, tuple[float, float]]:
    """Per backend: (governed call from the code, in-process submit) seconds per call."""
    out: dict[str, tuple[float, float]] = {}
    request = ActionRequest("bench.const", "x")
    many = f"import time\nstart = time.perf_counter()\nfor _ in range({CALLS}):\n    const()\ntime.perf_counter() - start"

    @kernel.register(name="bench", permissions=["read", "execute"])
    async def agent() -> None:
        for backend in ("monty", "cpython"):
            done = await kernel.run_code(many, tools=[TOOL], backend=backend)  # type: ignore[arg-type]
            assert done.ok, done.error
            assert len(done.tool_calls) == CALLS
            inside = done.value / CALLS
            start = time.perf_counter()
            for _ in range(CALLS):
                await kernel.submit(request)
            out[backend] = (inside, (time.perf_counter() - start) / CALLS)

    await kernel.execute(agent)
    return out


def summary(pairs: list[tuple[float, float]]) -> dict[str, float]:
    ratios = [a / b for a, b in pairs]
    return {
        "ours": statistics.median(a for a, _ in pairs) * 1e3,
        "ours_lo": min(a for a, _ in pairs) * 1e3,
        "ours_hi": max(a for a, _ in pairs) * 1e3,
        "base": statistics.median(b for _, b in pairs) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_lo": min(ratios),
        "ratio_hi": max(ratios),
    }


async def main(quick: bool) -> None:
    rounds, n = (3, 5) if quick else (9, 10)
    load_before = os.getloadavg()[0]
    starts: dict[str, list[tuple[float, float]]] = {}
    tools: dict[str, list[tuple[float, float]]] = {}
    async with KernelSpace("permissive", code_limits=LIMITS) as kernel:
        kernel.actions.register("bench.const", Constant(), "read")
        for _ in range(rounds):
            for name, pair in (await round_starts(n)).items():
                starts.setdefault(name, []).append(pair)
            for name, pair in (await round_tools(kernel)).items():
                tools.setdefault(name, []).append(pair)
    load_after = os.getloadavg()[0]
    baselines = {
        "monty cold": "pydantic-monty alone, cold",
        "monty": "pydantic-monty alone, warm pool",
        "cpython cold": "unsandboxed `python -I` start",
        "cpython pooled": "unsandboxed `python -I` start",
    }
    rows = []
    met = []
    for name in ("monty cold", "monty", "cpython cold", "cpython pooled"):
        f = summary(starts[name])
        target = TARGETS_MS.get(name)
        mark = (
            "" if target is None else (f"≤ {target:g} ms: " + ("met" if f["ours"] <= target else "not met"))
        )
        if target is not None:
            met.append(f"{name} {f['ours']:.2f} ms ({mark.split(': ')[1]})")
        rows.append(
            f"| {name} | {f['ours']:.2f} ({f['ours_lo']:.2f}–{f['ours_hi']:.2f}) | {baselines[name]}: {f['base']:.2f} "
            f"| {f['ratio']:.2f}× ({f['ratio_lo']:.2f}–{f['ratio_hi']:.2f}) | {mark} |"
        )
    tool_rows = []
    for name in ("monty", "cpython"):
        f = summary(tools[name])
        tool_rows.append(
            f"| {name} | {f['ours'] * 1e3:.0f} ({f['ours_lo'] * 1e3:.0f}–{f['ours_hi'] * 1e3:.0f}) | {f['base'] * 1e3:.0f} "
            f"| {f['ratio']:.1f}× ({f['ratio_lo']:.1f}–{f['ratio_hi']:.1f}) |"
        )
    body = f"""
Starts of a run of `1 + 1`, {rounds} rounds, each the median of {n} starts ({n * 20} for pooled
Monty), beside a baseline measured in the same round; medians over rounds of each round's
figure and ratio, with the range. Load average {load_before:.1f} before, {load_after:.1f} after
(2 shared cores).

| start | ms (range) | baseline ms | ours / baseline (range) | target |
|---|---|---|---|---|
{chr(10).join(rows)}

A governed tool call from inside the code (a no-op provider: identity, policy, the two records,
plus the crossing: Monty's suspension and resume, or the channel to the sandbox and back),
against `kernel.submit` of the same request in the process; per call, {CALLS} calls a run:

| backend | µs per call from the code (range) | in-process submit µs | ratio (range) |
|---|---|---|---|
{chr(10).join(tool_rows)}

Targets: {"; ".join(met)}.
"""
    print(body)
    write_section("code_exec", "python -m benchmarks.code_exec" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    asyncio.run(main(args.quick))
