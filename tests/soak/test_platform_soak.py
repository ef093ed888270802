"""Soak tests of the platform: sustained traffic through the control plane, IATP and EMK.

Each test proves what only volume and time can: counts that stay exact over tens of thousands
of decisions, caches and tables that stay bounded, memory that does not grow from one run to
an equal second one. They are marked ``slow`` (skipped by default; ``bash .ci/test -m slow``).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent_os.amb import AMB, LifecycleState, Metadata, StateError, get_serializer
from agent_os.amb.deadletter import DLQ_ORIGINAL_ID, DLQ_REASON
from agent_os.control_plane import (
    DECISION_EVENTS,
    AgentSignal,
    AgentStoppedError,
    FlightRecorder,
    KernelSpace,
    Pattern,
    Policy,
    PolicyViolationError,
    RateLimitExceeded,
    SignalDispatcher,
)
from agent_os.control_plane.process import AgentProcess
from agent_os.emk import EMK, HashingEmbedder, NewMemory, RecordNotFound
from agent_os.iatp import IATP
from agent_os.services.control_plane_service import ControlPlaneService
from tests.support import Collector, rss_bytes, wait_until
from tests.support.closing import Closing
from tests.support.emk import APPEND_ONLY_VIOLATIONS
from tests.support.queue_group import SENTINEL, Group, queue_group_policy, real
from tests.support.servers import NATS_URL, PG_DSN

pytestmark = pytest.mark.slow


# -- the control plane under sustained governed traffic (embedded, in-memory bus) ------------------

PLAIN = 15_000  # messages of each plain publisher (pub0, pub2)
STOPPED = 12_000  # messages of the publisher that is stopped and continued
FLOWS = 32  # its concurrent flows of publishes
LIMITED = 4_000  # publish attempts of the rate-limited agent
LIMIT = 400  # ... per second
ASKS = 1_000  # requests of the asker
VICTIM = 8_000  # at most this many messages of the agent killed half way
CYCLES = 8  # SIGSTOP/SIGCONT cycles of the sink and of the stopped publisher each


def soak_policy() -> Policy:
    policy = Policy("soak", default_action="deny", require_verified_sender=True)
    policy.add_rule("deny", Pattern("publish", "soak.secret"), reason="secret topic")
    policy.add_rule(
        "allow", Pattern("publish", "soak.data.limited"), rate_limit=f"{LIMIT}/1s", name="limited"
    )
    policy.add_rule("allow", Pattern("publish", "soak.*"))
    policy.add_rule("deny", Pattern("deliver", "soak.private"), reason="private topic")
    policy.add_rule("allow", Pattern("deliver", "soak.*"))
    policy.add_rule("allow", Pattern("request", "soak.ask"))
    policy.add_rule("allow", Pattern("reply", "_INBOX.*"))
    return policy


@dataclass
class Sent:
    """What one agent's publishes came to."""

    ok: list[str] = field(default_factory=list)  # ids of allowed publishes, in the order they returned
    denied: int = 0  # PolicyViolationError (rate limits included)
    rate_limited: int = 0
    stopped: int = 0  # AgentStoppedError: refused because the agent was killed

    @property
    def decided(self) -> int:
        return len(self.ok) + self.denied


async def governed_run(path: Path) -> dict[str, Any]:
    """One run: agents attached to a kernel whose recorder is the SQLite file ``path``
    (continued from earlier runs), with IATP on every client; checks everything a run must
    leave true and returns its figures."""
    iatp = IATP()
    names = ["pub0", "pub2", "stopper", "limited", "victim", "asker", "responder", "sink"]
    for name in names:
        await iatp.register_agent(name)
    recorder = FlightRecorder("sqlite", str(path), batch_size=2000)
    kernel = KernelSpace(policy=soak_policy(), flight_recorder=recorder)
    start_seq, _ = await recorder.head()
    where = f"memory://soak-cp-{uuid.uuid4().hex}"
    clients = {n: AMB("memory", where, agent_id=n, middleware=[iatp.middleware()]) for n in names}
    for client in clients.values():
        kernel.attach(client)
    watcher = AMB("memory", where, agent_id="watcher")  # not governed: reads the dead letters
    dead = Collector()
    await watcher.subscribe("_DLQ.>", dead)

    sink = Collector()
    await clients["sink"].subscribe("soak.data.>", sink)
    await clients["sink"].subscribe("soak.private", sink)
    killed = False
    victim_got: list[Any] = []
    after_kill: list[Any] = []

    async def to_victim(message: Any, metadata: Metadata) -> None:
        (after_kill if killed else victim_got).append(metadata.id)

    await clients["victim"].subscribe("soak.victim.in", to_victim)

    async def respond(message: Any, metadata: Metadata) -> None:
        await clients["responder"].reply(metadata, ["re", message])

    await clients["responder"].subscribe("soak.ask", respond)
    for client in clients.values():
        await client.connect()

    sent = {n: Sent() for n in names}
    to_private: list[str] = []
    to_victim_ids: list[str] = []

    async def publish(name: str, topic: str, message: Any) -> str | None:
        out = sent[name]
        try:
            message_id = await clients[name].publish(topic, message)
        except RateLimitExceeded:
            out.denied += 1
            out.rate_limited += 1
            return None
        except PolicyViolationError:
            out.denied += 1
            return None
        out.ok.append(message_id)
        return message_id

    async def plain(name: str, victim_every: int | None) -> None:
        for n in range(PLAIN):
            if n % 10 == 9:
                await publish(name, "soak.secret", [name, n])  # denied on the way out
            elif n % 25 == 0:
                message_id = await publish(name, "soak.private", [name, n])  # denied on delivery
                assert message_id is not None
                to_private.append(message_id)
            elif victim_every is not None and n % victim_every == 1:
                message_id = await publish(name, "soak.victim.in", [name, n])
                assert message_id is not None
                to_victim_ids.append(message_id)
            else:
                await publish(name, f"soak.data.{name}", [name, n])

    per_flow = STOPPED // FLOWS
    # The stopper's flows wait at each cycle's mark until the cycle has stopped their agent, so
    # every cycle finds them publishing, however fast or slow the rest is.
    stopped_for = [asyncio.Event() for _ in range(CYCLES)]
    marks = {(k + 1) * per_flow // (CYCLES + 1): stopped_for[k] for k in range(CYCLES)}

    async def stopper(flow: int) -> None:
        # One of FLOWS sequential flows of the stopped agent: each waits for its publish, so
        # its messages must arrive in its order, held or not.
        for n in range(per_flow):
            if n in marks:
                await marks[n].wait()
            assert await publish("stopper", "soak.data.stopper", ["stopper", n, flow]) is not None

    limited_elapsed = 0.0

    async def limited() -> None:
        nonlocal limited_elapsed
        start = time.monotonic()
        for n in range(LIMITED):
            await publish("limited", "soak.data.limited", ["limited", n])
        limited_elapsed = time.monotonic() - start

    victim_half = asyncio.Event()  # the kill comes once the victim is half way
    victim_killed = asyncio.Event()

    async def victim() -> None:
        # Publishes until it is refused (killed); past VICTIM it waits for the kill and tries
        # once more, so every run sends about the same.
        for n in range(VICTIM + 1):
            if n == VICTIM // 2:
                victim_half.set()
            elif n == VICTIM:
                await victim_killed.wait()
            try:
                await publish("victim", "soak.data.victim", ["victim", n])
            except AgentStoppedError:
                sent["victim"].stopped += 1  # killed: refused (and recorded as dropped)
                return
            except StateError:
                return  # killed: its client was closed before this publish reached the mediator
        raise AssertionError("the victim's publishes went on after the kill")

    answers: list[Any] = []

    async def asker() -> None:
        for n in range(ASKS):
            answer = await clients["asker"].request("soak.ask", n, timeout=30)
            answers.append(answer)

    signals = 0
    sink_proc = kernel.get_agent("sink")
    stopper_proc = kernel.get_agent("stopper")
    victim_client = clients["victim"]

    async def signal(agent: str, sig: AgentSignal) -> None:
        nonlocal signals
        assert await kernel.send_signal(agent, sig)
        signals += 1

    def released(proc: AgentProcess) -> bool:
        return proc.held == 0 and not proc.stopped

    async def control() -> None:
        nonlocal killed
        for k in range(CYCLES):
            # The stopper: its flows' publishes wait in its hold queue.
            await signal("stopper", AgentSignal.SIGSTOP)
            stopped_for[k].set()
            await wait_until(lambda: stopper_proc.held >= FLOWS // 2, timeout=30, what="held publishes")
            await signal("stopper", AgentSignal.SIGCONT)
            await wait_until(lambda: released(stopper_proc), timeout=30, what="the stopper's release")
            # The sink: its deliveries wait (one held, the rest in its subscription's queue).
            # The other flows may have finished by now: one message of a flow of its own makes
            # sure a delivery finds the sink stopped (published beside, not awaited: with the
            # sink's queue full, the publish itself waits until the sink is continued).
            await signal("sink", AgentSignal.SIGSTOP)
            marker = asyncio.create_task(publish("pub0", "soak.data.pub0", ["pub0", k, "control"]))
            await wait_until(lambda: sink_proc.held >= 1, timeout=30, what="a held delivery")
            await signal("sink", AgentSignal.SIGCONT)
            assert await asyncio.wait_for(marker, 30) is not None
            await wait_until(lambda: released(sink_proc), timeout=30, what="the sink's release")
            if k == CYCLES // 2:
                await asyncio.wait_for(victim_half.wait(), 60)
                await signal("victim", AgentSignal.SIGKILL)
                killed = True
                victim_killed.set()

    started = time.monotonic()
    run_start = datetime.now()
    victim_task = asyncio.create_task(victim())
    await asyncio.gather(
        plain("pub0", 50),
        plain("pub2", None),
        *(stopper(flow) for flow in range(FLOWS)),
        limited(),
        asker(),
        control(),
    )
    await asyncio.wait_for(victim_task, 30)
    await wait_until(lambda: victim_client.state is LifecycleState.CLOSED, what="the victim's client closed")
    # Sentinel: a live agent publishes on the victim's topic after the victim's last possible
    # message; once the sink has it, it has everything the victim published.
    sentinel = await publish("pub0", "soak.data.victim", "sentinel")
    assert sentinel is not None
    expected_at_sink = (
        sum(len(sent[n].ok) for n in ("pub0", "pub2", "stopper", "limited", "victim"))
        - len(to_victim_ids)
        - len(to_private)
    )  # to the victim; denied on delivery
    await sink.wait_for(expected_at_sink, timeout=60)
    await wait_until(lambda: len(dead.messages) >= len(to_private), timeout=30, what="dead letters")
    elapsed = time.monotonic() - started

    # -- what arrived ------------------------------------------------------------------------
    got = Counter(m.id for m in sink.metadata)
    assert max(got.values()) == 1  # nothing twice
    assert len(sink.metadata) == expected_at_sink
    elsewhere = {*to_victim_ids, *to_private}
    flows: dict[tuple[Any, ...], list[int]] = {}  # (sender, flow) -> its sequence numbers in arrival order
    for message, meta in zip(sink.messages, sink.metadata, strict=True):
        if message != "sentinel":
            assert message[0] == meta.sender
            flows.setdefault((meta.sender, *message[2:]), []).append(message[1])
    for flow, seqs in flows.items():
        assert seqs == sorted(seqs), f"{flow}: messages arrived out of order"
    for name in ("pub0", "pub2", "stopper", "limited"):
        ids = [m.id for m in sink.metadata if m.sender == name]
        assert sorted(ids) == sorted(i for i in sent[name].ok if i not in elsewhere), name
    assert not any(m.id in elsewhere for m in sink.metadata)
    # The victim: everything it published before the kill, nothing after; nothing delivered to it.
    order = [m.id for m in sink.metadata]
    position = {message_id: i for i, message_id in enumerate(order)}
    victim_seen = [m.id for m in sink.metadata if m.sender == "victim"]
    assert victim_seen == sent["victim"].ok
    assert all(position[i] < position[sentinel] for i in victim_seen)
    assert after_kill == []
    assert len(victim_got) <= len(to_victim_ids)
    assert sent["victim"].ok, "the victim published nothing before the kill"
    assert len(answers) == ASKS
    assert answers == [["re", n] for n in range(ASKS)]
    # Rate limit: a burst of LIMIT, then LIMIT a second.
    allowed = len(sent["limited"].ok)
    assert sent["limited"].rate_limited > 0
    assert allowed <= LIMIT + LIMIT * limited_elapsed + 1, (allowed, limited_elapsed)
    letters = [m for m in dead.metadata if m.headers[DLQ_REASON] == "policy_denied"]
    assert len(letters) == len(to_private)

    # -- nothing left behind ----------------------------------------------------------------
    for proc in kernel.processes:
        assert proc.held == 0, proc.id
        assert not proc.tasks, proc.id  # no handler of any agent still counted as running
    for name, client in clients.items():
        assert len(client._requests) == 0, name
    for client in [*clients.values(), watcher]:
        await client.close()
    await kernel.close()
    # Measured here, where every run holds the same: its collectors, not yet its records.
    rss = rss_bytes()

    # -- one record per decision ------------------------------------------------------------
    reader = FlightRecorder("sqlite", str(path))
    records = [r for r in await reader.query(start_time=run_start) if r.seq > start_seq]
    by_type = Counter(r.event_type for r in records)
    decisions = [r for r in records if r.event_type in DECISION_EVENTS]
    out = [r for r in decisions if r.data["direction"] == "out"]
    inbound = [r for r in decisions if r.data["direction"] == "in"]
    # The victim's publish in flight at the kill may have been allowed (and recorded) while it
    # waited for the recorder; then it went no further (recorded as dropped, below).
    victim_allowed = {r.data["message_id"] for r in out if r.agent_id == "victim"}
    cut_off = victim_allowed - set(sent["victim"].ok)
    assert victim_allowed >= set(sent["victim"].ok)
    assert len(cut_off) <= 1
    assert not cut_off & set(position)
    publishes = sum(s.decided for s in sent.values()) + len(cut_off)
    replies = ASKS  # the responder's, allowed out and in
    assert len(out) == publishes + ASKS + replies  # requests are the asker's publishes too
    assert Counter(r.data["decision"] for r in out) == Counter(
        allow=sum(len(s.ok) for s in sent.values()) + len(cut_off) + ASKS + replies,
        deny=sum(s.denied for s in sent.values()),
    )
    assert len({r.data["message_id"] for r in out}) == len(out)
    rate_denied = [r for r in out if r.data["decision"] == "deny" and r.data["rule"] == "limited"]
    assert len(rate_denied) == sent["limited"].rate_limited
    in_keys = Counter((r.agent_id, r.data["message_id"]) for r in inbound)
    assert max(in_keys.values()) == 1
    # The victim's delivery in flight at the kill may have been allowed (and recorded) while it
    # waited for the recorder, and never handled: dropped, or cancelled by its client closing.
    # One at most: its subscription handles one message at a time.
    victim_in = {r.data["message_id"] for r in inbound if r.agent_id == "victim"}
    cut_in = victim_in - set(victim_got)
    assert victim_in >= set(victim_got)
    assert Counter((r.agent_id, r.data["decision"]) for r in inbound) == Counter(
        {
            ("sink", "allow"): len(sink.metadata),
            ("sink", "deny"): len(to_private),
            ("victim", "allow"): len(victim_got) + len(cut_in),
            ("responder", "allow"): ASKS,
            ("asker", "allow"): replies,
        }
    )
    dropped = [r for r in records if r.event_type == "message_dropped"]
    assert {r.agent_id for r in dropped} <= {"victim"}
    dropped_out = [r for r in dropped if r.data["operation"] == "publish"]
    dropped_in = [r for r in dropped if r.data["operation"] == "deliver"]
    assert len(dropped_out) == sent["victim"].stopped
    assert cut_off <= {r.data["message_id"] for r in dropped_out}
    assert len(cut_in) <= 1
    assert not {r.data["message_id"] for r in dropped_in} & set(victim_got)  # none handled
    # Each drop refused to the bus, but one its client's closing cancelled after its record.
    assert 0 <= len(dropped_in) - victim_client.stats.rejected <= 1, victim_client.stats.as_dict()
    held = [r for r in records if r.event_type == "message_held"]
    assert by_type == Counter(
        {
            **Counter(r.event_type for r in decisions),
            "signal": signals,
            **({"message_held": len(held)} if held else {}),
            **({"message_dropped": len(dropped)} if dropped else {}),
        }
    )
    # Every held message was decided once, after its hold, and released in the order held.
    decided_at = {(r.agent_id, r.data["message_id"]): r.seq for r in decisions}
    for r in held:
        assert decided_at[(r.agent_id, r.data["message_id"])] > r.seq
    for agent in ("sink", "stopper"):
        held_ids = [r.data["message_id"] for r in held if r.agent_id == agent]
        assert len(held_ids) >= CYCLES, agent  # every cycle held something
        assert all(i in position or i in to_private for i in held_ids)  # private ones: denied after
        held_ids = [i for i in held_ids if i in position]
        assert sorted(held_ids, key=position.__getitem__) == held_ids, f"{agent}'s held messages reordered"

    verified = await reader.verify()
    assert verified.ok, verified
    await reader.close()
    return {
        "rss": rss,
        "seconds": elapsed,
        "published": publishes + ASKS + replies,
        "records": len(records),
        "chain": verified.checked,
        "held": len(held),
        "rate_limited": sent["limited"].rate_limited,
        "victim_before_kill": len(sent["victim"].ok),
        "delivered_to_sink": len(sink.metadata),
    }


@pytest.mark.timeout(300)
async def test_control_plane_under_sustained_governed_traffic(tmp_path: Path) -> None:
    """Two equal runs of about 56,000 signed messages among eight agents attached to a kernel
    (embedded mode, in-memory bus, SQLite recorder): a policy that denies some on the way out
    and some on delivery, a rate limit on one agent, eight SIGSTOP/SIGCONT cycles each of a
    publisher (32 flows) and of the receiver, requests and replies, and a SIGKILL half way.
    Each run: every message arrives once and in its flow's order, exactly one record per
    decision (counted by type against what was sent), held messages decided after their hold
    and released in order, nothing of the killed agent after the kill, no hold queue or
    pending request left. Over both: one chain that verifies, and no RSS growth in the second."""
    path = tmp_path / "soak.db"
    first = await governed_run(path)
    rss_bytes()  # collect the first run's garbage: both runs start from the same ground
    second = await governed_run(path)
    assert second["chain"] == first["records"] + second["records"]  # one chain over both runs
    grown = second["rss"] - first["rss"]
    print(
        f"\ngoverned soak: run 1 {first}\n               run 2 {second}\n"
        f"RSS at the same point of each run: {first['rss'] >> 20} MiB, then {second['rss'] >> 20} MiB"
    )
    assert grown < 10 << 20, f"RSS grew {grown >> 20} MiB in an equal second run"


# -- IATP's replay cache under a flood ------------------------------------------------------------

MAX_NONCES = 20_000
FLOOD = 100_000  # five times what the cache holds
BATCH = 10_000
KEPT = 200  # messages kept by the wiretap at each end of the flood, to replay


@pytest.mark.timeout(240)
async def test_iatp_replay_cache_stays_bounded_under_a_flood(closing: Closing) -> None:
    """100,000 signed messages through IATP's bus middleware with a replay cache of 20,000:
    after every 10,000 the cache holds at most 20,000 (its order queue too) and, once full, its
    floor rises; replays of the first messages are refused as ``replay_window``, of the last
    ones as ``replayed_nonce``, a message signed before the flood and delivered after it as
    ``replay_window``; fresh messages pass; RSS stays flat while the cache is full."""
    iatp = IATP(max_nonces=MAX_NONCES)
    await iatp.register_agent("flooder")
    await iatp.register_agent("sink")
    where = f"memory://soak-iatp-{uuid.uuid4().hex}"
    flooder = closing(AMB("memory", where, agent_id="flooder", middleware=[iatp.middleware()]))
    guard = iatp.middleware()
    sink = closing(AMB("memory", where, agent_id="sink", middleware=[guard]))
    wiretap = closing(AMB("memory", where, agent_id="wiretap"))  # no IATP: sees the signed envelopes as sent
    attacker = closing(AMB("memory", where, agent_id="attacker"))
    watcher = closing(AMB("memory", where, agent_id="watcher"))
    # How often each flood message arrived (a bytearray: the test's own memory stays flat).
    arrivals = bytearray(FLOOD)
    received = 0
    fresh: Counter[Any] = Counter()

    async def count(message: Any, metadata: Metadata) -> None:
        nonlocal received
        received += 1
        if isinstance(message, int):
            arrivals[message] = min(arrivals[message] + 1, 255)
        else:
            fresh[message] += 1

    await sink.subscribe("flood.x", count)
    captured: dict[int, Any] = {}

    async def capture(message: Any, metadata: Metadata) -> None:
        if isinstance(message, int) and (message < KEPT or message >= FLOOD - KEPT):
            captured[message] = metadata.envelope

    await wiretap.subscribe("flood.x", capture)
    dead = Collector()
    await watcher.subscribe("_DLQ.>", dead)
    for client in (flooder, attacker):
        await client.connect()
    encode = get_serializer("msgpack").encode
    cache = iatp.verifier.nonces
    # Signed before the flood, delivered after it: older than what the cache can vouch for.
    late = await iatp.sign("flooder", "late", topic="flood.x")

    started = time.monotonic()
    floors: list[int | None] = []
    sizes: list[int] = []
    rss: list[int] = []
    for batch in range(FLOOD // BATCH):
        for n in range(batch * BATCH, (batch + 1) * BATCH):
            await flooder.publish("flood.x", n)
        await wait_until(
            lambda: received >= (batch + 1) * BATCH,  # noqa: B023 - awaited in this iteration
            timeout=60,
            what=f"{(batch + 1) * BATCH} verified messages",
        )
        sizes.append(len(cache))
        assert len(cache) <= MAX_NONCES
        assert len(cache._order) <= MAX_NONCES  # nothing kept behind the count either
        floors.append(cache.floor_ns)
        rss.append(rss_bytes())
    flood_seconds = time.monotonic() - started
    assert received == FLOOD
    assert arrivals == bytes([1]) * FLOOD  # every flood message verified once
    assert guard.rejected == Counter()
    # The floor appears once the cache overflows and rises with every batch after.
    overflowed = MAX_NONCES // BATCH  # batches that fit
    assert floors[:overflowed] == [None] * overflowed
    rising = [f for f in floors[overflowed:] if f is not None]
    assert len(rising) == len(floors) - overflowed
    assert rising == sorted(rising)
    assert len(set(rising)) == len(rising)
    assert rising[0] >= late.timestamp

    # Replays of the first messages (evicted long ago): refused as older than the cache covers.
    # Replays of the last ones (still in the cache): refused as replays. The late message:
    # refused like the old replays. Fresh messages: pass.
    await wait_until(lambda: len(captured) == 2 * KEPT, what="the wiretap's captures")
    for n in [*range(KEPT), *range(FLOOD - KEPT, FLOOD)]:
        await attacker.broker.publish("flood.x", encode(captured[n]))
    await attacker.broker.publish("flood.x", encode(late))
    for n in range(KEPT):
        await flooder.publish("flood.x", f"fresh {n}")
    await wait_until(lambda: sum(guard.rejected.values()) == 2 * KEPT + 1, what="the refusals")
    await wait_until(lambda: received == FLOOD + KEPT, what="the fresh messages")
    assert guard.rejected == Counter(replay_window=KEPT + 1, replayed_nonce=KEPT)
    await wait_until(lambda: len(dead.messages) == 2 * KEPT + 1, what="the dead letters")
    reasons = Counter(m.headers[DLQ_REASON] for m in dead.metadata)
    assert reasons == Counter(replay_window=KEPT + 1, replayed_nonce=KEPT)
    assert arrivals == bytes([1]) * FLOOD  # no replay was handled
    assert fresh == Counter(f"fresh {n}" for n in range(KEPT))
    assert len(cache) <= MAX_NONCES
    # Memory: the second half of the flood (the cache full all along) grows nothing to speak of.
    half = len(rss) // 2
    print(
        f"\nIATP flood: {FLOOD} messages in {flood_seconds:.1f} s ({FLOOD / flood_seconds:.0f}/s) "
        f"through a cache of {MAX_NONCES}; sizes {sizes}; RSS MiB {[r >> 20 for r in rss]}"
    )
    assert rss[-1] - rss[half] < 8 << 20, f"RSS grew {(rss[-1] - rss[half]) >> 20} MiB with the cache full"
    for client in (flooder, sink, wiretap, attacker, watcher):
        await client.close()


# -- mediated mode on NATS: two control-plane instances in a queue group -------------------------

SENDERS = 4
PER_SENDER = 5_000  # 20,000 messages, every tenth one denied
QUEUE_SIZE = 1_000  # each instance's hold queue per agent


@pytest.mark.nats
@pytest.mark.timeout(240)
async def test_mediated_mode_on_nats_forwards_each_allowed_message_once() -> None:
    """Two service instances share 20,000 signed messages of four senders on the real NATS
    server. One sender is stopped half way (on both instances, as an operator's signal would
    be) while it publishes its second half: the instances hold what they get up to their bound,
    refuse the rest (``hold_queue_full``), and release the held ones in order at SIGCONT. Every
    message ends exactly one way: forwarded once, dead-lettered for the policy, or dropped for
    the full queue; with exactly one decision record (``message_dropped`` for a drop)."""
    group = Group(uuid.uuid4().hex[:10])
    iatp = IATP()  # every process's keys and identities here: one process plays them all
    try:
        for i in range(2):
            client = AMB("nats", NATS_URL, agent_id=f"cp{i}-{group.tag}")
            assert client.agent_id is not None
            await iatp.register_agent(client.agent_id)
            service = ControlPlaneService(
                client,
                KernelSpace(
                    policy=queue_group_policy(),
                    signal_dispatcher=SignalDispatcher(None, queue_size=QUEUE_SIZE),
                ),
                iatp=iatp,
                ingress_prefix=group.ingress_prefix,
                delivery_prefix=group.delivery_prefix,
                reply_prefix=group.reply_prefix,
                queue=f"cp_{group.tag}",
                agents=[group.agent_id(f"r{j}") for j in range(3)],
            )
            group.services.append(service)
            await service.start()
        senders = [group.agent(f"s{i}", middleware=[iatp.middleware()]) for i in range(SENDERS)]
        for sender in senders:
            assert sender.agent_id is not None
            await iatp.register_agent(sender.agent_id)
        receivers = [group.agent(f"r{j}") for j in range(3)]
        wiretap = group.agent("wiretap")
        inboxes = [Collector() for _ in receivers]
        everything, dead = Collector(), Collector()
        for j, (receiver, inbox) in enumerate(zip(receivers, inboxes, strict=True)):
            await receiver.subscribe(group.delivered(f"tasks.to_r{j}", group.agent_id(f"r{j}")), inbox)
        await wiretap.subscribe(group.every_delivery, everything)
        await wiretap.subscribe(f"_DLQ.{group.ingress_prefix}.>", dead)
        for sender in senders:
            await sender.connect()

        expected: list[dict[str, tuple[str, int]]] = [{} for _ in receivers]  # id -> (sender, n)
        denied: dict[str, str] = {}  # id -> sender
        sent_by: dict[str, str] = {}  # allowed by the policy: id -> sender
        of_stopped: list[str] = []  # every message of the sender that is stopped
        stopped_id = senders[1].agent_id
        assert stopped_id is not None
        kernels = [s.kernel for s in group.services]
        half_way, stopped, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def held() -> int:
            return sum(k.get_agent(stopped_id).held for k in kernels if stopped_id in k.processes)

        def accounted() -> int:
            """Messages of the stopped sender that reached an instance: decided, held or refused."""
            procs = [k.get_agent(stopped_id) for k in kernels if stopped_id in k.processes]
            full = sum(m.headers[DLQ_REASON] == "hold_queue_full" for m in dead.metadata)
            return sum(p.actions_count + p.violations_count + p.held for p in procs) + full

        async def send(index: int, client: AMB) -> None:
            name = client.agent_id
            assert name is not None
            for n in range(PER_SENDER):
                if name == stopped_id and n == PER_SENDER // 2:
                    # Its first half decided, the instances stop this sender; it goes on.
                    await wait_until(
                        lambda: accounted() == PER_SENDER // 2, timeout=60, what="the first half"
                    )
                    half_way.set()
                    await stopped.wait()
                if n % 10 == 9:
                    message_id = await client.publish(group.to("tasks.secret"), [name, n])
                    denied[message_id] = name
                else:
                    j = (index + n) % len(receivers)
                    message_id = await client.publish(
                        group.to(f"tasks.to_r{j}"), [name, n], recipient=group.agent_id(f"r{j}")
                    )
                    expected[j][message_id] = (name, n)
                    sent_by[message_id] = name
                if name == stopped_id:
                    of_stopped.append(message_id)
            if name == stopped_id:
                done.set()

        async def stop_and_continue() -> None:
            # An operator's signal reaches every instance: each holds what it gets of the
            # sender's messages (up to its bound), and releases them in order at SIGCONT, once
            # every message of the sender has reached an instance.
            await asyncio.wait_for(half_way.wait(), 60)
            for kernel in kernels:
                assert await kernel.send_signal(stopped_id, AgentSignal.SIGSTOP)
            stopped.set()
            await asyncio.wait_for(done.wait(), 60)
            await wait_until(
                lambda: accounted() == PER_SENDER, timeout=60, what="every message of the stopped sender"
            )
            for kernel in kernels:
                assert await kernel.send_signal(stopped_id, AgentSignal.SIGCONT)

        started = time.monotonic()
        await asyncio.gather(*(send(i, c) for i, c in enumerate(senders)), stop_and_continue())
        published = time.monotonic() - started
        assert len(sent_by) + len(denied) == SENDERS * PER_SENDER
        await wait_until(
            lambda: (
                sum(s.stats.forwarded for s in group.services) + len(dead.messages) >= SENDERS * PER_SENDER
            ),
            timeout=120,
            what="every message forwarded or dead-lettered",
        )
        settled = time.monotonic() - started
        # Nothing more can be on its way once every subscriber has each instance's sentinel.
        targets = [group.delivered(f"tasks.to_r{j}", group.agent_id(f"r{j}")) for j in range(len(receivers))]
        await group.sentinels([*targets, f"_DLQ.{group.ingress_prefix}.sentinel"])

        def has_sentinels(c: Collector, n: int) -> bool:
            return c.messages.count(SENTINEL) >= n

        for collector, count in [(inbox, 2) for inbox in inboxes] + [(everything, 2 * 3), (dead, 2)]:
            await wait_until(
                functools.partial(has_sentinels, collector, count),
                timeout=60,
                what=f"{count} sentinels",
            )

        # Every message ended one way, once.
        letters = real(dead)
        reasons = {m.headers[DLQ_ORIGINAL_ID]: m.headers[DLQ_REASON] for m in letters}
        assert len(reasons) == len(letters)  # no message dead-lettered twice
        full = {i for i, reason in reasons.items() if reason == "hold_queue_full"}
        assert full <= set(of_stopped)
        assert {i: r for i, r in reasons.items() if i not in full} == dict.fromkeys(
            denied.keys() - full, "policy_denied"
        )
        delivered = sent_by.keys() - full
        tapped = Counter(m.id for m in real(everything))
        assert tapped == Counter(dict.fromkeys(delivered, 1))
        for j, inbox in enumerate(inboxes):
            got = real(inbox)
            assert {m.id: tuple(m.envelope.payload) for m in got} == {
                i: v for i, v in expected[j].items() if i not in full
            }
            assert len(got) == len(expected[j].keys() - full)

        # One decision per message across the two instances: a policy decision, or the drop.
        decisions = await group.records(**{"data.operation": "publish"})
        decided = Counter(r.data["message_id"] for each in decisions for r in each)
        assert decided == Counter(dict.fromkeys((sent_by.keys() | denied.keys()) - full, 1))
        drops = [await k.recorder.query(event_type="message_dropped") for k in kernels]
        assert Counter(r.data["message_id"] for each in drops for r in each) == Counter(
            dict.fromkeys(full, 1)
        )
        assert {r.data["reason"] for each in drops for r in each} <= {"hold_queue_full"}
        holds = [await k.recorder.query(event_type="message_held") for k in kernels]
        held_ids = [r.data["message_id"] for each in holds for r in each]
        assert len(set(held_ids)) == len(held_ids)  # each held once
        assert set(held_ids) <= set(of_stopped) - full
        arrival = {m.id: i for i, m in enumerate(real(everything))}
        for service, each, held_here in zip(group.services, decisions, holds, strict=True):
            assert max(r.data["queued"] for r in held_here) <= QUEUE_SIZE  # the bound held
            assert len([r for r in each if r.data["decision"] == "allow"]) == service.stats.forwarded
            seq_of = {r.data["message_id"]: r.seq for r in each}
            assert all(seq_of[r.data["message_id"]] > r.seq for r in held_here)  # decided after
            in_order = [r.data["message_id"] for r in held_here if r.data["message_id"] in arrival]
            assert sorted(in_order, key=arrival.__getitem__) == in_order  # released in order
            # Nothing left: no hold, no backlog, no pending request.
            assert service.kernel.get_agent(stopped_id).held == 0
            assert service.mediator.holds.backlog == {}
            assert service.mediator.holds.detached == {}
            assert len(service.pending) == 0
        shares = [s.stats.forwarded for s in group.services]
        assert all(share > 0 for share in shares), shares
        print(
            f"\nmediated on NATS: {SENDERS * PER_SENDER} messages published in {published:.1f} s, "
            f"all settled after {settled:.1f} s; forwarded {shares}; dead-lettered: "
            f"{len(denied.keys() - full)} denied, {len(full)} for the full hold queue; held {len(held_ids)}"
        )
    finally:
        await group.close()


# -- EMK: a long append-only load on the real PostgreSQL ------------------------------------------

MEMORIES = 50_000
EMK_BATCH = 1_000
EMK_AGENTS = ("alice", "bob", "carol")
CHAINS = 10  # per agent: each batch adds a version to every chain (a supersede)
EMK_DIM = 32


@pytest.mark.timeout(240)
async def test_emk_under_a_long_append_only_load() -> None:
    """50,000 memories of three agents stored in batches on the real PostgreSQL (with its HNSW
    index), each batch also superseding the head of every agent's chains, with searches after
    each batch: an agent finds its own newest memory, never another agent's, and never a
    superseded version; at the end every chain's history is intact, every memory read back
    checks against its content hash, and the database still refuses UPDATE and DELETE."""
    namespace = f"emk_soak_{uuid.uuid4().hex[:12]}"
    sql = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    emk = EMK("postgresql", PG_DSN, HashingEmbedder(EMK_DIM), "agent", namespace=namespace)
    try:
        await emk.open()
        outsider = [await emk.store("eve", f"eve's note {n}") for n in range(10)]
        outsider_ids = {r.id for r in outsider}
        stored: dict[str, tuple[str, str, str]] = {}  # id -> (agent, content, content hash)
        chains: dict[tuple[str, int], list[str]] = {(a, c): [] for a in EMK_AGENTS for c in range(CHAINS)}
        searches: list[float] = []
        started = time.monotonic()
        storing = 0.0
        for batch in range(MEMORIES // EMK_BATCH):
            items = [
                NewMemory(
                    agent_id=(agent := EMK_AGENTS[n % len(EMK_AGENTS)]),
                    content=f"{agent} note {n}: topic {n % 97}, detail {n * 7919 % 10007}",
                    metadata={"n": n},
                    tags=(f"t{n % 10}",),
                )
                for n in range(batch * EMK_BATCH, (batch + 1) * EMK_BATCH)
            ]
            items += [
                NewMemory(
                    agent_id=agent,
                    content=f"{agent} chain {c} version {batch}",
                    supersedes=versions[-1] if versions else None,
                )
                for (agent, c), versions in chains.items()
            ]
            t = time.monotonic()
            records = await emk.store_many(items)
            storing += time.monotonic() - t
            assert len(records) == len(items)
            for record in records:
                stored[record.id] = (record.agent_id, record.content, record.content_hash)
            for record in records[EMK_BATCH:]:
                chains[(record.agent_id, int(record.content.split()[2]))].append(record.id)
            # Searches between batches: each agent's own newest note, found and only its own.
            for agent in EMK_AGENTS:
                newest = next(r for r in reversed(records[:EMK_BATCH]) if r.agent_id == agent)
                t = time.monotonic()
                found = await emk.search(agent, newest.content, limit=5)
                searches.append(time.monotonic() - t)
                assert {r.agent_id for r in found} == {agent}
                exact = await emk.search(agent, newest.content, limit=1, exact=True)
                assert [r.id for r in exact] == [newest.id]
                # Another agent asking the very same text sees none of it.
                other = EMK_AGENTS[(EMK_AGENTS.index(agent) + 1) % len(EMK_AGENTS)]
                theirs = await emk.search(other, newest.content, limit=20)
                assert all(r.agent_id == other for r in theirs)
                assert {r.id for r in await emk.search("eve", newest.content, limit=20)} <= outsider_ids
            if batch:
                # The version a chain had before this batch is superseded: out of searches.
                agent, c = EMK_AGENTS[batch % len(EMK_AGENTS)], batch % CHAINS
                old = chains[(agent, c)][-2]
                text = f"{agent} chain {c} version {batch - 1}"
                hits = await emk.search(agent, text, limit=5, exact=True)
                assert old not in {r.id for r in hits}
                kept = await emk.search(agent, text, limit=5, exact=True, include_superseded=True)
                assert old in {r.id for r in kept}
        elapsed = time.monotonic() - started

        # Every chain's history: newest first, linked version to version, each hash checked.
        for (agent, c), versions in chains.items():
            history = await emk.history(versions[-1], agent_id=agent)
            assert [r.id for r in history] == versions[::-1]
            assert [r.content for r in history] == [
                f"{agent} chain {c} version {v}" for v in reversed(range(len(versions)))
            ]
            assert [r.supersedes for r in history] == [*versions[-2::-1], None]
            with pytest.raises(RecordNotFound):
                await emk.history(versions[-1], agent_id="eve")
        # What the database holds, per agent; a sample read back (hash checked) and kept private.
        rows = await sql.execute(f"SELECT agent_id, count(*) FROM {namespace}.memories GROUP BY agent_id")
        per_agent: dict[str, int] = dict(await rows.fetchall())
        expected = Counter(agent for agent, _, _ in stored.values())
        assert per_agent == {**expected, "eve": len(outsider)}
        sample = list(stored.items())[:: len(stored) // 500]
        for record_id, (agent, content, content_hash) in sample:
            got = await emk.get(record_id, agent_id=agent)  # its hash is checked on read
            assert (got.content, got.content_hash) == (content, content_hash)
            with pytest.raises(RecordNotFound):
                await emk.get(record_id, agent_id="eve")
        # Still append-only, with 50,000 rows in the table.
        for statement in APPEND_ONLY_VIOLATIONS:
            if ".retention_log" in statement:
                continue  # no retention has run: nothing there to refuse
            with pytest.raises(psycopg.Error) as err:
                await sql.execute(statement.format(s=namespace))
            assert err.value.sqlstate == "EK001", statement
        rows = await sql.execute(f"SELECT count(*) FROM {namespace}.memories")
        assert (await rows.fetchone()) == (len(stored) + len(outsider),)
        assert emk.rejected == Counter()  # no integrity error, no refused call, all along
        searches.sort()
        p50, p95 = searches[len(searches) // 2], searches[int(len(searches) * 0.95)]
        print(
            f"\nEMK soak: {len(stored)} memories ({len(stored) - MEMORIES} supersedes) in {elapsed:.1f} s, "
            f"stored at {len(stored) / storing:.0f}/s; search p50 {p50 * 1000:.1f} ms, "
            f"p95 {p95 * 1000:.1f} ms"
        )
    finally:
        await emk.close()
        await sql.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")
        await sql.close()
