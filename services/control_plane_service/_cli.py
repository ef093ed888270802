"""``agent-os serve control-plane``: the command line of the control-plane service."""

from __future__ import annotations

import click

from agent_os.control_plane import ControlPlaneError, Policy
from agent_os.services._metrics import METRICS_PORTS, metrics_from_options, metrics_options
from agent_os.services._process import (
    FiniteRange,
    log_level_option,
    nonce_store_url,
    run,
    verification_from_options,
    verification_options,
)
from agent_os.services.control_plane_service._actions import TOOL_SERVICE
from agent_os.services.control_plane_service._options import (
    RECORDER_FORMS,
    RecorderParam,
    policy_option,
    read_key_file,
    recorder_from_spec,
)
from agent_os.services.control_plane_service._rate_limits import RedisRateLimits
from agent_os.services.control_plane_service._serve import serve
from agent_os.services.control_plane_service._subjects import (
    DELIVERY,
    INGRESS,
    QUEUE_GROUP,
    REPLIES,
    check_agent_id,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", required=True, help="Broker URL: memory://name, nats://host:4222, redis://, kafka://."
)
@verification_options
@policy_option
@click.option(
    "--recorder",
    type=RecorderParam(),
    default="sqlite:///flight_recorder.db",
    show_default=True,
    help=RECORDER_FORMS + ".",
)
@click.option(
    "--retention-days",
    type=FiniteRange(min=0, max=36_500),
    default=90.0,
    show_default=True,
    help="0: keep everything.",
)
@click.option(
    "--verify-interval",
    type=FiniteRange(min=0),
    default=0.0,
    show_default=True,
    help="Verify the recorder's whole chain every this many seconds (the metric "
    "agentos_recorder_chain_valid); 0: only when asked (the admin API's /verify).",
)
@click.option(
    "--encryption-key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Encrypt recorder data at rest with this 32-byte key (raw or hex).",
)
@click.option("--admin-host", default="127.0.0.1", show_default=True)
@click.option("--admin-port", type=int, default=8787, show_default=True, help="0: any free port.")
@click.option("--admin-token", envvar="AGENTOS_ADMIN_TOKEN", required=True, help="Or AGENTOS_ADMIN_TOKEN.")
@click.option("--agent-id", default="control-plane", show_default=True)
@click.option("--queue", default=QUEUE_GROUP, show_default=True, help="Queue group shared by instances.")
@click.option("--ingress-prefix", default=INGRESS, show_default=True)
@click.option("--delivery-prefix", default=DELIVERY, show_default=True)
@click.option("--reply-prefix", default=REPLIES, show_default=True)
@click.option(
    "--agents",
    callback=lambda ctx, param, value: _roster(value, param),
    help="The agents a message without a recipient goes to, comma-separated "
    "(default: the agents of --identities; none with --trust-bus).",
)
@click.option(
    "--rate-limit-store",
    envvar="AGENTOS_RATE_LIMIT_STORE",
    help="Share the policy's rule rate limits with the other instances through this Redis "
    "(redis://host:6379/0 or rediss://; or AGENTOS_RATE_LIMIT_STORE); default: per instance.",
)
@click.option(
    "--rate-limit-prefix",
    default="agentos:ratelimit:",
    show_default=True,
    help="Put before every rate-limit key in Redis: one per deployment.",
)
@click.option(
    "--workspace",
    type=click.Path(exists=True, file_okay=False),
    help="The directory of the fs.* actions, the tool service's --workspace: actions are "
    "decided here and run by the tool service (default: no fs.* actions).",
)
@click.option(
    "--tool-service",
    default=TOOL_SERVICE,
    show_default=True,
    callback=lambda ctx, param, value: _agent_id(value, param),
    help="The agent id of the tool service allowed actions are forwarded to.",
)
@metrics_options(METRICS_PORTS["control-plane"])
@log_level_option
def main(
    broker: str,
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None,
    nonce_prefix: str,
    policy: Policy,
    recorder: str,
    retention_days: float,
    verify_interval: float,
    encryption_key_file: str | None,
    admin_host: str,
    admin_port: int,
    admin_token: str,
    agent_id: str,
    queue: str,
    ingress_prefix: str,
    delivery_prefix: str,
    reply_prefix: str,
    agents: list[str] | None,
    rate_limit_store: str | None,
    rate_limit_prefix: str,
    workspace: str | None,
    tool_service: str,
    log_level: str,
    key_refresh: float,
    verify_workers: int,
    metrics_host: str,
    metrics_port: int,
    metrics_token: str | None,
    no_metrics: bool,
) -> None:
    """Run the control-plane service (mediated mode) with its admin API until SIGINT/SIGTERM."""
    verification = verification_from_options(
        identities, trust_bus, nonce_store, nonce_prefix, key_refresh, verify_workers
    )
    metrics = metrics_from_options(no_metrics, metrics_host, metrics_port, metrics_token)
    if rate_limit_store is not None:
        try:
            nonce_store_url(rate_limit_store)  # the same form: a Redis URL with a host
        except ValueError:
            raise click.BadParameter(
                f"must be a Redis URL such as redis://127.0.0.1:6379/0, not {rate_limit_store!r}",
                param_hint="--rate-limit-store",
            ) from None

    async def serve_process() -> None:
        key = read_key_file(encryption_key_file) if encryption_key_file else None
        flight_recorder = recorder_from_spec(
            recorder, retention_days=retention_days or None, encryption_key=key
        )
        async with verification.opened(agent_id) as iatp:
            await serve(
                broker=broker,
                policy=policy,
                recorder=flight_recorder,
                admin_token=admin_token,
                iatp=iatp,
                trust_bus=verification.trust_bus,
                admin_host=admin_host,
                admin_port=admin_port,
                agent_id=agent_id,
                queue=queue,
                ingress_prefix=ingress_prefix,
                delivery_prefix=delivery_prefix,
                reply_prefix=reply_prefix,
                agents=agents,
                rate_limits=RedisRateLimits(rate_limit_store, prefix=rate_limit_prefix)
                if rate_limit_store
                else None,
                workspace=workspace,
                tool_service=tool_service,
                metrics=metrics,
                verify_interval=verify_interval,
            )

    run(serve_process, log_level=log_level, errors=(ControlPlaneError,), name="control-plane")


def _agent_id(value: str, param: click.Parameter) -> str:
    try:
        return check_agent_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _roster(value: str | None, param: click.Parameter) -> list[str] | None:
    if value is None:
        return None
    agents = [a.strip() for a in value.split(",") if a.strip()]
    try:
        return [check_agent_id(a) for a in agents]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None
