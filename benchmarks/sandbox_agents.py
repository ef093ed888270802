"""Sandboxed agents: what running an agent in its own bubblewrap sandbox costs, against baselines
measured in the same rounds.

    python -m benchmarks.sandbox_agents [--quick]      (as root: sandboxes need it)

1. Cold start: ``kernel.spawn(agent, sandbox=SandboxSpec())`` until the runtime's first channel
   call (``start``) is answered, against starting a plain ``python -c pass`` subprocess and
   waiting for its exit (the interpreter's own start), and against a bare sandbox running
   ``python -c pass`` (``sandbox.start`` to exit: bubblewrap, setpriv and prlimit, no runtime).
2. A governed action (``fs.read`` of a 64-byte file through ``kernel.submit``, memory recorder)
   from inside the sandbox, timed there around ``agent.submit`` (one channel round trip and
   the kernel's work), against ``kernel.submit`` from an agent in the kernel's own process.

Each figure is the median over rounds of that round's ratio, with the range over rounds.
Writes the section "sandbox_agents" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agent_os import ActionRequest
from agent_os.control_plane import FlightRecorder, KernelSpace, Policy
from agent_os.control_plane.sandbox import SandboxSpec, start
from benchmarks._report import spread, write_section
from tests.support import sandboxed_agents as agents


async def python_start() -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await process.wait()
    return time.perf_counter() - started


async def bare_sandbox() -> float:
    started = time.perf_counter()
    sandbox = await start([sys.executable, "-c", "pass"], SandboxSpec())
    try:
        await sandbox.wait()
        return time.perf_counter() - started
    finally:
        await sandbox.close()


async def sandboxed_start(kernel: KernelSpace) -> float:
    started = time.perf_counter()
    agent_id = await kernel.spawn(agents.echo, sandbox=SandboxSpec())
    await kernel.sandboxes.runs[agent_id].started.wait()
    elapsed = time.perf_counter() - started
    await kernel.wait_all([agent_id])
    return elapsed


async def in_process(kernel: KernelSpace, n: int) -> list[float]:
    request = ActionRequest("fs.read", "data.txt")

    @kernel.register(name="local")
    async def local() -> list[float]:
        times = []
        for _ in range(n):
            began = time.perf_counter()
            result = await kernel.submit(request)
            times.append(time.perf_counter() - began)
            if not result.ok:
                raise RuntimeError(result.error)
        return times

    result: list[float] = await kernel.execute(local)
    return result


async def main(quick: bool) -> None:
    rounds, starts, actions = (3, 3, 200) if quick else (7, 5, 500)
    load_before = os.getloadavg()[0]
    cold: dict[str, list[float]] = {"python": [], "bare": [], "agent": []}
    cold_ratio: list[float] = []
    bare_ratio: list[float] = []
    act: dict[str, list[float]] = {"local": [], "sandbox": []}
    act_ratio: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp)
        (workspace / "data.txt").write_bytes(b"x" * 64)
        policy = Policy("bench-sandbox", default_action="allow")
        async with KernelSpace(
            policy, flight_recorder=FlightRecorder("memory"), workspace=workspace
        ) as kernel:
            await sandboxed_start(kernel)  # warm the page cache once
            for _ in range(rounds):
                python = statistics.median([await python_start() for _ in range(starts)])
                bare = statistics.median([await bare_sandbox() for _ in range(starts)])
                agent = statistics.median([await sandboxed_start(kernel) for _ in range(starts)])
                cold["python"].append(python)
                cold["bare"].append(bare)
                cold["agent"].append(agent)
                cold_ratio.append(agent / python)
                bare_ratio.append(agent / bare)
                local = statistics.median(await in_process(kernel, actions))
                agent_id = await kernel.spawn(agents.submit_many, actions, sandbox=SandboxSpec())
                [inside] = await kernel.wait_all([agent_id])
                sandboxed = statistics.median(inside)
                act["local"].append(local)
                act["sandbox"].append(sandboxed)
                act_ratio.append(sandboxed / local)
    load_after = os.getloadavg()[0]
    ms = {k: statistics.median(v) * 1e3 for k, v in cold.items()}
    us = {k: statistics.median(v) * 1e6 for k, v in act.items()}
    body = f"""
{rounds} rounds; per round the median of {starts} starts of each kind and of {actions} sequential
actions of each kind. Ratios: the median over rounds of each round's own ratio, with the range.
Load average {load_before:.1f} before, {load_after:.1f} after (2 cores shared).

| measure | ours | baseline (same rounds) | ratio: median (range) |
|---|---|---|---|
| cold start of a sandboxed agent, to its first channel call answered | {ms["agent"]:.0f} ms | {ms["python"]:.0f} ms (`python -c pass` subprocess, start to exit) | {spread(cold_ratio)} |
| (same, against a bare sandbox) | | {ms["bare"]:.0f} ms (`sandbox.start` of `python -c pass`, to exit) | {spread(bare_ratio)} |
| governed action (`fs.read`, 64 bytes) from inside the sandbox | {us["sandbox"]:.0f} µs | {us["local"]:.0f} µs (`kernel.submit` in the kernel's process) | {spread(act_ratio)} |

The cold start is bubblewrap's namespaces and mounts, `prlimit` and `setpriv`, the interpreter,
and the runtime's imports (the channel, msgpack, the agent's script); the action from inside
adds one channel round trip (two msgpack frames over a Unix socket, a task in the kernel's
process) to the same `kernel.submit`.
"""
    write_section("sandbox_agents", "python -m benchmarks.sandbox_agents", body)
    print(body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    asyncio.run(main(parser.parse_args().quick))
