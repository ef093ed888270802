"""Instructions per message on the hot paths, counted by valgrind: for comparing two versions of
the code where wall-clock runs are too noisy to tell a few per cent apart.

    .venv/bin/python -m benchmarks.instructions [--n 10000] [--write] [CASE ...]

Each case runs twice under ``valgrind --tool=cachegrind --cache-sim=no``, with ``n`` and ``2n``
items; the difference divided by ``n`` is the instructions per item, start-up and warm-up
cancelling out. With the default ``n`` the counts repeat within about 1 % on one machine
(memory-request: 152.8k to 154.7k in six runs; PYTHONHASHSEED is fixed, garbage collection and
the clock still vary a little), and moved by up to 1.5 % between machines, so a change is
counted beside its parent. They leave out
the kernel (system calls), follow valgrind's emulated CPU (hashing may take another code path
than on the real one), and count code that depends on the clock as it runs at valgrind's speed
(an id's per-millisecond prefix is rebuilt far more often). So compare versions of one path
with them, not paths with each other. ``--write`` also rewrites the section "instructions" of
``benchmarks/RESULTS.md`` with the counts: a record that a host's speed does not move, beside
the wall-clock sections. Needs valgrind (Debian's package); without it, exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks._report import write_section

CASES: dict[str, str] = {
    "memory-publish": "publish -> handler on the memory bus (a message)",
    "memory-queue": "its baseline: asyncio.Queue + msgpack of the envelope fields (a message)",
    "memory-request": "request/reply on the memory bus (a request)",
    "memory-queue-pair": "its baseline: two asyncio.Queues + msgpack (a request)",
    "governed-plain": "the control plane benchmark's plain bus, dict payload (a message)",
    "governed-policy": "policy out and in + two records, memory recorder (a message)",
    "session": "IATP session MAC + the bus (a message)",
}
PAIRS = (("memory-queue", "memory-publish"), ("memory-request", "memory-queue-pair"))
"""(numerator, denominator) of the ratios printed when both cases ran: the bus_memory
benchmark's, in instructions (baseline / ours for throughput, ours / baseline for latency)."""

DEFAULT_N = 10_000

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def refs_from(report: str) -> int:
    """The instruction count in cachegrind's report (its stderr). Raises ValueError."""
    found = _REFS.search(report)
    if found is None:
        raise ValueError("no 'I refs' line in valgrind's output")
    return int(found.group(1).replace(",", ""))


def per_item(small: int, large: int, n: int) -> float:
    """Instructions per item from runs of ``n`` and ``2n`` items."""
    return (large - small) / n


async def _case(name: str, n: int) -> None:
    """Run ``name`` for ``n`` items (the child process, under valgrind)."""
    from benchmarks import bus_memory

    runs: dict[str, Callable[[int], Awaitable[object]]] = {
        "memory-publish": bus_memory.bus_throughput,
        "memory-queue": bus_memory.queue_throughput,
        "memory-request": bus_memory.request_latency,
        "memory-queue-pair": bus_memory.queue_pair_latency,
    }
    if name in runs:
        await runs[name](n)
        return
    if name == "session":
        from benchmarks.iatp import Pair, session_pair

        a, b = await session_pair()
        pair = await Pair([a.middleware()], [b.middleware()], recipient="bob").start()
        await pair.run(200)  # warm-up: the same in both runs
        await pair.run(n)
        await pair.close()
        return
    from benchmarks.control_plane import Governed

    with tempfile.TemporaryDirectory() as tmp:
        governed = await Governed(name.removeprefix("governed-"), Path(tmp)).start()
        await governed.run(200)
        await governed.run(n)
        # Not Governed.close(): its check reads every record back, work that grows with n.
        if governed.kernel is not None:
            await governed.kernel.close()
        await governed.pub.close()
        await governed.sub.close()


def count(name: str, n: int) -> int:
    """Instructions of one child run of ``name`` with ``n`` items."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--run",
        name,
        "--n",
        str(n),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed under valgrind:\n{done.stderr[-2000:]}")
    return refs_from(done.stderr)


ABOUT = """What the counts are for (not rewritten by the script): comparing versions of one path
counted on one machine. Wall-clock ratios of the same code moved
by up to 1.5x between the 2-vCPU virtual machines of two sessions: the memory bus's
request/reply took 17.1 µs against 10.7 for its baseline (1.59x) on the AMD EPYC of
2026-12-07 13:00, and 34.5 against 14.5 (2.37x) on the AMD EPYC of 14:51, where commit ec97b45
of the first run measured the same as the code after it. These counts repeat within about 1 %
on one machine, but moved by up to 1.5 % between the machines of two sessions (memory-publish
at d6df4dd: 33,179 on 2026-12-07 at 16:12, 33,652 on the machine of 17:33), so a change is
counted beside its parent in one session: at 9ec5663 against d6df4dd, memory-request
156,512 -> 152,904 (1.723 -> 1.682 of the queue pair), governed-policy 180,834 -> 180,185;
at c2a8943 against 9b9a2d2 (one call for a route miss, reply() reading the wire fields),
memory-request 153,139, 154,332 and 154,554 -> 150,867, 152,660 and 152,508; at 14633ea
against 3a1df12 (an id's first 30 characters as one number's hex instead of three format
specs), memory-request 151,149 -> 145,983, most of it valgrind's own pace: under emulation
nearly every id starts a new millisecond and rebuilds them, as a real run does only below
about a thousand messages a second.
They are not times: valgrind runs every path on an emulated CPU without the SHA extensions, so
the SHA-256 of the recorder's hash chain counts some 12,000 instructions a record (13 % of the
governed-policy case), where the AMD EPYC that has them hashes a record in about 0.3 µs."""


def render(found: dict[str, float], n: int) -> str:
    """The RESULTS.md section of the counts in ``found`` (instructions per item by case)."""
    rows = "\n".join(f"| {name} | {found[name]:,.0f} | {CASES[name]} |" for name in found)
    ratios = "".join(
        f"\n- {top} / {bottom}: {found[top] / found[bottom]:.3f}"
        for top, bottom in PAIRS
        if top in found and bottom in found
    )
    pairs = f"\n\nRatios, as bus_memory's targets take them:{ratios}" if ratios else ""
    return f"""
Instructions per item counted by valgrind (cachegrind), the difference of runs of {n:,} and
{2 * n:,} items divided by {n:,}, PYTHONHASHSEED fixed.

| case | instructions per item | what |
|---|---|---|
{rows}{pairs}

{ABOUT}
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cases", nargs="*", help=f"of: {', '.join(CASES)} (default: the four memory cases)")
    parser.add_argument(
        "--n", type=int, default=DEFAULT_N, help=f"items in the smaller run (default {DEFAULT_N})"
    )
    parser.add_argument("--write", action="store_true", help="rewrite the section of benchmarks/RESULTS.md")
    parser.add_argument("--run", choices=list(CASES), help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; the cases: {', '.join(CASES)}")
    if args.run:
        asyncio.run(_case(args.run, args.n))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    names = args.cases or ["memory-publish", "memory-queue", "memory-request", "memory-queue-pair"]
    found: dict[str, float] = {}
    for name in names:
        found[name] = per_item(count(name, args.n), count(name, 2 * args.n), args.n)
        print(f"{name:18} {found[name]:>10,.0f}  {CASES[name]}", flush=True)
    for top, bottom in PAIRS:
        if top in found and bottom in found:
            print(f"{top} / {bottom}: {found[top] / found[bottom]:.3f}")
    if args.write:
        command = "python -m benchmarks.instructions --write"
        if args.n != DEFAULT_N:
            command += f" --n {args.n}"
        write_section("instructions", " ".join([command, *args.cases]), render(found, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
