"""The cost of Prometheus metrics per message on the in-memory bus, on and off in the same run.

    .venv/bin/python -m benchmarks.metrics [--quick] [--no-write]

"off": one publisher and one subscriber client on one event loop, no registry. "on": the same
with both clients in a service's metrics registry (``service_registry``: the bus and IATP
collectors, which turn the clients' latency histograms on, and the process collectors) and a
task scraping it (``generate_latest``) every 50 ms in the same loop: 300 times Prometheus's
default scrape rate, so the scrape's share shows. Rounds alternate
which runs first; the figure is the median of the per-round throughput ratios (on / off), with
their range. Rewrites the section "metrics" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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


async def throughput(n: int, metrics: bool) -> tuple[float, int]:
    """Messages per second from publish to handler; the scrapes done meanwhile."""
    url = f"memory://bench-metrics-{uuid.uuid4().hex}"
    publisher = AMB("memory", url, agent_id="publisher")
    subscriber = AMB("memory", url, agent_id="subscriber")
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

    await subscriber.subscribe("bench.metrics", handler)
    await publisher.connect()
    scraper = asyncio.create_task(scrape()) if metrics else None
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        await publisher.publish("bench.metrics", PAYLOAD)
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


async def main(quick: bool, write: bool = True) -> None:
    n = 20_000 if quick else 100_000
    rounds = 5 if quick else 15
    ratios, offs, ons, scrapes = [], [], [], []
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {}
        for metrics in order:
            got[metrics] = await throughput(n, metrics)
        offs.append(got[False][0])
        ons.append(got[True][0])
        scrapes.append(got[True][1])
        ratios.append(got[True][0] / got[False][0])
    ratio = statistics.median(ratios)
    scrape = scrape_seconds(200)
    body = f"""One publisher and one subscriber client on one event loop (one core), 256-byte payload,
{n:,} messages per run, {rounds} rounds alternating which runs first. "on": both clients in a
service's metrics registry (bus, IATP and process collectors), scraped every
{SCRAPE_EVERY * 1000:.0f} ms in the same loop (300x Prometheus's default rate); "off": no registry.
The counters are the clients' own; what "on" adds on the message path is the handler-latency
histogram: a counter decrement per delivery, and two clock reads and a bucket for one fast
call in 16 (the empty handler here makes it the largest share it can be).

| measure | metrics on | metrics off (same run) | ratio on/off, median (range) | target |
|---|---|---|---|---|
| publish -> handler throughput | {statistics.median(ons):,.0f} msg/s | {statistics.median(offs):,.0f} msg/s | {ratio:.3f} ({min(ratios):.3f} to {max(ratios):.3f}) | >= 0.90 |

One scrape (two clients, text format): {scrape * 1e6:,.0f} µs, median of 200;
{statistics.median(scrapes):.0f} scrapes per "on" run (median).
"""
    print(body)
    if write:
        write_section("metrics", "python -m benchmarks.metrics" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    asyncio.run(main(args.quick, write=not args.no_write))
