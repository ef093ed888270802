"""A key revoked by another process is refused by a running service within the documented
bound (``--key-refresh``, default 1 s), on the real NATS server; and the watch fails closed.

The service process (``agent-os serve memory --identities ...``) reads its key store every
``--key-refresh`` seconds; this test process opens the same store and revokes alice's key.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from agent_os.amb import AMB, MsgpackSerializer
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.iatp import IATP, Reason
from agent_os.services._identity import PASSPHRASE_ENV
from tests.support import Collector, wait_until
from tests.support.identities import PASSPHRASE, service_identities
from tests.support.processes import start, stop
from tests.support.servers import NATS_URL

pytestmark = pytest.mark.nats

REFRESH = 0.5  # the service's --key-refresh in this test
BOUND = REFRESH * 2 + 1.5  # the documented bound (one period and a read) with room for a busy CI


async def test_a_key_revoked_from_another_process_is_refused_by_the_running_service(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    prefix, alice_id, service_id = f"emk{tag}", f"alice-{tag}", f"memory-{tag}"
    keys = await service_identities(tmp_path / "keys", service_id, alice_id)
    proc, _ = await start(
        "memory", "--broker", NATS_URL, "--identities", str(tmp_path / "keys"), "--storage", "memory",
        "--embedding-model", "hashing", "--prefix", prefix, "--agent-id", service_id,
        "--key-refresh", str(REFRESH),
        env={PASSPHRASE_ENV: PASSPHRASE},
    )  # fmt: skip
    dead = Collector()
    alice = AMB("nats", NATS_URL, agent_id=alice_id, middleware=[keys[alice_id].middleware()])
    raw = AMB("nats", NATS_URL, agent_id=f"raw-{tag}")
    try:
        await raw.subscribe(f"_DLQ.{prefix}.>", dead)
        stored = await alice.request(f"{prefix}.store", {"content": "before"}, timeout=10)
        assert stored["ok"] is True
        # Another process (this one) opens the service's key store and revokes alice's key.
        admin = IATP("file", key_path=str(tmp_path / "keys"), passphrase=PASSPHRASE)
        await admin.revoke_key(keys[alice_id].identity(alice_id).key_id, reason="compromised")
        revoked = time.monotonic()
        # alice's signed messages, one every 50 ms, until the service refuses one.
        sent, last = 0, 0.0
        wire = MsgpackSerializer()

        async def refused() -> bool:
            nonlocal sent, last
            if dead.metadata:
                return True
            if time.monotonic() - last >= 0.05:  # at most 20 a second, for BOUND seconds
                signed = await keys[alice_id].sign(alice_id, {"content": f"n{sent}"}, topic=f"{prefix}.store")
                await raw.broker.publish(f"{prefix}.store", wire.encode(signed))
                sent, last = sent + 1, time.monotonic()
            return False

        await wait_until(refused, BOUND, "a refusal of the revoked key")
        elapsed = time.monotonic() - revoked
        print(f"refused {elapsed:.2f} s after the revocation, after {sent} messages")
        assert dead.metadata[0].headers[DLQ_REASON] == "revoked_key"
        assert elapsed < BOUND
        # From then on every message of the key is refused; nothing more is stored.
        before = len(dead.metadata)
        signed = await keys[alice_id].sign(alice_id, {"content": "later"}, topic=f"{prefix}.store")
        await raw.broker.publish(f"{prefix}.store", wire.encode(signed))
        await dead.wait_for(before + 1, timeout=10)
        assert dead.metadata[-1].headers[DLQ_REASON] == "revoked_key"
        returncode, log = await stop(proc, signal.SIGTERM)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for client in (alice, raw):
            await client.close()
    assert returncode == 0, log


async def test_a_revocation_is_applied_by_refresh_and_never_undone(tmp_path: Path) -> None:
    keys = await service_identities(tmp_path / "keys", "svc", "alice")
    service = IATP("file", key_path=str(tmp_path / "keys"), passphrase=PASSPHRASE)
    await service.open()
    key_id = keys["alice"].identity("alice").key_id
    before = await keys["alice"].sign("alice", {"n": 1}, topic="t")
    assert (await service.verify(before)).valid
    admin = IATP("file", key_path=str(tmp_path / "keys"), passphrase=PASSPHRASE)
    await admin.revoke_key(key_id, reason="compromised")
    assert await service.refresh_keys() == 1
    after = await keys["alice"].sign("alice", {"n": 2}, topic="t")
    result = await service.verify(after)
    assert (result.valid, result.reason) == (False, Reason.REVOKED_KEY)
    # Whoever edits the file back cannot un-revoke the key in the running service.
    agents = tmp_path / "keys" / "agents"
    for path in agents.glob("*.json"):
        doc = json.loads(path.read_text())
        for key in doc.get("keys", {}).values() if isinstance(doc.get("keys"), dict) else doc.get("keys", []):
            if isinstance(key, dict):
                key["revoked_at"] = None
        path.write_text(json.dumps(doc))
        os.chmod(path, 0o600)
    await service.refresh_keys()
    again = await keys["alice"].sign("alice", {"n": 3}, topic="t")
    assert (await service.verify(again)).reason == Reason.REVOKED_KEY


async def test_a_key_store_that_cannot_be_read_refuses_every_message_after_the_bound(tmp_path: Path) -> None:
    """Revocations cannot be vouched for without reading the store: fail closed."""
    now = [time.time_ns()]
    keys = await service_identities(tmp_path / "keys", "svc", "alice")
    service = IATP("file", key_path=str(tmp_path / "keys"), passphrase=PASSPHRASE, clock=lambda: now[0])
    await service.open()
    watch = None
    try:
        watch = asyncio.get_running_loop().create_task(service.watch_keys(0.05))
        await wait_until(lambda: service.stale_keys() is None and service.keys_read_at > 0)
        signed = await keys["alice"].sign("alice", {"n": 1}, topic="t")
        assert (await service.verify(signed)).valid
        agents = tmp_path / "keys" / "agents"
        agents.rename(tmp_path / "keys" / "moved")
        agents.write_text("not a directory")
        await wait_until(lambda: service.key_refresh_failures >= 1)
        now[0] += 1_000_000_000  # a second later: beyond 3 periods of 0.05 s without a read
        late = await keys["alice"].sign("alice", {"n": 2}, topic="t")
        result = await service.verify(late)
        assert (result.valid, result.reason) == (False, Reason.KEY_STORE_UNAVAILABLE)
    finally:
        if watch is not None:
            watch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watch
