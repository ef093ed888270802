"""One control-plane service instance as a process: the service, its kernel and recorder, and
the admin API, from start to a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable

from agent_os.amb import AMB
from agent_os.amb.dispatch import stop_task
from agent_os.control_plane import FlightRecorder, KernelSpace, Policy
from agent_os.control_plane.policy.ratelimit import SharedRateLimits
from agent_os.iatp import IATP
from agent_os.services._metrics import (
    MetricsOptions,
    metrics_endpoint,
    ready_line,
    require_metrics,
    service_registry,
)
from agent_os.services._process import broker_backend, serving, stop_signals
from agent_os.services.control_plane_service._actions import TOOL_SERVICE
from agent_os.services.control_plane_service._metrics import ControlPlaneMetrics
from agent_os.services.control_plane_service._rate_limits import RedisRateLimits, share_rate_limits
from agent_os.services.control_plane_service._service import ControlPlaneService
from agent_os.services.control_plane_service._subjects import DELIVERY, INGRESS, QUEUE_GROUP, REPLIES

log = logging.getLogger("agent_os.services.control_plane")


async def serve(
    *,
    broker: str,
    policy: Policy,
    recorder: FlightRecorder,
    admin_token: str,
    iatp: IATP | None = None,
    trust_bus: bool = False,
    admin_host: str = "127.0.0.1",
    admin_port: int = 8787,
    agent_id: str = "control-plane",
    queue: str = QUEUE_GROUP,
    ingress_prefix: str = INGRESS,
    delivery_prefix: str = DELIVERY,
    reply_prefix: str = REPLIES,
    agents: Iterable[str] | None = None,
    rate_limits: SharedRateLimits | None = None,
    workspace: str | os.PathLike[str] | None = None,
    tool_service: str = TOOL_SERVICE,
    stop: asyncio.Event | None = None,
    metrics: MetricsOptions | None = None,
    verify_interval: float = 0.0,
) -> ControlPlaneService:
    """Run one service instance with its admin API until ``stop`` is set (or SIGINT/SIGTERM),
    then finish in-flight messages, stop the admin API and close the recorder (its last batch
    written). With ``iatp`` (holding the service's signing key ``agent_id`` and the agents'
    public identities) every message is verified and the recorder signs its heads with the
    service's key; without it ``trust_bus`` must be true.
    ``agents``: the roster a message without a recipient is delivered to (see
    :class:`ControlPlaneService`). ``rate_limits``: where the policy's rule rate limits are
    kept, shared with the other instances (a :class:`RedisRateLimits`, checked to answer at the
    start, closed at the end). ``workspace``: the directory of the ``fs.*`` actions, as the
    tool service ``tool_service`` has it (actions are decided here, run there). With
    ``metrics``, serves ``/metrics`` and ``/healthz`` there too (``docs/observability.md``); the
    admin API's ``/metrics`` serves the same metrics either way. ``verify_interval`` (seconds;
    0: never): verify the recorder's chain that often (its result is a metric; a broken chain
    is logged as an error). Prints ``ready
    admin=http://host:port`` (then `` metrics=<url>``) on stdout once it takes messages;
    returns the service (its ``stats``). Raises VerificationRequired (neither or both of
    ``iatp`` and ``trust_bus``), PolicyLoadError, RecorderError, KernelError (a ``workspace``
    that is no directory), ValueError (an agent id or prefix unusable in a subject),
    ImportError naming the extra to install, or a bus error when it cannot start."""
    from agent_os.control_plane.admin import AdminAPI

    require_metrics()  # the admin API's /metrics needs them too

    held = iatp.registry.signing_key(agent_id) if iatp is not None else None
    if held is not None and recorder.public_key is None:
        recorder.set_signing_key(held[1])  # the recorder signs its heads with the service's key
    kernel = KernelSpace(policy=policy, flight_recorder=recorder, workspace=workspace)
    if rate_limits is not None:
        share_rate_limits(kernel.policy, rate_limits)  # kept across admin reloads (in place)
    client = AMB(broker_backend(broker), broker, agent_id=agent_id)
    service = ControlPlaneService(
        client,
        kernel,
        ingress_prefix=ingress_prefix,
        delivery_prefix=delivery_prefix,
        reply_prefix=reply_prefix,
        queue=queue,
        iatp=iatp,
        trust_bus=trust_bus,
        agents=agents,
        tool_service=tool_service,
    )
    registry = service_registry([client], ControlPlaneMetrics(service))
    admin = AdminAPI(
        kernel,
        admin_token,
        require_verified_sender=iatp is not None,
        health=lambda: client.healthy,
        registry=registry,
    )
    async with stop_signals(stop) as stopping:
        try:
            await kernel.recorder.open()
            if isinstance(rate_limits, RedisRateLimits):
                await rate_limits.ping()  # fail at the start, not on every rate-limited message
            await service.start()
            port = await admin.start(admin_host, admin_port)
            log.info(
                "control-plane service %s on %s; admin API on %s:%d; senders %s",
                agent_id,
                broker,
                admin_host,
                port,
                "taken from the trusted bus" if trust_bus else "verified by IATP",
            )
            async with (
                metrics_endpoint(metrics, registry, lambda: client.healthy) as url,
                verifying(kernel.recorder, verify_interval),
            ):
                await serving(
                    stopping,
                    ready_line(f"ready admin=http://{admin_host}:{port}", url),
                    log,
                    "finishing in-flight messages",
                    client=client,
                )
        finally:
            await admin.stop()
            await service.stop()
            await kernel.close()
            if isinstance(rate_limits, RedisRateLimits):
                await rate_limits.close()
    return service


@contextlib.asynccontextmanager
async def verifying(recorder: FlightRecorder, interval: float) -> AsyncIterator[None]:
    """Verify ``recorder``'s chain every ``interval`` seconds inside the block (0: never); a
    broken chain, or a verification that fails, is logged as an error and tried again next time."""
    if interval <= 0:
        yield
        return

    async def every() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = await recorder.verify()
            except Exception as exc:
                log.error("verifying the flight recorder's chain failed: %r", exc)
                continue
            if not result.ok:
                log.error("the recorder's chain is broken at %s: %s", result.first_bad_seq, result.reason)

    task = asyncio.get_running_loop().create_task(every(), name="verify-recorder")
    try:
        yield
    finally:
        await stop_task(task)
