"""Remove what tests leave on the shared servers: JetStream streams and consumers, Redis stream
keys, consumer groups and registry entries, selected by the test's unique subject prefix.

Durable subscriptions outlive their clients by design (NATS streams are file-backed; Redis
durable groups live ``durable_ttl``), so a test that creates one deletes it at teardown with
these helpers. ``min_idle`` spares what was used recently (for sweeping leftovers while other
test runs may be using the same server).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from tests.support.servers import NATS_URL, REDIS_URL


def _under(subject: str, prefix: str) -> bool:
    return subject == prefix or subject.startswith(prefix + ".")


async def delete_nats_streams(prefix: str, url: str = NATS_URL, min_idle: float | None = None) -> list[str]:
    """Delete the streams whose subjects all lie under ``prefix`` (their consumers go with them)
    and the consumers filtering on ``prefix`` in other streams; return the names deleted.

    ``min_idle``: keep streams that received a message less than that many seconds ago.
    """
    import nats

    deleted: list[str] = []
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        for info in await jsm.streams_info():
            name = info.config.name
            assert name is not None
            subjects = info.config.subjects or []
            if subjects and all(_under(s, prefix) for s in subjects):
                if min_idle is not None and await _idle_seconds(nc, name) < min_idle:
                    continue
                await jsm.delete_stream(name)
                deleted.append(name)
                continue
            for consumer in await jsm.consumers_info(name):
                wanted = consumer.config.filter_subject
                if wanted and _under(wanted, prefix) and consumer.name:
                    await jsm.delete_consumer(name, consumer.name)
                    deleted.append(f"{name}/{consumer.name}")
    finally:
        await nc.close()
    return deleted


async def _idle_seconds(nc: Any, stream: str) -> float:
    """Seconds since ``stream`` last stored a message (or was created), from the server's
    stream info (nats-py's StreamState does not carry ``last_ts``)."""
    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
    info = json.loads(reply.data)
    stamps = [info.get("state", {}).get("last_ts"), info.get("created")]
    seen = [_rfc3339(s) for s in stamps if s and not s.startswith("0001-")]
    return time.time() - max(seen) if seen else float("inf")


def _rfc3339(stamp: str) -> float:
    # "2024-05-01T12:00:00.123456789Z": Python parses at most microseconds.
    head, _, rest = stamp.rstrip("Z").partition(".")
    micros = (rest + "000000")[:6] if rest else "000000"
    return datetime.fromisoformat(f"{head}.{micros}+00:00").timestamp()


async def delete_redis_keys(
    url: str = REDIS_URL,
    *,
    key_prefix: str | None = None,
    subject_prefix: str | None = None,
    amb_prefix: str = "amb:",
    min_idle: float | None = None,
) -> list[str]:
    """Delete Redis keys a test made and return them.

    ``key_prefix``: every key starting with it (a test that gave its broker its own
    ``key_prefix``). ``subject_prefix``: the keys of the adapter's default ``amb_prefix`` that
    belong to subjects under it (registry index, group streams, dead-letter streams) and its
    entries in the wildcard index. ``min_idle``: keep keys touched less than that many seconds ago.
    """
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    deleted: list[str] = []
    try:
        patterns = []
        if key_prefix is not None:
            patterns.append(f"{key_prefix}*")
        if subject_prefix is not None:
            patterns += [
                f"{amb_prefix}groups:{subject_prefix}",
                f"{amb_prefix}*:{subject_prefix}.*",
                f"{amb_prefix}*:{subject_prefix}-*",
            ]
        for pattern in patterns:
            async for raw in r.scan_iter(match=pattern, count=500):
                key = raw.decode()
                if min_idle is not None and (await r.object("idletime", key) or 0) < min_idle:
                    continue
                await r.delete(key)
                deleted.append(key)
        if subject_prefix is not None:
            wildcard_index = f"{amb_prefix}groups:*"
            members = await r.zrange(wildcard_index, 0, -1)
            stale = [m for m in members if isinstance(m, bytes) and f":{subject_prefix}.".encode() in m]
            if stale:
                await r.zrem(wildcard_index, *stale)
    finally:
        await r.aclose()
    return deleted
