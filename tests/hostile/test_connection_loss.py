"""A broker connection the client library closes for good is detected, reported unhealthy,
and opened again; a service whose broker stays away reports it on ``/healthz`` and exits
non-zero for its supervisor; the control-plane service goes on forwarding after the hostile
message that used to close its connection (issue 14, class 1)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from pathlib import Path

import nats
import pytest

from agent_os.amb import AMB
from agent_os.amb.deadletter import DLQ_REASON, DLQ_SUBJECT
from tests.support import Collector, wait_until
from tests.support.closing import Closing
from tests.support.nats_server import PrivateNats
from tests.support.processes import get, start_service
from tests.support.servers import NATS_URL

MAX_SUBJECT_BYTES = 1024  # agent_os.amb.MAX_SUBJECT_BYTES (literal: this file also runs on older code)

pytestmark = pytest.mark.nats


def tag() -> str:
    return f"h{uuid.uuid4().hex[:10]}"


def service_args(tmp_path: Path, broker: str, prefix: str) -> list[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: svc\ndefault_action: deny\nrules:\n"
        "  - {action: allow, operation: publish, resource: 'tasks.*'}\n"
        "  - {action: allow, operation: deliver, resource: 'tasks.*'}\n"
    )
    return [
        "--broker", broker, "--trust-bus", "--policy", str(policy), "--recorder", "memory",
        "--ingress-prefix", f"in_{prefix}", "--delivery-prefix", f"out_{prefix}",
        "--reply-prefix", f"re_{prefix}", "--queue", f"cp_{prefix}", "--agent-id", f"cp-{prefix}",
        "--agents", f"receiver-{prefix}",
    ]  # fmt: skip


async def stop_process(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


async def healthz(admin: str) -> int:
    status, _ = await get(admin + "/healthz", token=None)
    return status


async def test_the_control_plane_service_forwards_after_garbage_on_a_4086_character_subject(
    tmp_path: Path, closing: Closing
) -> None:
    """The defect: the dead letter of this one unauthenticated message went to
    ``_DLQ.<subject>``, over NATS's protocol line; nats-py closed the connection for good and
    the service forwarded nothing more while ``/healthz`` said 200."""
    prefix = tag()
    proc, admin = await start_service(*service_args(tmp_path, NATS_URL, prefix))
    agent = closing(AMB("nats", NATS_URL, agent_id=f"agent-{prefix}"))
    receiver = closing(AMB("nats", NATS_URL, agent_id=f"receiver-{prefix}"))
    raw = await nats.connect(NATS_URL)
    try:
        got, dead = Collector(), Collector()
        await receiver.subscribe(f"out_{prefix}.receiver-{prefix}.tasks.>", got)
        await receiver.subscribe(f"_DLQ.in_{prefix}.>", dead)
        ingress = f"in_{prefix}."
        hostile = ingress + "t" * (4086 - len(ingress))
        await raw.publish(hostile, b"\xc1 not an envelope")
        await raw.flush()
        await dead.wait_for(1, timeout=10)  # under the bounded subject, with the reason
        assert dead.metadata[0].headers[DLQ_REASON] == "malformed"
        assert dead.metadata[0].headers[DLQ_SUBJECT] == hostile[:MAX_SUBJECT_BYTES]
        await agent.connect()
        await agent.publish(f"in_{prefix}.tasks.work", "after the hostile message")
        await got.wait_for(1, timeout=10)
        assert got.messages == ["after the hostile message"]
        assert await healthz(admin) == 200
        _, metrics = await get(admin + "/metrics")
        assert f'agentos_bus_messages_malformed_total{{agent="cp-{prefix}"}} 1.0' in metrics
        assert f'agentos_bus_connected{{agent="cp-{prefix}"}} 1.0' in metrics
    finally:
        await raw.close()
        await agent.close()
        await receiver.close()
        returncode = await stop_process(proc)
    assert returncode == 0


async def test_a_connection_the_server_closes_for_good_is_opened_again(tmp_path: Path) -> None:
    """A server whose protocol line is shorter than the bus's subject bound (512 bytes here)
    answers a long subject with -ERR, and nats-py closes the connection for good: the adapter
    opens a new one and resumes the subscriptions, and says so while it is down."""
    server = PrivateNats(tmp_path, "max_control_line: 512")
    await server.start()
    client = AMB("nats", server.url)
    try:
        got = Collector()
        await client.subscribe("tasks.>", got)
        await client.publish("tasks." + "x" * 600, "refused by the server")
        await wait_until(lambda: getattr(client.broker, "reopened", 0) == 1, 10, "the connection reopened")
        await wait_until(lambda: client.healthy, 10, "the client healthy again")
        await client.publish("tasks.after", "after")
        await got.wait_for(1)
        assert got.messages == ["after"]
    finally:
        await client.close()
        await server.stop()


async def test_a_connection_closed_under_the_adapter_is_reported_unhealthy() -> None:
    client = AMB("nats", NATS_URL)
    try:
        await client.connect()
        assert client.healthy
        await client.broker.connection.close()  # type: ignore[attr-defined]
        assert not client.healthy
    finally:
        await client.close()
    assert not client.healthy


async def test_healthz_reports_a_lost_broker_and_recovers_with_it(tmp_path: Path) -> None:
    server = PrivateNats(tmp_path)
    await server.start()
    prefix = tag()
    proc, admin = await start_service(
        *service_args(tmp_path, server.url, prefix), env={"AGENTOS_BROKER_DOWN_EXIT": "0"}
    )
    receiver = AMB("nats", server.url, agent_id=f"receiver-{prefix}")
    try:
        assert await healthz(admin) == 200
        await server.stop()

        async def status_is(code: int) -> bool:
            return await healthz(admin) == code

        await wait_until(lambda: status_is(503), timeout=10, what="/healthz 503")
        await server.start()
        await wait_until(lambda: status_is(200), timeout=15, what="/healthz 200 again")
        got = Collector()
        await receiver.subscribe(f"out_{prefix}.receiver-{prefix}.tasks.>", got)
        async with AMB("nats", server.url) as agent:
            await agent.publish(f"in_{prefix}.tasks.work", "after the outage")
            await got.wait_for(1, timeout=10)
    finally:
        await receiver.close()
        await stop_process(proc)
        await server.stop()


async def test_a_service_whose_broker_stays_away_exits_non_zero(tmp_path: Path) -> None:
    server = PrivateNats(tmp_path)
    await server.start()
    prefix = tag()
    proc, _admin = await start_service(
        *service_args(tmp_path, server.url, prefix), env={"AGENTOS_BROKER_DOWN_EXIT": "2"}
    )
    try:
        await server.stop()
        returncode = await asyncio.wait_for(proc.wait(), 20)
        assert returncode == 1
        assert proc.stderr is not None
        assert "BrokerUnavailable" in (await proc.stderr.read()).decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            await stop_process(proc)
        await server.stop()
