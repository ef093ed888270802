"""``--nonce-store``: the instances of a service's queue group share replay protection in the
real Redis on 127.0.0.1:6379, so a signed message replayed to another instance is refused.

In process on the in-memory broker (which hands a queue group's messages out round-robin: the
original to one instance, the replay to the other), each instance opened the way the service
processes open theirs (``Verification.opened``); and as two control-plane service processes on
the real NATS server, where the replay reaches an instance started after the first one saw the
original.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from agent_os.amb import AMB, MsgpackSerializer
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.control_plane import KernelSpace, Pattern, Policy
from agent_os.iatp import NonceStoreUnavailable, RedisNonceStore
from agent_os.services._identity import PASSPHRASE_ENV
from agent_os.services._process import Verification
from agent_os.services.control_plane_service import ControlPlaneService
from tests.support import Collector
from tests.support.closing import Closing
from tests.support.identities import PASSPHRASE, make_store, mediated, service_identities
from tests.support.processes import get, start_service
from tests.support.servers import NATS_URL, REDIS_URL

pytestmark = pytest.mark.redis


def publish_policy() -> Policy:
    policy = Policy("nonce", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.*"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


@pytest.mark.usefixtures("redis_keys")
async def test_instances_opened_with_a_nonce_store_refuse_a_replay_across_the_group(
    tmp_path: Path,
    prefix: str,
    closing: Closing,
) -> None:
    tag = uuid.uuid4().hex[:10]
    service_id, agent_id = f"control-plane-{tag}", f"agent-{tag}"
    keys = await service_identities(tmp_path / "keys", service_id, agent_id)
    where = f"memory://nonce-{tag}"
    verification = Verification(
        str(tmp_path / "keys"), PASSPHRASE, nonce_store=REDIS_URL, nonce_prefix=prefix
    )
    async with verification.opened(service_id) as first, verification.opened(service_id) as second:
        assert first is not None
        assert second is not None
        assert first is not second  # two key stores opened, two in-memory nonce caches
        assert isinstance(first.nonce_store, RedisNonceStore)
        assert first.nonce_store.prefix == prefix
        services = []
        for iatp in (first, second):
            service = closing(
                ControlPlaneService(
                    AMB("memory", where, agent_id=service_id), KernelSpace(policy=publish_policy()), iatp=iatp
                )
            )
            await service.start()
            services.append(service)
        raw = closing(AMB("memory", where, agent_id="raw"))
        got, dead = Collector(), Collector()
        await raw.subscribe("deliver.>", got)
        await raw.subscribe("_DLQ.ingress.>", dead)
        try:
            signed = await keys[agent_id].sign(agent_id, {"transfer": 100}, topic="ingress.tasks.pay")
            data = MsgpackSerializer().encode(signed)
            await raw.broker.publish("ingress.tasks.pay", data)  # to the first instance
            await got.wait_for(1)
            await raw.broker.publish("ingress.tasks.pay", data)  # the captured copy: to the second
            await dead.wait_for(1)
            assert dead.metadata[0].headers[DLQ_REASON] == "replayed_nonce"
            assert got.messages == [{"transfer": 100}]
            assert [(s.stats.forwarded, s.unverified) for s in services] == [(1, 0), (0, 1)]
            assert services[1].iatp_middleware is not None
            assert services[1].iatp_middleware.rejected == {"replayed_nonce": 1}
        finally:
            await raw.close()
            for service in services:
                await service.stop()
                await service.kernel.close()


@pytest.mark.usefixtures("redis_keys")
@pytest.mark.nats
async def test_service_processes_with_nonce_store_refuse_a_replay_to_another_instance(
    tmp_path: Path,
    prefix: str,
    closing: Closing,
) -> None:
    """Instance one forwards the original; instance two, started afterwards (the first then
    stopped, so the replay can only reach it), refuses the replay: its own cache never saw the
    nonce, the shared store did."""
    setting = await mediated(tmp_path, "nonce")
    args = setting.args(NATS_URL, "--nonce-store", REDIS_URL, "--nonce-prefix", prefix)
    env = {PASSPHRASE_ENV: PASSPHRASE}
    raw = closing(AMB("nats", NATS_URL, agent_id=f"raw-{setting.tag}"))
    got, dead = await setting.observe(raw)
    subject = setting.subject
    agent = setting.keys[setting.agent_id]
    data = MsgpackSerializer().encode(await agent.sign(setting.agent_id, {"transfer": 100}, topic=subject))
    processes: list[asyncio.subprocess.Process] = []
    try:
        one, _ = await start_service(*args, env=env)
        processes.append(one)
        await raw.broker.publish(subject, data)
        await got.wait_for(1, timeout=10)
        two, admin_two = await start_service(*args, env=env)
        processes.append(two)
        one.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(one.wait(), 20) == 0
        await raw.broker.publish(subject, data)  # the replay: only instance two takes ingress now
        await dead.wait_for(1, timeout=10)
        assert dead.metadata[0].headers[DLQ_REASON] == "replayed_nonce"
        assert got.messages == [{"transfer": 100}]
        _, metrics = await get(admin_two + "/metrics")
        assert "agentos_control_plane_unverified_total 1.0" in metrics
        assert "agentos_control_plane_forwarded_total 0.0" in metrics
    finally:
        for proc in processes:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 20)
        await raw.close()
    assert [p.returncode for p in processes] == [0, 0]


async def test_opening_the_identities_with_a_nonce_store(tmp_path: Path) -> None:
    prefix = f"test:services:{uuid.uuid4().hex}:"  # its one key expires within a millisecond
    store = tmp_path / "keys"
    await make_store(store, "memory-service")
    opened = Verification(str(store), PASSPHRASE, nonce_store="redis://127.0.0.1:6379/0", nonce_prefix=prefix)
    async with opened.opened("memory-service") as iatp:
        assert iatp is not None
        assert isinstance(iatp.nonce_store, RedisNonceStore)
        assert iatp.nonce_store.prefix == prefix
        assert iatp.middleware().nonce_store is iatp.nonce_store  # what the services' middleware uses
    nowhere = Verification(str(store), PASSPHRASE, nonce_store="redis://127.0.0.1:1/0")
    with pytest.raises(NonceStoreUnavailable):  # checked at the start, not on the first message
        await nowhere.open("memory-service")
