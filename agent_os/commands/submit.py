"""``agent-os submit ACTION TARGET``: one action through a kernel, its result printed as JSON.

Exit codes: 0 the action was done; 1 it was allowed but failed (or a record could not be
stored); 2 bad usage (unknown action, bad ``--param``, bad option); 3 denied.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Final

import click

from agent_os.services.control_plane_service._options import (
    kernel_options,
    recorder_from_spec,
)

DONE: Final = 0
FAILED: Final = 1
DENIED: Final = 3


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as params: VALUE is JSON when it parses (``true``, ``3``,
    ``"quoted"``, ``[...]``, ``{...}``), else the text itself. Raises click.BadParameter for a
    pair without ``=``, an empty key, or a key given twice."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="'--param'")
        if key in params:
            raise click.BadParameter(f"{key!r} is given twice", param_hint="'--param'")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    return repr(value)


@click.command()
@click.argument("action")
@click.argument("target")
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="An action param (repeatable); VALUE is JSON when it parses (true, 3, [..]), else text.",
)
@click.option("--agent", default="cli", show_default=True, help="The acting agent's name.")
@kernel_options
def main(
    action: str,
    target: str,
    params: tuple[str, ...],
    agent: str,
    permissions: frozenset[str] | None,
    policy: Any,
    workspace: str,
    recorder: str,
) -> None:
    """Submit one action (fs.read, fs.write, ...) on TARGET through a kernel and print the
    result as JSON. Exit 0: done; 1: allowed but failed; 2: bad usage; 3: denied."""
    values = parse_params(params)
    result = asyncio.run(_submit(action, target, values, agent, permissions, policy, workspace, recorder))
    click.echo(json.dumps(result, default=_json_default, ensure_ascii=False))
    if not result["allowed"]:
        raise SystemExit(DENIED)
    if result["error"] is not None:
        raise SystemExit(FAILED)


async def _submit(
    action: str,
    target: str,
    params: dict[str, Any],
    agent: str,
    permissions: frozenset[str] | None,
    policy: Any,
    workspace: str,
    recorder_spec: str,
) -> dict[str, Any]:
    from agent_os.control_plane import ActionRequest, KernelSpace
    from agent_os.control_plane.errors import ControlPlaneError

    try:
        recorder = recorder_from_spec(recorder_spec, retention_days=None)
        async with KernelSpace(policy, flight_recorder=recorder, workspace=workspace) as kernel:
            if action not in kernel.actions:
                known = ", ".join(sorted(spec.name for spec in kernel.actions))
                raise click.UsageError(f"unknown action {action!r} (actions: {known})")
            kernel.external(agent).permissions = permissions
            result = await kernel.submit(ActionRequest(action, target, params, agent))
    except ControlPlaneError as exc:  # the recorder could not open or store: nothing was decided
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    return {
        "action": action,
        "target": target,
        "agent": agent,
        "allowed": result.allowed,
        "ok": result.ok,
        "output": result.output,
        "error": result.error,
        "record_id": result.record_id,
    }
