"""``agent-os run SCRIPT``: one agent in its own OS sandbox, governed by a kernel in this process.

The script defines ``async def main(agent, **args)`` (``--entry`` names another); it runs in a
bubblewrap sandbox whose only way out is this process's kernel (``docs/sandbox.md``,
Sandboxed agents). Its output lines go to stderr, prefixed with the agent's id; its result is
printed as JSON. Exit codes: 0 the agent completed; 1 it failed, was killed or could not start
(the reason is printed); 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Final

import click

from agent_os.commands.submit import parse_params
from agent_os.services._process import (
    FiniteRange,
    Verification,
    broker_backend,
    service_client,
    stop_signals,
    verification_from_options,
    verification_options,
)
from agent_os.services.control_plane_service._options import kernel_options, recorder_from_spec

COMPLETED: Final = 0
FAILED: Final = 1
_MiB: Final = 1 << 20


def _print_line(agent_id: str, line: str) -> None:
    click.echo(f"[{agent_id}] {line}", err=True)


@click.command()
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.option("--entry", default="main", show_default=True, help="The async function the script runs.")
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="A keyword argument of the entry function (repeatable); VALUE is JSON when it parses.",
)
@click.option("--agent-id", default=None, help="The agent's id (default: the script's name).")
@click.option(
    "--broker",
    default="memory://",
    show_default=True,
    help="The agent's bus: nats://host:4222, redis://, kafka://, memory:// (this process only).",
)
@verification_options
@kernel_options
@click.option(
    "--sandbox-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="The host directory the agent sees as /workspace (handed to its uid); default: a fresh one.",
)
@click.option("--memory", type=click.IntRange(16), default=1024, show_default=True, help="MiB per process.")
@click.option("--cpu-seconds", type=click.IntRange(1), default=300, show_default=True)
@click.option("--processes", type=click.IntRange(1), default=64, show_default=True)
@click.option("--open-files", type=click.IntRange(8), default=256, show_default=True)
@click.option(
    "--timeout", type=FiniteRange(0, 1e9, min_open=True), default=300.0, show_default=True, help="Seconds."
)
def main(
    script: str,
    entry: str,
    args: tuple[str, ...],
    agent_id: str | None,
    broker: str,
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None,
    nonce_prefix: str,
    key_refresh: float,
    verify_workers: int,
    permissions: frozenset[str] | None,
    policy: Any,
    workspace: str,
    recorder: str,
    sandbox_dir: str | None,
    memory: int,
    cpu_seconds: int,
    processes: int,
    open_files: int,
    timeout: float,
) -> None:
    """Run SCRIPT's agent in an OS sandbox (no network, read-only root, its own workspace and
    limits) whose publishes, requests and actions all pass this process's kernel. Prints the
    result as JSON. Exit 0: completed; 1: failed, killed or could not start; 2: bad usage."""
    from agent_os.control_plane.sandbox import SandboxLimits, SandboxSpec

    try:
        broker_backend(broker)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--broker'") from None
    local = broker.startswith("memory://")
    verification = (
        Verification(identities, None, True)
        if local and identities is None and not verify_workers
        else verification_from_options(
            identities, trust_bus, nonce_store, nonce_prefix, key_refresh, verify_workers
        )
    )
    limits = SandboxLimits(
        memory=memory * _MiB, cpu_seconds=cpu_seconds, processes=processes, open_files=open_files
    )
    spec = SandboxSpec(workspace=sandbox_dir, limits=limits)
    kwargs = parse_params(args)
    name = agent_id or Path(script).stem
    outcome = asyncio.run(
        _run(
            script,
            entry,
            kwargs,
            name,
            broker,
            verification,
            permissions,
            policy,
            workspace,
            recorder,
            spec,
            timeout,
        )
    )
    click.echo(json.dumps(outcome, default=repr, ensure_ascii=False))
    sys.exit(COMPLETED if outcome["status"] == "completed" else FAILED)


async def _run(
    script: str,
    entry: str,
    kwargs: dict[str, Any],
    agent_id: str,
    broker: str,
    verification: Verification,
    permissions: frozenset[str] | None,
    policy: Any,
    workspace: str,
    recorder_spec: str,
    spec: Any,
    timeout: float,
) -> dict[str, Any]:
    from agent_os.control_plane import AgentStoppedError, ControlPlaneError, KernelSpace
    from agent_os.control_plane.errors import SandboxedAgentError
    from agent_os.control_plane.kernel.supervisor import SandboxSupervisor

    outcome: dict[str, Any] = {"agent": agent_id}
    try:
        recorder = recorder_from_spec(recorder_spec, retention_days=None)
        async with (
            verification.opened(agent_id) as iatp,
            KernelSpace(policy, flight_recorder=recorder, workspace=workspace, timeout=timeout) as kernel,
            stop_signals() as stop,
        ):
            kernel.sandboxes = SandboxSupervisor(kernel, output=_print_line)
            client = service_client(broker, agent_id, iatp)
            target = script if entry == "main" else f"{script}:{entry}"
            spawned = await kernel.spawn(target, sandbox=spec, bus=client, permissions=permissions, **kwargs)
            waiting = asyncio.ensure_future(kernel.wait_all([spawned]))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():  # SIGINT or SIGTERM: the agent is killed, as by SIGKILL
                await kernel.send_signal(spawned, "SIGKILL")
            stopping.cancel()
            try:
                [result] = await waiting
                outcome.update(status="completed", result=result)
            except SandboxedAgentError as exc:
                outcome.update(status=exc.details.get("status", "failed"), reason=exc.reason)
            except AgentStoppedError as exc:
                outcome.update(status="killed", reason=str(exc))
    except ControlPlaneError as exc:  # cannot sandbox here, a bad spec, the recorder: nothing ran
        outcome.update(status="not_started", reason=f"{type(exc).__name__}: {exc}")
    return outcome
