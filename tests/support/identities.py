"""Signing identities for tests of signed traffic between agents and services."""

from __future__ import annotations

from pathlib import Path

from agent_os.iatp import IATP

PASSPHRASE = "serve-test-passphrase-0123"  # of the file key stores service processes open


async def introduce(stores: dict[str, IATP]) -> dict[str, IATP]:
    """Register each name in its own store, then give every store everyone else's public
    identity (as separate processes would exchange them); returns ``stores``."""
    for name, iatp in stores.items():
        await iatp.register_agent(name)
    for name, iatp in stores.items():
        for other, theirs in stores.items():
            if other != name:
                await iatp.add_identity(theirs.identity(other))
    return stores


async def identities(service: str, *agents: str) -> dict[str, IATP]:
    """One IATP (key store) per process, as in separate processes: each holds its own key and
    the others' public identities."""
    return await introduce({name: IATP() for name in (service, *agents)})


async def process_identities(root: Path, services: list[str], agents: list[str]) -> dict[str, IATP]:
    """A file key store per service process (``root/<service>``, passphrase
    :data:`PASSPHRASE`), an in-memory IATP per agent; each holds its own key and everyone
    else's public identity."""
    stores = {
        name: IATP("file", key_path=str(root / name), passphrase=PASSPHRASE, kdf_level="interactive")
        for name in services
    }
    stores.update({name: IATP() for name in agents})
    return await introduce(stores)


async def service_identities(path: Path, service: str, *agents: str) -> dict[str, IATP]:
    """A file key store at ``path`` for the service process (its key, the agents' public
    identities), and an in-memory IATP per agent (its key, the service's public identity)."""
    store = IATP("file", key_path=str(path), passphrase=PASSPHRASE, kdf_level="interactive")
    await store.register_agent(service)
    keys: dict[str, IATP] = {}
    for agent in agents:
        keys[agent] = IATP()
        await keys[agent].register_agent(agent)
        await keys[agent].add_identity(store.identity(service))
        await store.add_identity(keys[agent].identity(agent))
    return keys


async def make_store(path: Path, *agents: str) -> None:
    """A file key store holding keys for ``agents`` (the cheapest KDF level: tests only)."""
    iatp = IATP("file", key_path=str(path), passphrase=PASSPHRASE, kdf_level="interactive")
    for agent in agents:
        await iatp.register_agent(agent)
