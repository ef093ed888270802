"""The ``agent-os`` command line.

``agent-os demo`` runs the platform on the embedded defaults and narrates it;
``agent-os serve memory|verifier|control-plane|tools ...`` runs one of the services in
:mod:`agent_os.services` (each is also ``python -m agent_os.services.<name>_service``).
The services are imported only when their command runs, so ``agent-os`` starts fast with
the core dependencies alone; ``docs/services.md`` describes each.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Final

import click

from agent_os import __version__

SERVICES: Final = {
    "memory": (
        "agent_os.services.memory_service",
        "The memory service: EMK over the bus (emk.store, emk.search, ...).",
    ),
    "verifier": (
        "agent_os.services.verifier_service",
        "The verifier service: a CMVK panel answering cmvk.verify.",
    ),
    "control-plane": (
        "agent_os.services.control_plane_service",
        "The control-plane service (mediated mode) with its admin API.",
    ),
    "tools": (
        "agent_os.services.tool_service",
        "The tool service: runs the actions the control-plane service allowed (mediated mode).",
    ),
}


# -h beside --help on every command and group (subcommands inherit the context settings).
CONTEXT: Final = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="agent-os", message="%(prog)s %(version)s")
def main() -> None:
    """Agent OS: a governed message bus for AI agents."""


@main.command()
@click.option(
    "--embedder",
    type=click.Choice(["auto", "local", "hashing"]),
    default="auto",
    show_default=True,
    help="EMK embeddings: the local model when installed (auto), or the deterministic hashing one.",
)
def demo(embedder: str) -> None:
    """Run the platform on the in-memory broker and narrate it: signed messages, policy,
    signals, the flight recorder, memory and agreement."""
    from agent_os.demo import run_demo

    # The demo narrates dead letters and refusals itself; the bus's own warnings would repeat them.
    for name in ("agent_os.amb", "agent_os.control_plane", "agent_os.services"):
        logging.getLogger(name).setLevel(logging.ERROR)
    asyncio.run(run_demo(click.echo, embedder=embedder))


class ServiceGroup(click.Group):
    """``serve``'s subcommands: each service module's ``main`` command, imported on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SERVICES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = SERVICES.get(cmd_name)
        if entry is None:
            return None
        module_name, summary = entry
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return _unavailable(cmd_name, summary, exc)
        command = getattr(module, "main", None)
        if not isinstance(command, click.Command):
            return _unavailable(cmd_name, summary, RuntimeError(f"{module_name} has no main command"))
        return command


def _unavailable(name: str, summary: str, error: Exception) -> click.Command:
    def fail() -> None:
        raise click.ClickException(f"the {name} service cannot start: {type(error).__name__}: {error}")

    return click.Command(name, callback=fail, help=summary, short_help=summary)


@main.group(cls=ServiceGroup)
def serve() -> None:
    """Run a service until SIGINT/SIGTERM (then it drains in-flight requests and exits 0).

    Every service verifies senders with --identities PATH (an IATP key store; passphrase in
    AGENTOS_KEY_PASSPHRASE) and refuses to start without it unless --trust-bus is given (only
    for a broker whose ACLs already authenticate senders)."""


if __name__ == "__main__":
    main()
