"""What the compose demos' programs share: their IATP key stores, made once by a demo's ``keys``
step (one file key store per process, each holding that process's private keys and every other
agent's public identity, all under one passphrase, ``AGENTOS_KEY_PASSPHRASE``, as
``docs/services.md`` describes), and running a scenario to its end or, with ``--keep-running``,
until SIGINT/SIGTERM, traced as the services are when the ``OTEL_*`` variables say so."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from agent_os.amb import tracing
from agent_os.iatp import IATP
from agent_os.services._process import stop_signals

F = TypeVar("F", bound=Callable[..., Any])
Scenario = Callable[[asyncio.Event | None], Coroutine[Any, Any, Any]]

KEEP_RUNNING_ENV: Final = "AGENTOS_DEMO_KEEP_RUNNING"
"""Set to true (or 1, yes) for a demo's ``--keep-running``: how the compose files choose it."""
DONE: Final = ".complete"
"""Written last into the keys directory: its stores are whole."""


async def make_key_stores(
    root: Path, stores: Mapping[str, Sequence[str]], passphrase: str, *, kdf_level: str = "moderate"
) -> bool:
    """Create ``root/<store>`` for each entry of ``stores`` (store name -> the agents whose
    private keys it holds), each also holding the public identity of every agent of the other
    stores. Returns False, changing nothing, when ``root`` already holds finished stores (a
    second ``docker compose up``). Raises click.ClickException when ``root`` holds a store
    but no mark of completion (a run that died half way: remove the volume), and the key
    store's errors."""
    if not await asyncio.to_thread(_prepare, root, list(stores)):
        return False
    opened = {
        name: IATP("file", key_path=str(root / name), passphrase=passphrase, kdf_level=kdf_level)
        for name in stores
    }
    for name, agents in stores.items():
        for agent in agents:
            await opened[name].register_agent(agent)
    for name, iatp in opened.items():
        for other, agents in stores.items():
            if other != name:
                for agent in agents:
                    await iatp.add_identity(opened[other].identity(agent))
    done = "".join(f"{name}: {len(agents)} agents\n" for name, agents in stores.items())
    await asyncio.to_thread((root / DONE).write_text, done)
    return True


def _prepare(root: Path, names: list[str]) -> bool:
    """Make ``root`` for new stores: False when it holds finished ones; raises ClickException
    when it holds unfinished ones."""
    if (root / DONE).exists():
        return False
    leftovers = [name for name in names if (root / name).exists()]
    if leftovers:
        raise click.ClickException(
            f"{root} holds unfinished key stores ({', '.join(leftovers)}): remove them "
            "(docker compose down -v) and start again"
        )
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return True


def passphrase_from_env() -> str:
    """The key stores' passphrase from ``AGENTOS_KEY_PASSPHRASE``; raises click.UsageError
    when it is not set."""
    from agent_os.services._identity import PASSPHRASE_ENV

    value = os.environ.get(PASSPHRASE_ENV)
    if not value:
        raise click.UsageError(f"the key stores' passphrase must be in {PASSPHRASE_ENV}")
    return value


def keep_running_option(what: str) -> Callable[[F], F]:
    """``--keep-running/--no-keep-running`` (or :data:`KEEP_RUNNING_ENV`): ``what`` the program
    goes on doing after its story, until SIGINT/SIGTERM."""
    return click.option(
        "--keep-running/--no-keep-running",
        envvar=KEEP_RUNNING_ENV,
        default=False,
        help=f"After the scenario, {what} until SIGINT/SIGTERM. Or {KEEP_RUNNING_ENV}=true.",
    )


def run_program(
    scenario: Scenario, *, keep_running: bool, errors: tuple[type[Exception], ...], name: str
) -> None:
    """Run ``scenario(stop)`` to its end: ``stop`` is None when it ends by itself (a signal
    stops it the usual way), else an event SIGINT and SIGTERM set. Traced as the services are
    (``tracing.configured``: the ``OTEL_*`` variables; service name ``agent-os-<name>`` unless
    they name one; the last spans exported at the end). ``errors`` become one line,
    ``Error: <Type>: <message>`` (exit 1); so does a tracing configuration it cannot serve."""

    async def main() -> None:
        if not keep_running:
            await scenario(None)
            return
        async with stop_signals() as stop:
            await scenario(stop)

    caught: tuple[type[Exception], ...] = (*errors, ValueError)  # ValueError: a bad OTEL_* setting
    try:
        with tracing.configured(f"agent-os-{name}"):
            asyncio.run(main())
    except caught as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


def keys_step(directory: Path, stores: Mapping[str, Sequence[str]]) -> None:
    """A demo's ``keys`` command: :func:`make_key_stores` in ``directory`` with the passphrase
    of the environment, and one line saying what it did."""
    made = asyncio.run(make_key_stores(directory, stores, passphrase_from_env()))
    click.echo(f"key stores {'made' if made else 'already'} in {directory}: {', '.join(stores)}")


def bus_options(whose: str) -> Callable[[F], F]:
    """``--broker`` (a NATS URL) and ``--identities`` (``whose`` key store; the callback gets a
    Path) for a demo program's ``run`` command."""

    def add(command: F) -> F:
        command = click.option(
            "--identities",
            required=True,
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help=f"{whose} key store (passphrase in AGENTOS_KEY_PASSPHRASE).",
        )(command)
        return click.option("--broker", required=True, help="The NATS URL, nats://host:4222.")(command)

    return add
