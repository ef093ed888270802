"""Where the governed path's time goes with the SQLite flight recorder: a py-spy profile of every
thread, summed by part, to compare commits.

    .venv/bin/python -m benchmarks.profile_recorder [--seconds 15] [--runs 3] [--tree DIR] [--write]

A child process runs the workload: one publisher and one subscriber on the memory bus, a policy
both ways, the SQLite recorder with its defaults (two records a message), in chunks of 2,000
messages. Once it has warmed up, ``py-spy record --gil --threads`` samples it for ``--seconds``
(only a thread holding the GIL is sampled: what the event loop's thread cannot run meanwhile).
The summary gives the share of those samples by part: the recorder's writer thread (compression
apart), its checkpoint thread, the recorder's work on the event loop (hash chain and JSON; flush
and backpressure), policy decisions, and the rest (bus, mediation, event loop); medians over
``--runs`` runs with their range, and the pace with and without py-spy (runs alternating).

``--tree DIR`` runs the workload on the ``agent_os`` of another checkout, e.g. a worktree of an
older commit (``git worktree add /tmp/wt-old COMMIT``): the workload uses only the public API
that has not changed since the recorder work began (``AMB``, ``KernelSpace``, ``Policy``,
``Pattern``, ``FlightRecorder``). Needs py-spy (the dev extra; exits 2 without it) and the right to
trace a child process. ``--write`` rewrites the section "profile_recorder" of
benchmarks/RESULTS.md, with the before and after of issue 18 (:data:`BEFORE`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

CHUNK = 2_000
"""Messages a chunk: published one after the other, then waited for until all are handled."""

PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("compression (zlib, on the writer thread)", re.compile(r"_deflate|zlib|compress")),
    ("SQLite checkpoints (their own thread)", re.compile(r"^[^;]*checkpoint")),
    ("SQLite writes (the recorder's writer thread)", re.compile(r"^[^;]*flight-recorder")),
    (
        "recorder append on the event loop (hash chain, JSON)",
        re.compile(r"FlightRecorder\.(append|_chain|log) "),
    ),
    (
        "recorder flush and backpressure on the event loop",
        re.compile(r"FlightRecorder\.(flush|_flush|_timed_flush|_start_flush|backpressure|batch_full) "),
    ),
    ("policy decisions", re.compile(r"Policy\.|Gate\.(cached_decision|decide) ")),
)
"""A sample's part: the first whose pattern its stack matches, else :data:`REST`. A stack is
py-spy's ``thread (TID): NAME;frame (file:line);...``, outermost frame first."""

REST = "bus, mediation and the event loop"

BEFORE = """Before and after (not rewritten by the script). When issue 18 was filed, py-spy on the
governed path with the SQLite recorder found the recorder's writer thread holding the GIL in 28 %
of the samples, and compression in 8 %. The same command with `--tree` on a worktree of b8e5abd,
the last commit before the recorder work (since then: one INSERT a write and group commit,
compression off by default, power-of-two writes, checkpoints on a thread of their own, records
the garbage collector does not track), run on the AMD EPYC on 2026-12-07 right after a run of
this command at 5e23079, gave:

| part, b8e5abd | share of the samples, % |
|---|---|
| bus, mediation and the event loop | 48.1 (47.6-50.5) |
| recorder append on the event loop (hash chain, JSON) | 20.7 (19.2-21.8) |
| SQLite writes (the recorder's writer thread) | 16.7 (16.1-17.9) |
| compression (zlib, on the writer thread) | 8.6 (7.6-8.7) |
| policy decisions | 3.3 (3.3-3.8) |
| recorder flush and backpressure on the event loop | 2.0 (1.7-2.5) |

The writer thread then took 25.3 % of the samples; at 5e23079 it took 8.9 % (8.6-9.5), with
nothing to compress. A message took 104.7 µs (101.0-107.7) without py-spy at b8e5abd and 65.3
(65.0-69.5) at 5e23079, alternating runs of 15 s. A second pair at 20:07, the table above and
then b8e5abd again, gave the same: the writer thread 8.5 % against 25.1 % (SQLite 16.3,
compression 8.8), 66.5 µs against 107.5 µs a message. py-spy found a thread holding the GIL in 72 %
of its samples at b8e5abd (5,396 of 7,500 in 15 s) and in 97 % at 5e23079 (7,288). What is left
of the recorder's cost is on the event loop: numbering, hashing and batching each record, the
canonical JSON of its head and data and a SHA-256 (docs/control-plane.md, the flight recorder)."""

_LINE = re.compile(r"^(?P<stack>.+) (?P<count>\d+)$")


def parts(lines: Iterable[str]) -> Counter[str]:
    """Samples by part (see :data:`PARTS`) in py-spy's raw (collapsed) output: each line a
    stack, a space and a count. Raises ValueError for a line that is neither that nor blank."""
    found: Counter[str] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        matched = _LINE.match(line)
        if matched is None:
            raise ValueError(f"not a line of py-spy's raw output: {line[:80]!r}")
        stack, count = matched["stack"], int(matched["count"])
        found[next((name for name, pattern in PARTS if pattern.search(stack)), REST)] += count
    return found


def render(runs: Sequence[Counter[str]], sampled: Sequence[float], unsampled: Sequence[float]) -> str:
    """The summary of the runs: each part's share of a run's samples, median and range over the
    runs, largest first; then the pace with and without py-spy."""
    from benchmarks._report import spread  # not at the top: the child may run an older tree

    names = {name for run in runs for name in run}
    shares = {name: [100 * run[name] / max(1, sum(run.values())) for run in runs] for name in names}
    lines = [
        f"Samples of a thread holding the GIL, {len(runs)} runs of "
        f"{statistics.median(sum(run.values()) for run in runs):,.0f} (median):",
        "",
        "| part | share of the samples, % |",
        "|---|---|",
    ]
    order = sorted(shares, key=lambda name: -statistics.median(shares[name]))
    lines += [f"| {name} | {spread(shares[name], '.1f')} |" for name in order]
    lines += [
        "",
        f"µs a message: {spread(sampled, '.1f')} while sampled (py-spy slows the process), "
        f"{spread(unsampled, '.1f')} in the same number of runs without it, alternating.",
    ]
    return "\n".join(lines)


async def workload(path: Path, seconds: float, ready: Callable[[], None]) -> float:
    """Run the governed path recording to a SQLite file at ``path``: warm up, call ``ready``,
    then run chunks for ``seconds``; µs a message over those chunks."""
    from agent_os.amb import AMB, Metadata
    from agent_os.control_plane import FlightRecorder, KernelSpace, Pattern, Policy

    policy = Policy("profile", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "profile.*"))
    policy.add_rule("allow", Pattern("deliver", "profile.*", conditions={"sender": "pub"}))
    kernel = KernelSpace(policy=policy, flight_recorder=FlightRecorder("sqlite", str(path)))
    where = f"memory://profile-recorder-{os.getpid()}"
    pub = AMB("memory", where, agent_id="pub")
    sub = AMB("memory", where, agent_id="sub")
    kernel.attach(pub)
    kernel.attach(sub)
    handled = 0
    target = 0
    done = asyncio.Event()

    async def handler(message: object, metadata: Metadata) -> None:
        nonlocal handled
        handled += 1
        if handled == target:
            done.set()

    async def chunk() -> None:
        nonlocal target
        done.clear()
        target = handled + CHUNK
        for i in range(CHUNK):
            await pub.publish("profile.tp", {"i": i}, recipient="sub")
        await asyncio.wait_for(done.wait(), 120)

    try:
        await sub.subscribe("profile.tp", handler)
        await pub.connect()
        for _ in range(3):
            await chunk()
        ready()
        start = time.perf_counter()
        end = start + seconds
        chunks = 0
        while not chunks or time.perf_counter() < end:  # one chunk at least
            await chunk()
            chunks += 1
        return (time.perf_counter() - start) / (chunks * CHUNK) * 1e6
    finally:
        await kernel.close()
        await pub.close()
        await sub.close()


def _child(seconds: float, directory: Path) -> int:
    import agent_os

    def ready() -> None:  # and where agent_os came from, which the parent checks
        print("ready", Path(agent_os.__file__).resolve().parent.parent, flush=True)

    us = asyncio.run(workload(directory / "records.db", seconds, ready))
    print(f"{us:.3f}", flush=True)
    return 0


def run_child(seconds: float, raw: Path | None, tree: Path | None = None) -> float:
    """Run the workload in a child process for ``seconds`` once it is warm, on the ``agent_os``
    of checkout ``tree`` (default: the one this Python imports); with ``raw``, let py-spy sample
    it meanwhile and write its raw output there. The child's µs a message. Raises RuntimeError
    when the child or py-spy fails, or the child imported ``agent_os`` from elsewhere."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    child_seconds = str(seconds + (1.0 if raw else 0.0))
    # The child's records go to a folder of the parent's, removed even when the child is killed.
    with (
        tempfile.TemporaryDirectory() as tmp,
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", child_seconds, "--dir", tmp],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        ) as child,
    ):  # leaving closes its pipe and waits for it
        assert child.stdout is not None
        try:
            word, _, source = child.stdout.readline().strip().partition(" ")
            if word != "ready":
                raise RuntimeError("the workload ended before it was ready")
            if tree is not None and Path(source) != tree.resolve():
                raise RuntimeError(f"the workload imported agent_os from {source}, not from {tree}")
            if raw is not None:
                spy = subprocess.run(
                    [
                        _py_spy() or "py-spy",
                        "record",
                        "--pid",
                        str(child.pid),
                        "--gil",
                        "--threads",
                        "--rate",
                        "500",
                        "--duration",
                        str(max(1, round(seconds))),
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if spy.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {spy.stderr.strip()[-1000:]}")
            last = child.stdout.read().strip()
            if child.wait(timeout=120) != 0:
                raise RuntimeError(f"the workload failed (status {child.returncode})")
            return float(last)
        finally:
            if child.poll() is None:
                child.kill()


def _py_spy() -> str | None:
    """The py-spy beside this Python (a venv's, not on PATH unless activated), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to sample (default 15)")
    parser.add_argument("--runs", type=int, default=3, help="profiled runs (default 3)")
    parser.add_argument(
        "--tree", type=Path, help="profile the agent_os of this checkout (a worktree of another commit)"
    )
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output of the last run in this file")
    parser.add_argument("--write", action="store_true", help="rewrite the section of benchmarks/RESULTS.md")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)  # the workload's side: seconds
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)  # and the folder for its records
    args = parser.parse_args()
    if args.child is not None:
        if args.dir is None:
            parser.error("--child needs --dir")
        return _child(args.child, args.dir)
    if not args.seconds > 0:
        parser.error("--seconds must be above 0")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.write and args.tree is not None:
        parser.error("--write records this checkout's figures: leave out --tree")
    if _py_spy() is None:
        print("py-spy is not installed (bash .ci/setup dev)", file=sys.stderr)
        return 2
    runs: list[Counter[str]] = []
    sampled: list[float] = []
    unsampled: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "profile.txt"
        for _ in range(args.runs):  # a profiled run, then the same without py-spy
            sampled.append(run_child(args.seconds, raw, args.tree))
            with raw.open() as lines:
                runs.append(parts(lines))
            unsampled.append(run_child(args.seconds, None, args.tree))
    print(render(runs, sampled, unsampled))
    if args.write:
        from benchmarks._report import write_section  # only here: the file also runs on old trees

        command = "python -m benchmarks.profile_recorder --write"
        if args.seconds != 15.0 or args.runs != 3:
            command += f" --seconds {args.seconds:g} --runs {args.runs}"
        write_section("profile_recorder", command, render(runs, sampled, unsampled) + "\n\n" + BEFORE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
