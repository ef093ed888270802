"""The IATP key stores of a compose demo, made once by its ``keys`` step: one file key store per
process, each holding that process's private keys and every other agent's public identity, all
under one passphrase (``AGENTOS_KEY_PASSPHRASE``), as ``docs/services.md`` describes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import click

from agent_os.iatp import IATP

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
