"""Signing identities for tests of signed traffic between agents and services."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from agent_os.amb import AMB
from agent_os.iatp import IATP
from tests.support import Collector

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


@dataclass
class Mediated:
    """A mediated control-plane service's test setting: subject prefixes and ids unique to the
    test, the identities (``keys[agent_id]`` signs as the agent) and a policy file allowing
    ``tasks.*``; :meth:`args` are the service's command-line options for it on ``broker``."""

    tag: str
    ingress: str
    delivery: str
    service_id: str
    agent_id: str
    keys: dict[str, IATP]
    policy: Path
    key_path: Path

    @property
    def subject(self) -> str:
        """The ingress subject the tests publish on (``tasks.pay``, which the policy allows)."""
        return f"{self.ingress}.tasks.pay"

    async def observe(self, raw: AMB) -> tuple[Collector, Collector]:
        """Collectors of what the service forwards and what it dead-letters, subscribed on
        ``raw``."""
        got, dead = Collector(), Collector()
        await raw.subscribe(f"{self.delivery}.>", got)
        await raw.subscribe(f"_DLQ.{self.ingress}.>", dead)
        return got, dead

    def args(self, broker: str, *extra: str) -> list[str]:
        return [
            "--broker", broker, "--identities", str(self.key_path), "--policy", str(self.policy),
            "--recorder", "memory", "--ingress-prefix", self.ingress, "--delivery-prefix", self.delivery,
            "--reply-prefix", f"re_{self.tag}", "--queue", f"cp_{self.tag}", "--agent-id", self.service_id,
            *extra,
        ]  # fmt: skip


async def mediated(tmp_path: Path, name: str) -> Mediated:
    """A :class:`Mediated` setting under ``tmp_path`` (``name`` names the policy)."""
    tag = uuid.uuid4().hex[:10]
    service_id, agent_id = f"control-plane-{tag}", f"agent-{tag}"
    keys = await service_identities(tmp_path / "keys", service_id, agent_id)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"name: {name}\ndefault_action: deny\nrules:\n"
        "  - {action: allow, operation: publish, resource: 'tasks.*'}\n"
        "  - {action: allow, operation: deliver, resource: 'tasks.*'}\n"
    )
    return Mediated(tag, f"in_{tag}", f"out_{tag}", service_id, agent_id, keys, policy, tmp_path / "keys")
