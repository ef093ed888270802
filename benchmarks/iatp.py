"""IATP benchmarks: sign, verify, signed delivery on the in-memory bus, and session mode.

    .venv/bin/python -m benchmarks.iatp [--quick]

Baselines measured in the same run: raw PyNaCl ``SigningKey.sign`` / ``VerifyKey.verify`` on a
message of the size of our canonical envelope bytes, and the same bus without middleware. The
section "iatp" of benchmarks/RESULTS.md is rewritten with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import uuid
from typing import Any

import nacl.signing

from amb import AMB, Envelope, Metadata, MsgpackSerializer, new_id
from benchmarks._report import write_section
from iatp import IATP, envelope_bytes

PAYLOAD = {"task_id": "task_123", "priority": "high", "data": "x" * 128}


def make_env(sender: str = "alice", recipient: str | None = "bob") -> Envelope:
    return Envelope(new_id(), "bench.iatp", sender, PAYLOAD, recipient, timestamp=time.time_ns(), headers={})


async def setup() -> IATP:
    iatp = IATP(max_nonces=5_000_000, max_age=3600)
    await iatp.register_agent("alice")
    await iatp.register_agent("bob")
    await iatp.establish_trust("bob", "alice", 0.9, ["send_data"])
    return iatp


def sign_verify_rates(iatp: IATP, n: int, size: int, chunk: int = 250) -> tuple[float, float, float, float]:
    """(raw sign, raw verify, our sign, our verify) per second, alternating chunks of ``chunk``
    messages between raw PyNaCl and ours so that load from other processes hits both alike."""
    sk = nacl.signing.SigningKey.generate()
    vk = sk.verify_key
    messages = [bytes([i % 256]) * size for i in range(chunk)]
    sigs = [sk.sign(m).signature for m in messages]
    t_rs = t_rv = t_os = t_ov = 0.0
    for _ in range(n // chunk):
        t0 = time.perf_counter()
        for m in messages:
            sk.sign(m)
        t1 = time.perf_counter()
        for m, s in zip(messages, sigs, strict=True):
            vk.verify(m, s)
        t2 = time.perf_counter()
        envs = [make_env() for _ in range(chunk)]
        t3 = time.perf_counter()
        for env in envs:
            iatp.sign_envelope(env)
        t4 = time.perf_counter()
        for env in envs:
            if not iatp.verify_envelope(env).valid:
                raise AssertionError("benchmark envelope did not verify")
        t5 = time.perf_counter()
        t_rs, t_rv, t_os, t_ov = t_rs + t1 - t0, t_rv + t2 - t1, t_os + t4 - t3, t_ov + t5 - t4
    total = (n // chunk) * chunk
    return total / t_rs, total / t_rv, total / t_os, total / t_ov


async def delivery(
    n: int,
    *,
    sender_mw: list[Any],
    receiver_mw: list[Any],
    presigned: list[bytes] | None = None,
    recipient: str | None = None,
) -> float:
    url = f"memory://bench-{uuid.uuid4().hex}"
    pub = AMB("memory", url, agent_id="alice", middleware=sender_mw)
    sub = AMB("memory", url, agent_id="bob", middleware=receiver_mw)
    done = asyncio.Event()
    count = 0

    async def handler(message: Any, metadata: Metadata) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    await sub.subscribe("bench.iatp", handler)
    await pub.connect()
    start = time.perf_counter()
    if presigned is not None:
        publish = pub.broker.publish
        for data in presigned:
            await publish("bench.iatp", data)
    else:
        for _ in range(n):
            await pub.publish("bench.iatp", PAYLOAD, recipient=recipient)
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    if sub.stats.rejected:
        raise AssertionError(f"{sub.stats.rejected} messages were rejected")
    await pub.close()
    await sub.close()
    return n / elapsed


async def session_pair() -> tuple[IATP, IATP]:
    a, b = IATP(max_age=3600), IATP(max_age=3600)
    await a.register_agent("alice")
    await b.register_agent("bob")
    await a.add_identity(b.identity("bob"))
    await b.add_identity(a.identity("alice"))
    pending = await a.offer_session("alice", "bob")
    _, answer = await b.accept_session("bob", pending.offer.to_bytes())
    await a.complete_session(pending, answer)
    return a, b


async def main(quick: bool) -> None:
    n_sig = 3_000 if quick else 20_000
    n_bus = 20_000 if quick else 100_000
    gc.collect()
    iatp = await setup()
    size = len(envelope_bytes(make_env(), "ed25519", "k" * 32, b"n" * 16))
    # Load from other processes comes and goes, so each figure is paired with its baseline
    # measured right beside it, and the run with the median ratio is reported.
    runs = sorted((sign_verify_rates(iatp, n_sig, size) for _ in range(3)), key=lambda r: r[3] / r[1])
    raw_sign, raw_verify, sign, verify = runs[1]

    codec = MsgpackSerializer()
    pairs: list[tuple[float, float]] = []
    signed_pairs: list[tuple[float, float]] = []
    plain_delivery = 0.0
    for _ in range(3):
        presigned = [codec.encode(iatp.sign_envelope(make_env())) for _ in range(n_sig)]
        got = await delivery(n_sig, sender_mw=[], receiver_mw=[iatp.middleware()], presigned=presigned)
        rs, rv, _, _ = sign_verify_rates(iatp, 2_000, size)
        pairs.append((got, rv))
        got = await delivery(n_sig, sender_mw=[iatp.middleware()], receiver_mw=[iatp.middleware()])
        signed_pairs.append((got, 1 / (1 / rs + 1 / rv)))
        plain_delivery = max(plain_delivery, await delivery(n_bus, sender_mw=[], receiver_mw=[]))
    verified_delivery, delivery_raw_verify = sorted(pairs, key=lambda p: p[0] / p[1])[1]
    signed_delivery, both_raw = sorted(signed_pairs, key=lambda p: p[0] / p[1])[1]

    a, b = await session_pair()
    session = a.sessions.for_pair("alice", "bob", time.time_ns())
    assert session is not None
    session_envs = [make_env() for _ in range(n_bus)]
    start = time.perf_counter()
    for env in session_envs:
        session.seal(env)
    seal_rate = n_bus / (time.perf_counter() - start)
    start = time.perf_counter()
    for env in session_envs:
        if not b.verify_envelope(env).valid:
            raise AssertionError("session envelope did not verify")
    open_rate = n_bus / (time.perf_counter() - start)
    session_delivery = 0.0
    for _ in range(3):
        session_delivery = max(
            session_delivery,
            await delivery(n_bus, sender_mw=[a.middleware()], receiver_mw=[b.middleware()], recipient="bob"),
        )
        plain_delivery = max(plain_delivery, await delivery(n_bus, sender_mw=[], receiver_mw=[]))

    mark = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    body = f"""
One event loop (one core). Envelope: {size}-byte canonical signed bytes (a dict payload of ~170
bytes). ed25519 runs: {n_sig:,} messages; bus and session runs: {n_bus:,}. Three runs, each
paired with its baseline measured beside it (sign/verify alternate in chunks of 250); the run
with the median ratio is shown. "Verified delivery" publishes pre-signed envelopes on the raw
broker, so the receiving core does the verification alone; "signed + verified" signs on publish
and verifies on delivery on the same core, so it pays for both (its ceiling is raw sign+verify).

| measure | ours | baseline (same run) | ratio | target |
|---|---|---|---|---|
| sign (sign_envelope) | {sign:,.0f} /s | {raw_sign:,.0f} /s (PyNaCl SigningKey.sign, {size} B) | {sign / raw_sign:.2f} | |
| verify (verify_envelope, all checks) | {verify:,.0f} /s | {raw_verify:,.0f} /s (PyNaCl VerifyKey.verify) | {verify / raw_verify:.2f} | |
| verified delivery (memory bus, middleware) | {verified_delivery:,.0f} msg/s | {delivery_raw_verify:,.0f} /s (raw verify, measured right after) | {verified_delivery / delivery_raw_verify:.2f} | >= 0.80 {mark(verified_delivery / delivery_raw_verify >= 0.8)} |
| signed + verified delivery, one core | {signed_delivery:,.0f} msg/s | {both_raw:,.0f} /s (raw sign + raw verify) | {signed_delivery / both_raw:.2f} | (info: pays for signing too) |
| bus without middleware | {plain_delivery:,.0f} msg/s | | | |
| session MAC seal | {seal_rate:,.0f} /s | {sign:,.0f} /s (ed25519 sign_envelope) | {seal_rate / sign:.1f}x | |
| session MAC check (all checks) | {open_rate:,.0f} /s | {verify:,.0f} /s (ed25519 verify_envelope) | {open_rate / verify:.1f}x | |
| session-mode delivery (seal + check on the bus) | {session_delivery:,.0f} msg/s | {plain_delivery:,.0f} msg/s (bus without middleware) | {session_delivery / plain_delivery:.2f} | >= 100,000 msg/s {mark(session_delivery >= 100_000)} |
"""
    print(body)
    write_section("iatp", "python -m benchmarks.iatp", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    asyncio.run(main(parser.parse_args().quick))
