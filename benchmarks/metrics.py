"""The cost of Prometheus metrics per message on the in-memory bus and on NATS, on and off in
the same run.

    .venv/bin/python -m benchmarks.metrics [--quick] [--only memory,nats] [--no-write]

"off": one publisher and one subscriber client on one event loop, no registry. "on": the same
with both clients in a service's metrics registry (``service_registry``: the bus and IATP
collectors, which turn the clients' latency histograms on, and the process collectors) and a
task scraping it (``generate_latest``) every 50 ms in the same loop: 300 times Prometheus's
default scrape rate, so the scrape's share shows. Rounds alternate
which runs first; the figure is the median of the per-round throughput ratios (on / off), with
their range. Needs nats-server on 127.0.0.1:4222 for the NATS rows. Rewrites the section
"metrics" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import time
import uuid
from typing import Any

from prometheus_client import generate_latest

from agent_os.amb import AMB, Metadata
from agent_os.services._metrics import service_registry
from benchmarks._report import write_section

PAYLOAD = b"x" * 256
SCRAPE_EVERY = 0.05
NATS_URL = "nats://127.0.0.1:4222"
SIZES = {"memory": (100_000, 20_000), "nats": (30_000, 10_000)}  # messages per run: full, --quick


async def throughput(backend: str, n: int, metrics: bool) -> tuple[float, int]:
    """Messages per second from publish to handler on ``backend``; the scrapes done meanwhile."""
    url = f"memory://bench-metrics-{uuid.uuid4().hex}" if backend == "memory" else NATS_URL
    subject = f"bench.metrics.{uuid.uuid4().hex[:12]}"
    publisher = AMB(backend, url, agent_id="publisher")
    subscriber = AMB(backend, url, agent_id="subscriber")
    done = asyncio.Event()
    count = 0
    scrapes = 0

    async def handler(message: Any, metadata: Metadata) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async def scrape() -> None:
        nonlocal scrapes
        registry = service_registry([publisher, subscriber])
        while True:
            generate_latest(registry)
            scrapes += 1
            await asyncio.sleep(SCRAPE_EVERY)

    await subscriber.subscribe(subject, handler)
    await publisher.connect()
    scraper = asyncio.create_task(scrape()) if metrics else None
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        await publisher.publish(subject, PAYLOAD)
    await done.wait()
    elapsed = time.perf_counter() - start
    if scraper is not None:
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
    await publisher.close()
    await subscriber.close()
    return n / elapsed, scrapes


def scrape_seconds(repeat: int) -> float:
    """Median time of one scrape of a registry with two clients."""
    registry = service_registry([AMB("memory", "memory://bench-scrape", agent_id=f"a{i}") for i in range(2)])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main(quick: bool, only: list[str], write: bool = True) -> None:
    rounds = 5 if quick else 15
    sizes = {backend: SIZES[backend][1 if quick else 0] for backend in only}
    ratios: dict[str, list[float]] = {b: [] for b in only}
    offs: dict[str, list[float]] = {b: [] for b in only}
    ons: dict[str, list[float]] = {b: [] for b in only}
    scrapes: dict[str, list[int]] = {b: [] for b in only}
    load_before = os.getloadavg()[0]
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for backend in only:
            got = {}
            for metrics in order:
                got[metrics] = await throughput(backend, sizes[backend], metrics)
            offs[backend].append(got[False][0])
            ons[backend].append(got[True][0])
            scrapes[backend].append(got[True][1])
            ratios[backend].append(got[True][0] / got[False][0])
    load_after = os.getloadavg()[0]
    scrape = scrape_seconds(200)
    rows = []
    for backend in only:
        ratio, low, high = statistics.median(ratios[backend]), min(ratios[backend]), max(ratios[backend])
        rows.append(
            f"| {backend} | {sizes[backend]:,} | {statistics.median(ons[backend]):,.0f} msg/s | "
            f"{statistics.median(offs[backend]):,.0f} msg/s | {ratio:.3f} ({low:.3f} to {high:.3f}) | "
            f"{statistics.median(scrapes[backend]):.0f} | >= 0.90 |"
        )
    body = f"""One publisher and one subscriber client on one event loop (one core), 256-byte payload,
{rounds} rounds alternating which runs first, each round running both modes on every bus
(NATS: the local nats-server). "on": both clients in a service's metrics registry (bus, IATP and
process collectors), scraped every {SCRAPE_EVERY * 1000:.0f} ms in the same loop (300x Prometheus's
default rate); "off": no registry. The counters are the clients' own; what "on"
adds on the message path is the handler-latency histogram: a counter decrement per delivery,
and two clock reads and a bucket for one fast call in 16 (the empty handler here makes it the
largest share it can be). Load average {load_before:.1f} before the run, {load_after:.1f} after (2
cores, shared with other processes).

| bus | messages per run | publish -> handler, metrics on | metrics off (same run) | ratio on/off, median (range) | scrapes per "on" run | target |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

One scrape (two clients, text format): {scrape * 1e6:,.0f} µs, median of 200.
"""
    print(body)
    if write:
        command = "python -m benchmarks.metrics" + (" --quick" if quick else "")
        if only != ["memory", "nats"]:
            command += " --only " + ",".join(only)
        write_section("metrics", command, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    parser.add_argument("--only", default="memory,nats", help="buses to measure: memory,nats")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    asyncio.run(main(args.quick, [b for b in args.only.split(",") if b], write=not args.no_write))
