"""EMK on PostgreSQL + pgvector: ingestion rate, search latency and recall@10 of HNSW vs exact.

    .venv/bin/python -m benchmarks.emk [--n 100000] [--dim 384] [--queries 200] [--quick]

Needs the local PostgreSQL with pgvector (``bash .ci/services``) and numpy (installed with the
``local-embeddings`` extra). Vectors are synthetic but shaped like sentence embeddings: points
around 1,000 cluster centres (unit-normalised), embeddings precomputed, so the figures are the
store's, not a model's. One namespace (schema) is created and dropped.

Measured, each beside a baseline in the same run:

- bulk ingestion: ``store_many`` (5,000 per batch) into a namespace created with
  ``defer_index=True``, then ``build_index()``; baseline: raw binary COPY of the same vectors
  into a bare table (no validation, hashing, triggers or secondary indexes);
- live ingestion: ``store_many`` (500 per batch) into the indexed table; baseline: raw COPY into
  a bare table that has the same HNSW index;
- search latency p50/p95/p99 and recall@10 of HNSW (``ef_search`` 40, 100, 200) against exact
  search (``exact=True``: a scan, the baseline), unfiltered and with a tag filter matching 10%
  of the rows.

Writes the section "emk" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector_async

from agent_os.emk import EMK, HashingEmbedder, NewMemory
from benchmarks._report import pct, write_section

DSN = os.environ.get("EMK_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
AGENT = "bench-agent"


class FixedDimension(HashingEmbedder):
    """Only the dimension matters: every vector in the benchmark is precomputed."""

    @property
    def model(self) -> str:
        return f"bench-precomputed-{self.dimension}"


def make_vectors(n: int, dim: int, seed: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    points = centres[rng.integers(0, len(centres), size=n)] + 0.6 * rng.normal(size=(n, dim)).astype(
        np.float32
    )
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points


async def raw_copy(vectors: np.ndarray[Any, Any], *, hnsw: bool, schema: str) -> float:
    """Baseline: binary COPY of (uuid, vector) into a bare table; rows/s."""
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await register_vector_async(conn)
        await conn.execute(f"CREATE TABLE {schema}.bare (id uuid, embedding vector({vectors.shape[1]}))")
        if hnsw:
            await conn.execute(f"CREATE INDEX ON {schema}.bare USING hnsw (embedding vector_cosine_ops)")
        rows = [(uuid.uuid4(), Vector(v)) for v in vectors]
        start = time.perf_counter()
        async with (
            conn.cursor() as cur,
            cur.copy(f"COPY {schema}.bare (id, embedding) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["uuid", "vector"])
            for row in rows:
                await copy.write_row(row)
        elapsed = time.perf_counter() - start
        await conn.execute(f"DROP TABLE {schema}.bare")
    return len(rows) / elapsed


def items(vectors: np.ndarray[Any, Any], offset: int) -> list[NewMemory]:
    return [
        NewMemory(
            agent_id=AGENT,
            content=f"memory {offset + i}",
            tags=["ten"] if (offset + i) % 10 == 0 else ["other"],
            metadata={"n": offset + i},
            embedding=v.tolist(),
        )
        for i, v in enumerate(vectors)
    ]


async def ingest(emk: EMK, vectors: np.ndarray[Any, Any], offset: int, batch: int) -> float:
    prepared = items(vectors, offset)
    start = time.perf_counter()
    for i in range(0, len(prepared), batch):
        await emk.store_many(prepared[i : i + batch])
    return len(prepared) / (time.perf_counter() - start)


async def searches(
    emk: EMK, queries: np.ndarray[Any, Any], *, exact: bool, tags: list[str] | None
) -> tuple[list[float], list[set[str]]]:
    latencies, results = [], []
    for q in queries:
        vec = q.tolist()
        start = time.perf_counter()
        hits = await emk.search(AGENT, embedding=vec, limit=10, tags=tags, exact=exact)
        latencies.append((time.perf_counter() - start) * 1000)
        results.append({h.id for h in hits})
    return latencies, results


async def raw_searches(
    conn: psycopg.AsyncConnection[Any], schema: str, queries: np.ndarray[Any, Any], tags: list[str] | None
) -> tuple[list[float], list[set[str]]]:
    """The minimal pgvector query for the same scope: one prepared statement, ids only."""
    sql = f"SELECT id FROM {schema}.memories WHERE agent_id = %s"
    sql += " AND tags @> %s::text[]" if tags else ""
    sql += " ORDER BY embedding <=> %s LIMIT 10"
    latencies, results = [], []
    for q in queries:
        args: tuple[Any, ...] = (AGENT, tags, Vector(q)) if tags else (AGENT, Vector(q))
        start = time.perf_counter()
        rows = await (await conn.execute(sql, args, prepare=True)).fetchall()
        latencies.append((time.perf_counter() - start) * 1000)
        results.append({str(r[0]) for r in rows})
    return latencies, results


async def versus_raw(
    schema: str, embedder: FixedDimension, queries: np.ndarray[Any, Any], rounds: int
) -> dict[str, Any]:
    """EMK.search against the minimal pgvector query (ef_search 40, iterative scans), in
    interleaved rounds on the same data: per-round ratio of the p50s, median and range."""
    emk = EMK("postgresql", DSN, embedder, namespace=schema)
    conn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
    out: dict[str, Any] = {}
    try:
        await register_vector_async(conn)
        await conn.execute("SET hnsw.ef_search = 40")
        await conn.execute("SET hnsw.iterative_scan = relaxed_order")
        for label, tags in (("unfiltered", None), ("filtered", ["ten"])):
            await searches(emk, queries[:20], exact=False, tags=tags)  # warm both
            await raw_searches(conn, schema, queries[:20], tags)
            ratios, ours_p50, raw_p50 = [], [], []
            same = 0.0
            for i in range(rounds):
                if i % 2:
                    raw_lat, raw_res = await raw_searches(conn, schema, queries, tags)
                    lat, res = await searches(emk, queries, exact=False, tags=tags)
                else:
                    lat, res = await searches(emk, queries, exact=False, tags=tags)
                    raw_lat, raw_res = await raw_searches(conn, schema, queries, tags)
                ours_p50.append(pct(lat, 50))
                raw_p50.append(pct(raw_lat, 50))
                ratios.append(ours_p50[-1] / raw_p50[-1])
                same = recall(res, raw_res)
            out[label] = (
                statistics.median(ours_p50),
                statistics.median(raw_p50),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
                same,
            )
            print(
                f"{label}: EMK / raw p50 {out[label][2]:.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                flush=True,
            )
    finally:
        await emk.close()
        await conn.close()
    return out


def recall(approx: list[set[str]], exact: list[set[str]]) -> float:
    return sum(len(a & e) for a, e in zip(approx, exact, strict=True)) / sum(len(e) for e in exact)


BEFORE_AFTER = """Before and after (not rewritten by the script), the same command on the Intel Xeon on
2026-12-07: at commit 7fdf1ed, unfiltered 1.33 (1.27-1.39) and filtered 1.17 (1.13-1.22); after
the three commits that followed, three runs gave unfiltered 1.26 (1.19-1.42), 1.30 (1.24-1.42)
and 1.26 (1.23-1.41), filtered 1.22, 1.19 and 1.18. The client's
own work per search went down: the query vector's check 9.9 -> 4.5 us (struct packing instead
of `array("f", ...)`, finiteness read off the packed bytes), each result's hash check 1.44 ->
1.03 us (no keyword arguments), the result's fields read once. Measured on the way and left as
it is: the embedding's SHA-256 computed in the database costs a search about 5 % of the raw
query's time; reading the vector instead and hashing it in Python (a psycopg loader) cost
more (+12 % against +5 %). The `NOT EXISTS` superseded filter, the extra columns and the outer
sort cost about 5 % together; the rest of the gap is the client's Python (the pool lease about
10 us, the ten records about 27 us measured alone and two to three times that between round
trips, when caches are cold).

On a slower host the gap grows: a run on the AMD EPYC on 2026-12-07 at 20:21, at c2a8943 (EMK
unchanged since the Xeon runs but for refusing hostile vectors and ids), gave 1.49 unfiltered,
and a second run of the comparison alone on the same data 1.51 (1.46-1.55). Its parts there,
medians of five rounds of 200 queries: the raw query 0.89 ms; EMK's own SQL sent by bare
psycopg 1.07 ms, of which the SHA-256 of each result's embedding in the database about 0.08 ms
and the superseded filter about 0.05 ms; `EMK.search` 1.33 ms, the client's Python (the pool
lease, reading, checking and building ten records) about 0.26 ms; on the Xeon the whole gap
was 0.18 ms (0.84 against 0.66). The database's share is a ratio of the query's own work; the client's grows with a slower
CPU while the index scan does not, so the target is met on the Xeon and missed there. The
AMD EPYC of 2026-12-08 00:39 was slow for the database itself (the raw query 2.09 ms at p50,
raw COPY 56k rows/s against 90k at 20:21): 1.38 unfiltered, 1.33 filtered."""


async def main(n: int, dim: int, n_queries: int, rounds: int) -> None:
    schema = f"emk_bench_{uuid.uuid4().hex[:8]}"
    live_n = max(500, min(2_000, n // 50))
    data = make_vectors(n + live_n + n_queries, dim, seed=1)
    base, live, queries = data[:n], data[n : n + live_n], data[n + live_n :]
    embedder = FixedDimension(dim)
    out: dict[str, Any] = {}
    try:
        emk = EMK("postgresql", DSN, embedder, namespace=schema, defer_index=True)
        await emk.open()
        out["raw_bulk"] = await raw_copy(base[: min(n, 20_000)], hnsw=False, schema=schema)
        out["bulk"] = await ingest(emk, base, 0, 5_000)
        print(f"bulk ingestion {out['bulk']:,.0f}/s (raw COPY {out['raw_bulk']:,.0f}/s)", flush=True)
        start = time.perf_counter()
        await emk.build_index()
        out["build_s"] = time.perf_counter() - start
        print(f"index build {out['build_s']:.1f} s", flush=True)
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            await conn.execute(f"ANALYZE {schema}.memories")
        out["live"] = await ingest(emk, live, n, 500)
        out["raw_live"] = await raw_copy(live, hnsw=True, schema=schema)
        print(
            f"live ingestion {out['live']:,.0f}/s (raw COPY with HNSW {out['raw_live']:,.0f}/s)", flush=True
        )
        await emk.close()
        total = n + live_n

        exact_emk = EMK("postgresql", DSN, embedder, namespace=schema)
        exact_q = queries[: max(20, n_queries // 2)]
        exact_lat, exact_res = await searches(exact_emk, exact_q, exact=True, tags=None)
        exact_lat_f, exact_res_f = await searches(exact_emk, exact_q, exact=True, tags=["ten"])
        await exact_emk.close()
        out["exact"] = (pct(exact_lat, 50), pct(exact_lat, 95), pct(exact_lat, 99))
        out["exact_f"] = (pct(exact_lat_f, 50), pct(exact_lat_f, 95), pct(exact_lat_f, 99))
        print(f"exact p50 {out['exact'][0]:.1f} ms, filtered {out['exact_f'][0]:.1f} ms", flush=True)

        rows = []
        for ef in (40, 100, 200):
            hnsw = EMK("postgresql", DSN, embedder, namespace=schema, settings={"hnsw.ef_search": str(ef)})
            await searches(hnsw, queries[:20], exact=False, tags=None)  # warm the cache
            lat, res = await searches(hnsw, queries, exact=False, tags=None)
            lat_f, res_f = await searches(hnsw, queries, exact=False, tags=["ten"])
            await hnsw.close()
            k = len(exact_q)
            rows.append(
                (
                    ef,
                    (pct(lat, 50), pct(lat, 95), pct(lat, 99)),
                    recall(res[:k], exact_res),
                    (pct(lat_f, 50), pct(lat_f, 95), pct(lat_f, 99)),
                    recall(res_f[:k], exact_res_f),
                )
            )
            print(
                f"ef_search {ef}: p95 {rows[-1][1][1]:.2f} ms recall {rows[-1][2]:.3f}; "
                f"filtered p95 {rows[-1][3][1]:.2f} ms recall {rows[-1][4]:.3f}",
                flush=True,
            )
        raw = await versus_raw(schema, embedder, queries, rounds)
    finally:
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            version = await (
                await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).fetchone()
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    def ms(t: tuple[float, float, float]) -> str:
        return f"{t[0]:.2f} / {t[1]:.2f} / {t[2]:.2f}"

    raw_rows = "\n".join(
        f"| {label} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} ({r[3]:.2f}-{r[4]:.2f}) | {r[5]:.3f} | "
        f"<= 1.3: {'met' if r[2] <= 1.3 else 'MISSED'} |"
        for label, r in raw.items()
    )
    search_rows = "\n".join(
        f"| HNSW, ef_search {ef} | {ms(lat)} | {rec:.3f} | {ms(lat_f)} | {rec_f:.3f} |"
        for ef, lat, rec, lat_f, rec_f in rows
    )
    body = f"""
{total:,} memories of {dim} dimensions (synthetic, clustered, unit-normalised; embeddings
precomputed) in one namespace on the local PostgreSQL 15 with pgvector {version[0] if version else "?"}, HNSW m=16,
ef_construction=64, cosine. Searches go through `EMK.search` (validation, content-hash check of
each result, `limit=10`) with iterative index scans (`relaxed_order`); {len(queries)} queries per
row, recall@10 against exact search over the first {len(exact_q)} queries. "10% filter" is a tag
carried by every tenth memory.

| ingestion | ours | baseline (same run) | ratio | target |
|---|---|---|---|---|
| bulk: `store_many` x5,000 into a new namespace (`defer_index=True`) | {out["bulk"]:,.0f} memories/s | {out["raw_bulk"]:,.0f} rows/s (raw binary COPY, bare table) | {out["bulk"] / out["raw_bulk"]:.2f} | >= 5,000/s |
| then `build_index()` (HNSW over {n:,}) | {out["build_s"]:.1f} s ({n / out["build_s"]:,.0f} memories/s) | | | |
| bulk incl. index build | {n / (n / out["bulk"] + out["build_s"]):,.0f} memories/s | | | |
| live: `store_many` x500 into the indexed table | {out["live"]:,.0f} memories/s | {out["raw_live"]:,.0f} rows/s (raw COPY, bare table with HNSW) | {out["live"] / out["raw_live"]:.2f} | |

| search (latency p50 / p95 / p99 in ms) | unfiltered | recall@10 | 10% filter | recall@10 |
|---|---|---|---|---|
| exact (`exact=True`, the baseline) | {ms(out["exact"])} | 1.000 | {ms(out["exact_f"])} | 1.000 |
{search_rows}

| against the minimal pgvector query (ef_search 40, {rounds} interleaved rounds of {len(queries)} queries) | `EMK.search` p50 ms | raw p50 ms | EMK / raw (median of per-round ratios, range) | results in common | target |
|---|---|---|---|---|---|
{raw_rows}

The raw query: `SELECT id FROM <ns>.memories WHERE agent_id = $1 [AND tags @> $2] ORDER BY embedding <=> $3
LIMIT 10`, prepared, on one connection with the same settings. `EMK.search` does more in the same
round trip: the superseded filter, every column of the record, the embedding's SHA-256 computed in
the database, the id of a newer version, and in Python the validation and the content-hash check.

{BEFORE_AFTER}

Targets: search p95 <= 10 ms with recall@10 >= 0.95, also under a 10% filter. EMK's default
`ef_search` is 40 (pgvector's default). Inserting into an HNSW index is the slow part of live ingestion (compare the
raw COPY with and without the index); bulk loads should create the namespace with
`defer_index=True` and call `build_index()` once.
"""
    print(body)
    write_section(
        "emk", f"python -m benchmarks.emk --n {n} --dim {dim} --queries {n_queries} --rounds {rounds}", body
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="memories to load (default 100,000)")
    parser.add_argument("--dim", type=int, default=384, help="dimensions (default 384, as all-MiniLM-L6-v2)")
    parser.add_argument("--queries", type=int, default=200, help="search queries per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds against raw pgvector")
    parser.add_argument("--quick", action="store_true", help="10,000 memories, 100 queries: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.n, args.queries, args.rounds = 10_000, 100, 3
    asyncio.run(main(args.n, args.dim, args.queries, args.rounds))
