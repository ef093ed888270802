"""Rule rate limits shared by the instances of a queue group through the real Redis: two
instances with a 3-per-minute rule let 3 through, not 6; concurrent takes never overshoot; an
unreachable store denies (fail closed), counted, with the reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from click.testing import CliRunner

from agent_os.amb import AMB
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.control_plane import KernelSpace, Pattern, Policy
from agent_os.control_plane.errors import RateLimitExceeded
from agent_os.services.control_plane_service import (
    ControlPlaneService,
    RedisRateLimits,
    delivery_subject,
    ingress_subject,
    main,
    share_rate_limits,
)
from tests.support import Collector, memory_url, wait_until
from tests.support.cleanup import delete_redis_keys
from tests.support.closing import Closing
from tests.support.nats_private import free_port
from tests.support.servers import REDIS_URL

pytestmark = pytest.mark.redis


@pytest.fixture
async def store() -> AsyncIterator[RedisRateLimits]:
    prefix = f"t{uuid.uuid4().hex[:12]}:rl:"
    # The tests are about counts, not speed: a loaded machine must not turn takes into timeouts
    # (denials, fail closed) where the 0.5 s default is meant for a production store.
    limits = RedisRateLimits(REDIS_URL, prefix=prefix, timeout=10.0)
    try:
        yield limits
    finally:
        await limits.close()
        await delete_redis_keys(REDIS_URL, key_prefix=prefix)


def limited_policy() -> Policy:
    policy = Policy("limited", default_action="deny")
    policy.add_rule("allow", Pattern("publish", "tasks.limited"), rate_limit="3/1m", name="three-a-minute")
    policy.add_rule("allow", Pattern("publish", "tasks.free"))
    policy.add_rule("allow", Pattern("deliver", "tasks.*"))
    return policy


async def group(where: str, limits: RedisRateLimits, instances: int = 2) -> list[ControlPlaneService]:
    services = []
    for i in range(instances):
        kernel = KernelSpace(policy=limited_policy())
        share_rate_limits(kernel.policy, limits)
        service = ControlPlaneService(
            AMB("memory", where, agent_id=f"cp{i}"), kernel, trust_bus=True, agents=["receiver"]
        )
        await service.start()
        services.append(service)
    return services


async def stop(services: list[ControlPlaneService], *clients: AMB) -> None:
    for client in clients:
        await client.close()
    for service in services:
        await service.stop()
        await service.kernel.close()


async def test_two_instances_with_a_three_per_minute_rule_let_three_through(store: RedisRateLimits) -> None:
    where = memory_url("shared-rl")
    got, dead = Collector(), Collector()
    services = await group(where, store)
    agent = AMB("memory", where, agent_id="agent-a")
    receiver = AMB("memory", where, agent_id="receiver")
    watcher = AMB("memory", where)
    try:
        await receiver.subscribe(delivery_subject("tasks.>", agent="receiver"), got)
        await watcher.subscribe("_DLQ.>", dead)
        for i in range(10):
            await agent.publish(ingress_subject("tasks.limited"), i)
        await wait_until(lambda: len(got.messages) + len(dead.messages) >= 10, what="every message decided")
        assert len(got.messages) == 3
        assert {m.headers[DLQ_REASON] for m in dead.metadata} == {"rate_limited"}
        assert all(len(s.kernel.agents()) > 0 for s in services)  # both instances took messages
        # A reload (the admin API's, in place) keeps the shared buckets: still nothing more.
        for service in services:
            service.kernel.reload_policy(limited_policy())
        await agent.publish(ingress_subject("tasks.limited"), "after the reload")
        await agent.publish(ingress_subject("tasks.limited"), "after the reload")
        await dead.wait_for(9)
        assert len(got.messages) == 3
        # Another agent has its own buckets.
        other = AMB("memory", where, agent_id="agent-b")
        try:
            await other.publish(ingress_subject("tasks.limited"), "b")
            await got.wait_for(4)
        finally:
            await other.close()
        assert store.taken == 4
        assert store.failures == 0
    finally:
        await stop(services, agent, receiver, watcher)


async def test_concurrent_takes_across_kernels_never_overshoot(
    store: RedisRateLimits, closing: Closing
) -> None:
    kernels = [closing(KernelSpace(policy=limited_policy())) for _ in range(3)]
    for kernel in kernels:
        share_rate_limits(kernel.policy, store)
    outcomes: list[bool] = []

    async def act(kernel: KernelSpace) -> None:
        try:
            await kernel.gate.authorize("publish", "tasks.limited", {"agent_id": "burst"})
        except RateLimitExceeded:
            outcomes.append(False)
        else:
            outcomes.append(True)

    try:
        await asyncio.gather(*(act(kernels[i % 3]) for i in range(60)))
        assert outcomes.count(True) == 3
        denied = [await k.recorder.query(filters={"data.decision": "deny"}) for k in kernels]
        assert sum(len(d) for d in denied) == 57  # each denial recorded once, with the reason
        assert all("rate limit" in r.data["reason"] for each in denied for r in each)
    finally:
        for kernel in kernels:
            await kernel.close()


async def test_an_unreachable_store_denies_and_counts() -> None:
    dead_store = RedisRateLimits(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    where = memory_url("shared-rl-down")
    got, dead = Collector(), Collector()
    services = await group(where, dead_store, instances=1)
    agent = AMB("memory", where, agent_id="agent-a")
    receiver = AMB("memory", where, agent_id="receiver")
    watcher = AMB("memory", where)
    try:
        await receiver.subscribe(delivery_subject("tasks.>", agent="receiver"), got)
        await watcher.subscribe("_DLQ.>", dead)
        for i in range(3):
            await agent.publish(ingress_subject("tasks.limited"), i)
        await agent.publish(ingress_subject("tasks.free"), "no limit: no store needed")
        await dead.wait_for(3)
        await got.wait_for(1)
        assert got.messages == ["no limit: no store needed"]
        assert {m.headers[DLQ_REASON] for m in dead.metadata} == {"rate_limited"}
        kernel = services[0].kernel
        assert kernel.gate.rate_store_failures == 3
        assert dead_store.failures == 3
        denied = await kernel.recorder.query(filters={"data.decision": "deny"})
        assert [r.data["reason"].startswith("rate limit store unavailable") for r in denied] == [True] * 3
        with pytest.raises(ConnectionError, match="does not answer"):
            await dead_store.ping()
    finally:
        await stop(services, agent, receiver, watcher)
        await dead_store.close()


def test_the_cli_refuses_a_rate_limit_store_that_is_not_redis() -> None:
    result = CliRunner().invoke(
        main,
        [
            "--broker",
            "memory://x",
            "--trust-bus",
            "--admin-token",
            "t" * 20,
            "--rate-limit-store",
            "http://x",
        ],
    )
    assert result.exit_code == 2
    assert "--rate-limit-store" in result.output
