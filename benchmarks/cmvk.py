"""CMVK benchmarks: a panel called in parallel vs the same calls in sequence, verify overhead,
and the agreement measure's accuracy and throughput.

    .venv/bin/python -m benchmarks.cmvk [--quick]

Everything runs against a local scripted OpenAI-compatible server (cmvk.testing) through
litellm's real HTTP path, with a fixed per-call delay standing in for model latency. Baselines,
same run: the same litellm calls one after another (sequential) and all at once with bare
``asyncio.gather`` (no CMVK); for agreement, difflib's ``SequenceMatcher`` ratio (the string
comparison of a comparable project) on the same labelled pairs. Writes the section "cmvk" of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk._calls import litellm_module
from agent_os.cmvk._verdict import verify_messages
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from benchmarks._report import write_section
from tests.support.embedders import HashingEmbedder

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmvk_pairs.jsonl"


def load_pairs() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


async def panel_latencies(delays: list[float], rounds: int) -> dict[str, float]:
    """Median (and max) latency of CMVK.verify over a panel whose models answer after
    ``delays`` seconds, with the same calls in sequence and bare-gathered as baselines."""
    names = [f"m{i}" for i in range(len(delays))]
    scripts = {n: Reply(verdict("supported"), delay=d) for n, d in zip(names, delays, strict=True)}
    async with ScriptedLLMServer(scripts) as server:
        specs = [ModelSpec(n, model=f"openai/{n}") for n in names]
        cmvk = CMVK(specs, api_base=server.url, api_key="bench", retries=0)
        litellm = litellm_module()
        messages = verify_messages("What is the capital of France?", "Paris.", None)

        async def raw(name: str) -> None:
            await litellm.acompletion(
                model=f"openai/{name}", messages=messages, api_base=server.url, api_key="bench", max_retries=0
            )

        await cmvk.verify("warm", "up")
        par, seq, gather = [], [], []
        for _ in range(rounds):  # interleaved so that load changes hit all three alike
            start = time.perf_counter()
            result = await cmvk.verify("What is the capital of France?", "Paris.")
            par.append(time.perf_counter() - start)
            if not result.verified:
                raise AssertionError(result.reason)
            start = time.perf_counter()
            for n in names:
                await raw(n)
            seq.append(time.perf_counter() - start)
            start = time.perf_counter()
            await asyncio.gather(*(raw(n) for n in names))
            gather.append(time.perf_counter() - start)
    return {
        "cmvk": statistics.median(par),
        "cmvk_max": max(par),
        "sequential": statistics.median(seq),
        "gather": statistics.median(gather),
    }


async def agreement_figures(repeat: int) -> dict[str, Any]:
    pairs = load_pairs()
    triples = [(p["a"], p["b"], p["question"]) for p in pairs]
    labels = [bool(p["agree"]) for p in pairs]
    out: dict[str, Any] = {"pairs": len(pairs)}
    for label, cmvk in (
        ("measure", CMVK(["unused"])),
        ("measure+hash", CMVK(["unused"], embedder=HashingEmbedder())),
    ):
        preds = [(await cmvk.agreement(a, b, q)).agree for a, b, q in triples]
        out[f"{label}_acc"] = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(pairs)
        by_cat: dict[str, list[bool]] = {}
        for p, pred in zip(pairs, preds, strict=True):
            by_cat.setdefault(p["category"], []).append(pred == p["agree"])
        out[f"{label}_cats"] = {c: (sum(v), len(v)) for c, v in sorted(by_cat.items())}
        start = time.perf_counter()
        for _ in range(repeat):
            for a, b, q in triples:
                await cmvk.agreement(a, b, q)
        out[f"{label}_rate"] = repeat * len(pairs) / (time.perf_counter() - start)
    ratios = [difflib.SequenceMatcher(None, a, b).ratio() for a, b, _ in triples]
    best = max(
        (sum((r >= t) == y for r, y in zip(ratios, labels, strict=True)) / len(pairs), t)
        for t in (i / 20 for i in range(1, 20))
    )
    out["difflib_acc"], out["difflib_threshold"] = best
    out["difflib_acc_08"] = sum((r >= 0.8) == y for r, y in zip(ratios, labels, strict=True)) / len(pairs)
    start = time.perf_counter()
    for _ in range(repeat):
        for a, b, _ in triples:
            difflib.SequenceMatcher(None, a, b).ratio()
    out["difflib_rate"] = repeat * len(pairs) / (time.perf_counter() - start)
    return out


async def main(quick: bool) -> None:
    rounds = 5 if quick else 15
    delay = 0.1
    panels = {n: await panel_latencies([delay] * n, rounds) for n in (3, 5)}
    issue = await panel_latencies([0.2, 0.4, 0.6], rounds)
    ag = await agreement_figures(20 if quick else 100)

    lines = [
        f"Verification latency, median of {rounds} rounds; every model call takes {delay * 1000:.0f} ms at the "
        "local scripted server (litellm over HTTP):",
        "",
        "| models | CMVK.verify (parallel) | same calls in sequence | bare asyncio.gather of the calls | speed-up vs sequence | CMVK overhead vs gather |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in panels.items():
        lines.append(
            f"| {n} | {r['cmvk'] * 1000:.0f} ms | {r['sequential'] * 1000:.0f} ms | {r['gather'] * 1000:.0f} ms | "
            f"{r['sequential'] / r['cmvk']:.1f}x | {(r['cmvk'] - r['gather']) * 1000:+.0f} ms |"
        )
    verdict_700 = "met" if issue["cmvk_max"] < 0.7 else "NOT met"
    lines += [
        "",
        f"The issue's case, three models answering in 200, 400 and 600 ms ({rounds} rounds; target: verify "
        f"under 700 ms): CMVK.verify median {issue['cmvk'] * 1000:.0f} ms, slowest round "
        f"{issue['cmvk_max'] * 1000:.0f} ms ({verdict_700}); the same calls in sequence "
        f"{issue['sequential'] * 1000:.0f} ms; bare asyncio.gather {issue['gather'] * 1000:.0f} ms. "
        "(The tests prove the overlap from the server's request log instead of timing it.)",
    ]
    lines += [
        "",
        f"Agreement on the labelled set tests/data/cmvk_pairs.jsonl ({ag['pairs']} pairs), no LLM:",
        "",
        "| measure | accuracy | pairs/s |",
        "|---|---|---|",
        f"| CMVK.agreement (canonical forms, conflicts, words) | {ag['measure_acc']:.1%} | {ag['measure_rate']:,.0f} |",
        f"| same + deterministic hashing embedder | {ag['measure+hash_acc']:.1%} | {ag['measure+hash_rate']:,.0f} |",
        f"| baseline: difflib ratio >= 0.8 | {ag['difflib_acc_08']:.1%} | {ag['difflib_rate']:,.0f} |",
        f"| baseline: difflib ratio at its best threshold ({ag['difflib_threshold']:.2f}) | {ag['difflib_acc']:.1%} | (same) |",
        "",
        "Per category (CMVK agreement, no embedder): "
        + ", ".join(f"{c} {ok}/{n}" for c, (ok, n) in ag["measure_cats"].items()),
    ]
    body = "\n".join(lines)
    print(body)
    write_section("cmvk", "python -m benchmarks.cmvk" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    asyncio.run(main(parser.parse_args().quick))
