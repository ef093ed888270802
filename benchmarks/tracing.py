"""The cost of tracing per message on the in-memory bus and on NATS: off, on, and the plain bus,
in the same run.

    .venv/bin/python -m benchmarks.tracing [--quick] [--only memory,nats] [--no-write]

One publisher and one subscriber client on one event loop, 256-byte payloads, publish ->
handler, for each bus and mode:

- "plain": the bus with tracing switched off (``tracing.disable()``), the baseline;
- "off": what a process runs when the ``OTEL_*`` variables configure no tracing
  (``tracing.configure_from_env`` returned None). A client decides at connect whether it traces
  and one that does not has no tracing layer, so this is the plain path by design: the row is an
  A/A comparison, and its spread is the measurement's noise;
- "api": tracing enabled with OpenTelemetry's API alone (its no-op tracer provider, no SDK):
  the bus's tracing layer runs, its spans record nothing;
- "on": the SDK: a tracer provider with a ``BatchSpanProcessor`` to an exporter that drops
  what it gets (the export's own cost is the collector's business, and its thread's share of
  the one core shows);
- "sampled": the same SDK sampling 1% of the traces (``OTEL_TRACES_SAMPLER=
  parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.01``), what a busy bus would run.

Rounds rotate which mode runs first, and every other round swaps "plain" and "off" (which are
otherwise neighbours); after each run the SDK's batch processors are flushed, so no export runs
into the next measurement. Each figure is the median of the per-round ratios to "plain" in the
same round, with their range, for throughput (wall clock) and for the process's CPU time per
message. Needs nats-server on 127.0.0.1:4222 for the NATS rows. Rewrites the
section "tracing" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NoOpTracerProvider

from agent_os.amb import AMB, Metadata, tracing
from benchmarks._report import write_section
from benchmarks.bus_adapters import WAIT, Counter, timed_burst

PAYLOAD = b"x" * 256
NATS_URL = "nats://127.0.0.1:4222"
MODES = ("plain", "off", "api", "on", "sampled")
RUN = uuid.uuid4().hex[:10]


class DropExporter(SpanExporter):
    """Takes every batch and keeps nothing; counts the spans."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


@dataclass
class Figures:
    """Per mode: throughput (msg/s) and CPU µs per message of each round."""

    rate: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})


def set_mode(mode: str, provider: TracerProvider, sampled: TracerProvider) -> None:
    tracing.disable()
    if mode == "off":
        for name in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[name]
        assert tracing.configure_from_env("benchmark") is None
    elif mode == "api":
        tracing.enable(NoOpTracerProvider())
    elif mode == "on":
        tracing.enable(provider)
    elif mode == "sampled":
        tracing.enable(sampled)


async def throughput(backend: str, url: str, n: int, warm: int) -> tuple[float, float]:
    """Messages per second from publish to handler, and CPU µs per message."""
    pub = AMB(backend, url, agent_id="publisher")
    sub = AMB(backend, url, agent_id="subscriber")
    counter = Counter()

    async def handler(message: Any, metadata: Metadata) -> None:
        counter.hit()

    try:
        await asyncio.wait_for(pub.connect(), WAIT)
        topic = f"bench{RUN}.tracing.{uuid.uuid4().hex[:8]}"
        await asyncio.wait_for(sub.subscribe(topic, handler), WAIT)

        def send() -> Any:
            return pub.publish(topic, PAYLOAD)

        await timed_burst(counter, warm, send)
        gc.collect()
        cpu = time.process_time()
        rate = await timed_burst(counter, n, send)
        return rate, (time.process_time() - cpu) / n * 1e6
    finally:
        await pub.close(timeout=5)
        await sub.close(timeout=5)


def url_for(backend: str) -> str:
    return f"memory://bench-tracing-{uuid.uuid4().hex}" if backend == "memory" else NATS_URL


def ratio_cell(values: list[float], base: list[float]) -> str:
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f} to {max(ratios):.3f})"


async def main(quick: bool, only: list[str], write: bool = True) -> None:
    sizes = (
        {"memory": (10_000, 1_000), "nats": (5_000, 500)}
        if quick
        else {"memory": (60_000, 2_000), "nats": (30_000, 1_000)}
    )
    rounds = 5 if quick else 11
    exporter = DropExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    sampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    sampled.add_span_processor(BatchSpanProcessor(exporter))
    results = {backend: Figures() for backend in only}
    try:
        for r in range(rounds):
            order = list(MODES[r % len(MODES) :] + MODES[: r % len(MODES)])
            if r % 2:
                i, j = order.index("plain"), order.index("off")
                order[i], order[j] = order[j], order[i]
            for backend in only:
                n, warm = sizes[backend]
                for mode in order:
                    set_mode(mode, provider, sampled)
                    rate, cpu = await throughput(backend, url_for(backend), n, warm)
                    results[backend].rate[mode].append(rate)
                    results[backend].cpu[mode].append(cpu)
                    tracing.disable()
                    provider.force_flush()
                    sampled.force_flush()
            print(f"round {r + 1}/{rounds} done", flush=True)
    finally:
        tracing.disable()
        provider.shutdown()
        sampled.shutdown()

    rows = []
    for backend in only:
        fig = results[backend]
        n, _ = sizes[backend]
        for mode in MODES:
            rate, cpu = statistics.median(fig.rate[mode]), statistics.median(fig.cpu[mode])
            if mode == "plain":
                rows.append(f"| {backend} | plain (baseline) | {rate:,.0f} msg/s | {cpu:.1f} | 1 | 1 |")
                continue
            rows.append(
                f"| {backend} | {mode} | {rate:,.0f} msg/s | {cpu:.1f} | "
                f"{ratio_cell(fig.rate[mode], fig.rate['plain'])} | "
                f"{ratio_cell([1 / c for c in fig.cpu[mode]], [1 / c for c in fig.cpu['plain']])} |"
            )
    counts = ", ".join(f"{b} {sizes[b][0]:,}" for b in only)
    body = f"""One publisher and one subscriber client on one event loop, 256-byte payload, messages
per run: {counts} (after a warm-up); {rounds} rounds, each running every mode on every bus, the
first mode rotating, "plain" and "off" swapped every other round, the span processors flushed
between runs. "plain": tracing switched off; "off": the `OTEL_*` variables configure no
tracing (`configure_from_env` returned None), the plain path by design (a client that does not
trace has no tracing layer): an A/A row, its spread is the noise; "api": tracing enabled with
OpenTelemetry's API alone (no-op provider); "on": the SDK with a `BatchSpanProcessor` to an
exporter that drops the spans ({exporter.spans:,} spans exported in all); "sampled": the same
SDK keeping 1% of the traces (`parentbased_traceidratio`, 0.01). Ratios: median of the
per-round ratios to "plain" of the same round (range); the CPU ratio is plain's CPU per message
over the mode's (1: the same, 0.5: twice the CPU).

| bus | mode | throughput (median) | CPU µs/message (median) | throughput / plain | CPU: plain / mode |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Target: tracing off ≥ 0.98 of plain (the cost of "off" is nil by construction; above).
"""
    print(body)
    if write:
        command = "python -m benchmarks.tracing" + (" --quick" if quick else "")
        if only != ["memory", "nats"]:
            command += " --only " + ",".join(only)
        write_section("tracing", command, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    parser.add_argument("--only", default="memory,nats", help="buses to measure: memory,nats")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    asyncio.run(main(args.quick, [b for b in args.only.split(",") if b], write=not args.no_write))
