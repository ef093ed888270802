"""Peer benchmark: our AMB client beside FastStream and the raw clients on NATS and Redis.

    .venv/bin/python -m benchmarks.peers [--quick] [--rounds N] [--only nats,redis] [--no-write]

In one run, for each broker, three implementations do the same work with the same messages
(``benchmarks/_peers_worker.py`` says what exactly): ours (``AMB``), FastStream (pinned below)
and the raw client (nats-py, redis-py):

1. publish -> handler throughput (publisher and subscriber in one process, two connections);
2. request/reply latency p50 (one request at a time);
3. a queue group of two consumer processes against one (each message costs the consumer the
   same CPU work), where the peer has one: NATS queue groups; on Redis, stream consumer
   groups (ours: a queue group, FastStream: ``StreamSub(group=...)``, raw: ``XREADGROUP``).

Every measurement runs in a fresh process, and the rounds interleave the implementations (the
order rotates each round), so load from other processes hits them alike. Figures are medians of
per-round ratios with their range. FastStream is not a project dependency: it is installed in a
venv of its own, ``.venv-peers/`` at the repository root, created on first use with uv (or
pip) from the package index. Needs nats-server on 127.0.0.1:4222 and redis-server on
127.0.0.1:6379. The section "peers" of benchmarks/RESULTS.md is rewritten with the results.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._report import per_round, spread, write_section

FASTSTREAM = "faststream[nats,redis]==0.7.8"
PEER_PACKAGES = (FASTSTREAM, "msgpack")
ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
WORKER = Path(__file__).resolve().with_name("_peers_worker.py")
IMPLS = ("ours", "faststream", "raw")
RAW_NAMES = {"nats": "nats-py", "redis": "redis-py"}
WAIT = 120.0  # the longest one measurement may take
DEFAULT_ROUNDS = 5


@dataclass(frozen=True)
class Sizes:
    tp: int  # messages per throughput run
    rr: int  # request/reply samples per run
    warm: int  # warm-up messages and requests
    group: int  # messages per queue-group run
    work: int  # BLAKE2b rounds per queue-group message (~0.35 µs each)


def sizes_for(broker: str, quick: bool) -> Sizes:
    if broker == "nats":
        return Sizes(3_000, 300, 100, 3_000, 200) if quick else Sizes(20_000, 1_000, 300, 10_000, 200)
    return Sizes(1_000, 200, 100, 1_000, 200) if quick else Sizes(4_000, 500, 200, 4_000, 200)


@dataclass
class Figures:
    """Per-round figures of one implementation on one broker."""

    tp: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    one: list[float] = field(default_factory=list)  # queue group, one consumer: msg/s
    two: list[float] = field(default_factory=list)  # queue group, two consumers: msg/s


# -- pure helpers (unit-tested) -------------------------------------------------------------------


def rotated(items: Sequence[str], round_no: int) -> list[str]:
    """``items`` rotated by the round number, so that no implementation always runs first."""
    k = round_no % len(items)
    return [*items[k:], *items[:k]]


# -- the peers venv -------------------------------------------------------------------------------


def peers_python() -> Path:
    """The peers venv's interpreter, creating the venv (FastStream pinned) when it is missing."""
    python = PEERS_VENV / "bin" / "python"
    marker = PEERS_VENV / "installed.txt"
    wanted = "\n".join(PEER_PACKAGES)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"creating {PEERS_VENV} with {', '.join(PEER_PACKAGES)}", file=sys.stderr)
    uv = shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "--python", sys.executable, str(PEERS_VENV)], check=True)
        subprocess.run([uv, "pip", "install", "--python", str(python), *PEER_PACKAGES], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEERS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    marker.write_text(wanted)
    return python


# -- running the workers ---------------------------------------------------------------------------


class Runner:
    def __init__(self, faststream_python: Path) -> None:
        self.faststream_python = faststream_python

    def command(self, impl: str, broker: str, mode: str, *options: str) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if impl == "faststream":
            env.pop("PYTHONPATH", None)  # the repository must not shadow the peers venv's packages
            python = str(self.faststream_python)
        else:
            python = sys.executable
        return [python, str(WORKER), impl, broker, mode, *options], env

    def single(self, impl: str, broker: str, sizes: Sizes) -> dict[str, float]:
        cmd, env = self.command(
            impl, broker, "single", "--subject", subject(), "--n", str(sizes.tp), "--rr", str(sizes.rr),
            "--warm", str(sizes.warm),
        )  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{impl} on {broker} failed:\n{done.stderr[-2000:]}")
        result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def group(self, impl: str, broker: str, sizes: Sizes, consumers: int) -> float:
        """Messages/s through a queue group of ``consumers`` processes (from the producer's start
        until the consumers have counted every message)."""
        name, group = subject(), f"g{uuid.uuid4().hex[:8]}"
        procs: list[subprocess.Popen[str]] = []
        counters_file = tempfile.NamedTemporaryFile(prefix="peers-", suffix=".counters")  # noqa: SIM115
        counters_file.write(bytes(8 * consumers))
        counters_file.flush()
        counters = mmap.mmap(counters_file.fileno(), 0)
        try:
            for slot in range(consumers):
                cmd, env = self.command(
                    impl, broker, "consume", "--subject", name, "--group", group, "--work", str(sizes.work),
                    "--counters", counters_file.name, "--slot", str(slot),
                )  # fmt: skip
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a {impl} consumer on {broker} did not start")
            cmd, env = self.command(impl, broker, "produce", "--subject", name, "--n", str(sizes.group))
            producer = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
            procs.append(producer)
            assert producer.stdout is not None
            start = float(json.loads(producer.stdout.readline())["start"])
            deadline = time.monotonic() + WAIT
            while sum(memoryview(counters).cast("Q")) < sizes.group:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{impl} on {broker}: the queue group did not finish in {WAIT} s")
                time.sleep(0.002)
            end = time.time()
            producer.wait(WAIT)
            return sizes.group / (end - start)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            counters.close()
            counters_file.close()
            if broker == "redis":
                forget_stream(name)


_RUN = uuid.uuid4().hex[:8]
_subjects = 0


def subject() -> str:
    global _subjects
    _subjects += 1
    return f"peers{_RUN}.s{_subjects}"


def forget_stream(name: str) -> None:
    """Delete the stream a raw or FastStream queue-group run left in Redis (ours expire)."""
    import redis

    with redis.Redis.from_url("redis://127.0.0.1:6379/0") as conn:
        conn.delete(name)


# -- the run -----------------------------------------------------------------------------------------


def run(brokers: Sequence[str], quick: bool, rounds: int) -> dict[str, dict[str, Figures]]:
    runner = Runner(peers_python())
    figures = {b: {impl: Figures() for impl in IMPLS} for b in brokers}
    for r in range(rounds):
        for broker in brokers:
            sizes = sizes_for(broker, quick)
            for impl in rotated(IMPLS, r):
                result = runner.single(impl, broker, sizes)
                f = figures[broker][impl]
                f.tp.append(result["tp"])
                f.p50.append(result["p50"])
            for impl in rotated(IMPLS, r):
                f = figures[broker][impl]
                f.one.append(runner.group(impl, broker, sizes, 1))
                f.two.append(runner.group(impl, broker, sizes, 2))
            line = ", ".join(
                f"{impl} {figures[broker][impl].tp[-1]:,.0f} msg/s p50 {figures[broker][impl].p50[-1]:,.0f} µs "
                f"x{figures[broker][impl].two[-1] / figures[broker][impl].one[-1]:.2f}"
                for impl in IMPLS
            )
            print(f"round {r + 1} {broker}: {line}", file=sys.stderr)
    return figures


def render(
    figures: dict[str, dict[str, Figures]], quick: bool, rounds: int, load: tuple[float, float]
) -> str:
    med = statistics.median
    rows = []
    for broker, by_impl in figures.items():
        ours, fs, raw = by_impl["ours"], by_impl["faststream"], by_impl["raw"]
        sizes = sizes_for(broker, quick)
        raw_name = RAW_NAMES[broker]
        rows.append(
            f"| {broker} | publish -> handler ({sizes.tp:,} msgs), msg/s | {med(ours.tp):,.0f} | {med(fs.tp):,.0f} "
            f"| {med(raw.tp):,.0f} | {spread(per_round(ours.tp, fs.tp))} | {spread(per_round(ours.tp, raw.tp))} "
            f"| {spread(per_round(fs.tp, raw.tp))} |"
        )
        rows.append(
            f"| {broker} | request/reply p50 ({sizes.rr:,} requests), µs | {med(ours.p50):,.0f} | {med(fs.p50):,.0f} "
            f"| {med(raw.p50):,.0f} | {spread(per_round(fs.p50, ours.p50))} | {spread(per_round(raw.p50, ours.p50))} "
            f"| {spread(per_round(raw.p50, fs.p50))} |"
        )
        group = "queue group" if broker == "nats" else "stream consumer group"
        rows.append(
            f"| {broker} | {group}, 1 consumer ({sizes.group:,} msgs), msg/s | {med(ours.one):,.0f} "
            f"| {med(fs.one):,.0f} | {med(raw.one):,.0f} | {spread(per_round(ours.one, fs.one))} "
            f"| {spread(per_round(ours.one, raw.one))} | {spread(per_round(fs.one, raw.one))} |"
        )
        rows.append(
            f"| {broker} | {group}: 2 consumers / 1 (scaling) | {spread(per_round(ours.two, ours.one))} "
            f"| {spread(per_round(fs.two, fs.one))} | {spread(per_round(raw.two, raw.one))} | | | |"
        )
        rows.append(f"| | (raw = {raw_name}) | | | | | | |")
    table = "\n".join(rows)
    nats_work = sizes_for("nats", quick).work
    return f"""
Ours (`AMB`), FastStream ({FASTSTREAM.split("[")[0]} {FASTSTREAM.split("==")[1]}, in `.venv-peers/`) and the raw
clients (nats-py, redis-py) on the local NATS and Redis servers, each measurement in a fresh
process, {rounds} rounds with the implementations in rotating order. Every message is the dict
`{{"id": n, "text": <200 characters>}}`, encoded as each does by default (ours: msgpack
envelope; FastStream: JSON, validated into the handler's `dict` argument; raw: msgpack of the
dict). Throughput: publisher and subscriber in one process, the handler reads `id`.
Request/reply: one request at a time, the responder echoes the payload (raw Redis: PUBLISH with a
per-request reply channel). Queue groups: consumer processes each doing {nats_work} rounds of
BLAKE2b per message (~70 µs), timed from the producer's start until every message was handled;
on Redis a stream consumer group (ours: `queue=`; FastStream: `StreamSub(group=)`; raw:
XADD + XREADGROUP + XACK). Ratio columns: the median of per-round ratios (range); for latency,
the other's p50 / ours (above 1: ours is faster). Load average {load[0]:.1f} before the run,
{load[1]:.1f} after (2 cores, shared with other work; consumers, producer and servers share them).
Two consumers can go at most as much faster as there is a free core for the second: with the
load average near or above the core count the scaling row measures the machine, not the client.

| broker | measure | ours | FastStream | raw | ours / FastStream | ours / raw | FastStream / raw |
|---|---|---|---|---|---|---|---|
{table}
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds (default 5)")
    parser.add_argument("--only", default="nats,redis", help="comma-separated brokers: nats, redis")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    brokers = [b for b in args.only.split(",") if b]
    unknown = set(brokers) - set(RAW_NAMES)
    if unknown:
        parser.error(f"unknown broker(s): {', '.join(sorted(unknown))}")
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    figures = run(brokers, args.quick, max(args.rounds, 1))
    body = render(figures, args.quick, max(args.rounds, 1), (load_before, os.getloadavg()[0]))
    print(body)
    print(f"total {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if not args.no_write:
        command = "python -m benchmarks.peers"
        if args.quick:
            command += " --quick"
        if args.rounds != DEFAULT_ROUNDS:
            command += f" --rounds {args.rounds}"
        if args.only != "nats,redis":
            command += f" --only {args.only}"
        write_section("peers", command, body)


if __name__ == "__main__":
    main()
