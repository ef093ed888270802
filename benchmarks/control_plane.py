"""Control-plane benchmarks: policy decisions, the flight recorder, governed delivery.

    .venv/bin/python -m benchmarks.control_plane [--quick]

Baselines measured in the same run: a linear scan of the same rules (``Policy.evaluate_linear``)
beside the compiled index; unbatched appends (one transaction per record) beside batched ones;
the plain in-memory bus beside the governed one (IATP signing and verification + policy +
recording), and raw PyNaCl ed25519 sign + verify of the same number of messages, measured
right after each governed run, as the floor of per-message signatures on this core. Writes
the section "control_plane" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_os.amb import AMB, Metadata
from agent_os.control_plane import DECISION_EVENTS, FlightRecorder, KernelSpace, Pattern, Policy
from agent_os.iatp import IATP
from benchmarks._report import write_section


def make_policy(n: int) -> Policy:
    policy = Policy(f"bench-{n}", default_action="deny")
    for i in range(n):
        policy.add_rule("allow", Pattern("publish", f"svc{i}.events.*", exclude=[f"svc{i}.events.internal"]))
    return policy


def latencies(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        fn()
        samples.append(clock() - t)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def policy_section(n: int) -> str:
    rows = [
        "| rules | case | indexed p50 µs | indexed p99 µs | cached p50 µs | cached p99 µs "
        "| linear p50 µs | linear p99 µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ctx = {"sender": "a", "agent_id": "a"}
    for size in (10, 100, 1000):
        policy = make_policy(size)
        decisions = policy._compiled.decisions  # the decision cache, cleared for the indexed case

        def indexed(topic: str, policy: Policy = policy, decisions: dict[Any, Any] = decisions) -> Any:
            decisions.clear()
            return policy.evaluate("publish", topic, ctx)

        for case, topic in (
            ("first", "svc0.events.x"),
            ("last", f"svc{size - 1}.events.x"),
            ("none", "other.events.x"),
        ):
            assert policy.evaluate("publish", topic, ctx).allowed == (case != "none")
            fast = latencies(functools.partial(indexed, topic), n)
            cached = latencies(functools.partial(policy.evaluate, "publish", topic, ctx), n)
            slow_n = max(200, n // (10 if size >= 1000 else 1))
            slow = latencies(functools.partial(policy.evaluate_linear, "publish", topic, ctx), slow_n)
            rows.append(
                f"| {size} | {case} | {fast[0]:.2f} | {fast[1]:.2f} | {cached[0]:.2f} | {cached[1]:.2f} "
                f"| {slow[0]:.2f} | {slow[1]:.2f} |"
            )
    return "\n".join(rows)


async def append_rate(path: Path, n: int, batch: int, **options: Any) -> float:
    rec = FlightRecorder("sqlite", str(path), batch_size=batch, flush_interval=10, **options)
    await rec.open()
    data = {"operation": "publish", "resource": "tasks.work", "decision": "allow", "rule": "rule-1"}
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        await rec.log("policy_decision", "agent_1", data)
    await rec.flush()
    elapsed = time.perf_counter() - start
    await rec.close()
    return n / elapsed


async def verify_rate(path: Path, **options: Any) -> tuple[float, int]:
    rec = FlightRecorder("sqlite", str(path), **options)
    start = time.perf_counter()
    result = await rec.verify()
    elapsed = time.perf_counter() - start
    await rec.close()
    assert result.ok
    return result.checked / elapsed, result.checked


def raw_sign_verify(n: int, size: int = 200) -> Callable[[], float]:
    """The floor: a timer for PyNaCl ed25519 sign then verify of ``n`` distinct ``size``-byte
    messages."""
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    verify = key.verify_key.verify
    sign = key.sign
    messages = [i.to_bytes(8, "big") + bytes(size - 8) for i in range(n)]

    def run() -> float:
        start = time.perf_counter()
        for m in messages:
            verify(sign(m))
        return time.perf_counter() - start

    return run


class Governed:
    """One publisher and one subscriber on the in-memory broker, kept connected between chunks.

    ``kind``: ``plain`` (no middleware), ``policy`` (policy both ways + recording, no
    signatures), ``session`` (IATP session MAC + policy + recording), ``ed25519`` (IATP ed25519
    signature per message + policy + recording), ``ed25519w`` (the same, the signatures
    checked in a worker process: ``verify_workers=1``); with ``-sqlite``, recording to a SQLite
    file in ``tmp`` with its defaults, else to the memory recorder."""

    def __init__(self, kind: str, tmp: Path) -> None:
        kind, _, self.storage = kind.partition("-")
        self.kind = kind.removesuffix("w")
        self.verify_workers = 1 if kind.endswith("w") else 0
        self.middleware: list[Any] = []
        self.path = tmp / f"{kind}-{uuid.uuid4().hex}.db"
        self.kernel: KernelSpace | None = None
        self.count = 0
        self.target = 0
        self.sent = 0
        self.done = asyncio.Event()

    async def start(self) -> Governed:
        where = f"memory://bench-cp-{uuid.uuid4().hex}"
        middleware: list[Any] = []
        policy = Policy("bench", default_action="deny", require_verified_sender=self.kind != "policy")
        policy.add_rule("allow", Pattern("publish", "bench.*"))
        policy.add_rule("allow", Pattern("deliver", "bench.*", conditions={"sender": "pub"}))
        if self.kind in ("session", "ed25519"):
            iatp = IATP(max_nonces=5_000_000)
            await iatp.register_agent("pub")
            await iatp.register_agent("sub")
            if self.kind == "session":
                pending = await iatp.offer_session("pub", "sub")
                _, answer = await iatp.accept_session("sub", pending.offer)
                await iatp.complete_session(pending, answer)
            middleware = [iatp.middleware(verify_workers=self.verify_workers)]
        self.middleware = middleware
        self.pub = AMB("memory", where, agent_id="pub", middleware=list(middleware))
        self.sub = AMB("memory", where, agent_id="sub", middleware=list(middleware))
        if self.kind != "plain":
            recorder = (
                FlightRecorder("sqlite", str(self.path))
                if self.storage == "sqlite"
                else FlightRecorder("memory", batch_size=2000)
            )
            self.kernel = KernelSpace(policy=policy, flight_recorder=recorder)
            self.kernel.attach(self.pub)
            self.kernel.attach(self.sub)

        async def handler(message: Any, metadata: Metadata) -> None:
            self.count += 1
            if self.count == self.target:
                self.done.set()

        await self.sub.subscribe("bench.tp", handler)
        await self.pub.connect()
        return self

    async def run(self, n: int) -> float:
        self.done.clear()
        self.target = self.count + n
        publish = self.pub.publish
        start = time.perf_counter()
        for i in range(n):
            await publish("bench.tp", {"i": i}, recipient="sub")
        await asyncio.wait_for(self.done.wait(), 120)
        elapsed = time.perf_counter() - start
        self.sent += n
        if self.kernel is not None:  # untimed: the next path starts with no writes of this one
            await self.kernel.recorder.flush()
        return elapsed

    async def close(self) -> None:
        if self.kernel is not None:
            records = len(await self.kernel.recorder.query(event_type=DECISION_EVENTS))
            assert records == 2 * self.sent, records  # one decision out, one in, per message
            await self.kernel.close()
        await self.pub.close()
        await self.sub.close()
        for layer in self.middleware:
            layer.close()


KINDS = ("plain", "policy", "policy-sqlite", "session", "ed25519", "ed25519-sqlite", "ed25519w-sqlite")


async def governed_runs(rounds: int, chunk: int, ed_chunk: int, tmp: Path) -> dict[str, float]:
    """Seconds per message of each path and of the floor, the paths alternating chunk by chunk
    (the ed25519 chunks followed by the floor's chunk of the same size)."""
    paths = {kind: await Governed(kind, tmp).start() for kind in KINDS}
    floor = raw_sign_verify(ed_chunk)
    total = dict.fromkeys([*paths, "floor"], 0.0)
    count = dict.fromkeys(total, 0)
    for _ in range(rounds):
        for kind, path in paths.items():
            n = ed_chunk if kind.startswith("ed25519") else chunk
            total[kind] += await path.run(n)
            count[kind] += n
        total["floor"] += floor()
        count["floor"] += ed_chunk
    for path in paths.values():
        await path.close()
    return {kind: total[kind] / count[kind] for kind in total}


OUT_OF_REACH = """Why the 1.2× target is out of reach on one core (not rewritten by the script): 1.2× the
floor leaves 11.5 µs a message beside the two ed25519 operations, and the plain bus with
policy out and in and two records already took 12.6 µs (3.2 + 9.4) in the AMD EPYC run of
2026-12-07 02:03 (floor 57.3 µs), before the SQLite writer's share and IATP's own work (building the signed bytes,
the key, time and nonce checks: sign and verify run at 0.93 of raw PyNaCl). Moving the
verification to a worker thread, which would put it on the second core, was prototyped on
2026-12-07 on the Intel Xeon (a standalone script, PyNaCl's `crypto_sign_open` in one worker
thread fed 64 messages ahead, the loop thread signing and doing 10 or 25 µs of pure-Python
work a message, 5 rounds): 1.32× and 1.42× the floor, against 1.17× and 1.33× with the
verification inline. PyNaCl releases the GIL during the check, but the worker must take it
back to hand each result over, and the loop thread, busy in Python, gives it up only at its
own C calls or after the switch interval: the hand-overs cost more than the parallel check
saves. A worker process does better (`verify_workers=1`, the row before the floor): in eight
runs of this script on the AMD EPYC later on 2026-12-07 (a slower host: floor 76–89 µs),
1.19–1.33× against 1.28–1.42× inline, 2–12 % less run by run; the last three, at b8ad9f6 and
1479ec1, 1.22×, 1.19× and 1.26×: at the line, not under it. Two runs at 7929887 in a slow hour
for this host (floor 104 and 112 µs, the plain bus 6.2–6.3 µs against 4.0 at 10:49, while
valgrind counts 1–2 % fewer instructions on these paths than at f60d13a) gave 1.27× and 1.32×
against 1.50× and 1.59× inline. On the AMD EPYC of a later session, slower again (16:03: floor
104.5 µs, the plain bus 6.4 µs), 1.43× with a worker against 1.66× inline. The loop thread
still does about 60 µs of CPU a message (signing, bus, policy, records, sending the checks)
and the worker 55–60 µs of checking on the second core, which it shares with the SQLite
writer; perfect overlap would give about 0.8× the floor, but the loop waits for the oldest
unanswered batch about once every 16 messages (some 36 µs a message in a 2,000-message
probe), as the two processes hand work to each other on this 2-vCPU virtual machine."""


async def main(quick: bool) -> None:
    # The garbage collector stays on, as in any process that runs agents: what a path leaves
    # for it to track (records waiting for the writer did, until 59d6bc6) is part of its cost.
    n_lat = 2_000 if quick else 20_000
    n_rec = 20_000 if quick else 100_000
    runs_n = 3
    policy_table = policy_section(n_lat)
    key = bytes(range(32))
    recorder: dict[str, list[float]] = {}
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs_n):  # interleaved, so load on the machine hits every variant alike
            cases: dict[str, tuple[str, dict[str, Any]]] = {
                "plain": ("plain", {"compression": False}),
                "compressed": ("comp", {}),
                "encrypted": ("enc", {"encryption_key": key}),
                "full": ("full", {"compression": False, "synchronous": "FULL"}),
            }
            for name, (stem, options) in cases.items():
                rate = await append_rate(Path(tmp) / f"{stem}{r}.db", n_rec, 1024, **options)
                recorder.setdefault(name, []).append(rate)
            unbatched = await append_rate(
                Path(tmp) / f"one{r}.db", max(500, n_rec // 50), 1, compression=False
            )
            recorder.setdefault("unbatched", []).append(unbatched)
            for name, stem, options in (
                ("verify plain", "plain", {}),
                ("verify compressed", "comp", {}),
                ("verify encrypted", "enc", {"encryption_key": key}),
            ):
                rate, checked = await verify_rate(Path(tmp) / f"{stem}{r}.db", **options)
                recorder.setdefault(name, []).append(rate)
    rec = {name: statistics.median(values) for name, values in recorder.items()}
    rounds, chunk, ed_chunk = (4, 500, 250) if quick else (12, 2_000, 1_000)
    with tempfile.TemporaryDirectory() as tmp:
        delivery = [await governed_runs(rounds, chunk, ed_chunk, Path(tmp)) for _ in range(runs_n)]
    us = {kind: statistics.median(r[kind] for r in delivery) * 1e6 for kind in delivery[0]}
    per_s = {kind: 1e6 / value for kind, value in us.items()}
    governed = per_s["ed25519"]  # the table's figure: the median of the runs
    ratio = statistics.median(r["floor"] / r["ed25519"] for r in delivery)  # each run's own floor
    overhead_us = us["policy"] - us["plain"]
    sqlite_added = statistics.median(r["policy-sqlite"] - r["plain"] for r in delivery) * 1e6
    sqlite_range = [(r["policy-sqlite"] - r["plain"]) * 1e6 for r in delivery]
    signed_sqlite = statistics.median(r["ed25519-sqlite"] / r["floor"] for r in delivery)
    signed_range = [r["ed25519-sqlite"] / r["floor"] for r in delivery]
    offloaded = statistics.median(r["ed25519w-sqlite"] / r["floor"] for r in delivery)
    offloaded_range = [r["ed25519w-sqlite"] / r["floor"] for r in delivery]
    body = f"""
### Policy decision latency (`policy.evaluate`, one publish rule per topic, `exclude` on each)

{policy_table}

Indexed: rules indexed by operation and topic prefix, the decision cache cleared before each
call (a first decision); cached: the same call repeated (the decision cache, keyed by operation,
topic, sender, recipient, verification and trust; see `control_plane.policy`); linear: the same
rules scanned in order (`Policy.evaluate_linear`, the baseline). Targets: p50 ≤ 5 µs at 100
rules, ≤ 10 µs at 1,000, whichever rule matches or none.

### Flight recorder (SQLite, WAL, {n_rec:,} records of ~200 bytes, median of {runs_n} interleaved runs)

| measure | records/s |
|---|---|
| append, batched (1,024 per transaction), `compression=False` (the default), synchronous=NORMAL | {rec["plain"]:,.0f} |
| append, batched, `compression=True` | {rec["compressed"]:,.0f} |
| append, batched, compressed + `encryption_key` (XChaCha20-Poly1305) | {rec["encrypted"]:,.0f} |
| append, batched, `compression=False`, synchronous=FULL (fsync per batch) | {rec["full"]:,.0f} |
| append, unbatched (baseline: 1 per transaction, NORMAL) | {rec["unbatched"]:,.0f} |
| verify, plain (hash chain over {checked:,} records) | {rec["verify plain"]:,.0f} |
| verify, compressed (inflate + hash) | {rec["verify compressed"]:,.0f} |
| verify, compressed + encrypted (decrypt + inflate + hash) | {rec["verify encrypted"]:,.0f} |

Batched plain is {rec["plain"] / rec["unbatched"]:.0f}× unbatched. Targets: ≥ 50,000 appended/s
batched, ≥ 200,000 verified/s. Data is compressed and encrypted on the writer thread during a
flush; `synchronous=NORMAL` keeps flushed batches across a crash of the process,
`synchronous="FULL"` across a power loss too.

### Governed delivery on the in-memory broker (one event loop, {runs_n} runs of {rounds} rounds; median)

Each round runs every path in turn, {chunk:,} messages each ({ed_chunk:,} for ed25519, followed by
{ed_chunk:,} raw sign + verify pairs, the floor), so load from other processes hits all alike;
after each path's turn its recorder is flushed, untimed, so the next path starts with none of
its writes pending.

| path | messages/s | µs/message |
|---|---|---|
| plain bus (baseline) | {per_s["plain"]:,.0f} | {us["plain"]:.1f} |
| policy out and in + 2 records, no signatures | {per_s["policy"]:,.0f} | {us["policy"]:.1f} |
| the same, recorded to SQLite (its defaults) | {per_s["policy-sqlite"]:,.0f} | {us["policy-sqlite"]:.1f} |
| governed: IATP session MAC + policy out and in + 2 records | {per_s["session"]:,.0f} | {us["session"]:.1f} |
| governed: IATP ed25519 sign + verify + policy out and in + 2 records | {per_s["ed25519"]:,.0f} | {us["ed25519"]:.1f} |
| the same, recorded to SQLite (its defaults) | {per_s["ed25519-sqlite"]:,.0f} | {us["ed25519-sqlite"]:.1f} |
| the same, the signatures checked in a worker process (`verify_workers=1`) | {per_s["ed25519w-sqlite"]:,.0f} | {us["ed25519w-sqlite"]:.1f} |
| floor: raw PyNaCl ed25519 sign + verify, ~200-byte messages (same rounds) | {per_s["floor"]:,.0f} | {us["floor"]:.1f} |

Governed with ed25519 runs at **{governed:,.0f} messages/s, {ratio:.2f}×** its floor
(raw sign + verify alone; the median over the runs of each run's ratio to its own floor). The control plane adds
{overhead_us:.1f} µs per message over the plain bus (two policy decisions, from the decision
cache after the first, two hash-chained records, signal checks). Target: ≥ 10,000 messages/s
governed with signing on one core {"(met)" if governed >= 10_000 else "(MISSED)"}: per-message
ed25519 is bounded by the floor above; IATP's session mode (ed25519 handshake once, then a
keyed BLAKE2b MAC per message) is the governed fast path.

With the SQLite recorder (its defaults; the writer thread on the second core, see
docs/control-plane.md), policy and two records add **{sqlite_added:.1f} µs** per message over
the plain bus ({min(sqlite_range):.1f}–{max(sqlite_range):.1f} over the runs; target ≤ 15:
{"met" if sqlite_added <= 15 else "not met"}), and signed + policy + SQLite costs
**{signed_sqlite:.2f}×** the raw sign + verify floor per message ({min(signed_range):.2f}–{max(signed_range):.2f};
target ≤ 1.2×: {"met" if signed_sqlite <= 1.2 else "not met"}), and **{offloaded:.2f}×**
({min(offloaded_range):.2f}–{max(offloaded_range):.2f}; {"met" if offloaded <= 1.2 else "not met"}) with the
signatures checked in a worker process on the second core (`verify_workers=1`; see
docs/trust.md, "Verification in worker processes"). Load average {os.getloadavg()[0]:.1f} at the end of the run.

{OUT_OF_REACH}"""
    print(body)
    write_section("control_plane", "python -m benchmarks.control_plane" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
