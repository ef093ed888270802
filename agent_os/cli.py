"""The ``agent-os`` command line.

``agent-os demo`` runs the platform on the embedded defaults and narrates it;
``agent-os serve memory|verifier|control-plane|tools|mcp ...`` runs one of the services in
:mod:`agent_os.services` (each is also ``python -m agent_os.services.<name>_service``);
``agent-os submit``, ``run``, ``log``, ``policy validate`` and ``top`` are in :mod:`agent_os.commands`.
Services and commands are imported only when their command runs, so ``agent-os`` starts fast
with the core dependencies alone; ``docs/services.md`` describes each.
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
    "mcp": (
        "agent_os.services.mcp_service",
        "The MCP service: the kernel's governed tools and recorder queries for MCP hosts.",
    ),
}


COMMANDS: Final = {
    "submit": ("agent_os.commands.submit", "Submit one action through a kernel; print the result as JSON."),
    "run": ("agent_os.commands.run", "Run an agent script in an OS sandbox governed by a kernel."),
    "log": ("agent_os.commands.log", "Query, follow, verify or export a flight recorder."),
    "policy": ("agent_os.commands.policy", "Policies in YAML: validate a file."),
    "top": (
        "agent_os.commands.top",
        "A live view of running control-plane instances: agents, rates, decisions.",
    ),
}

# -h beside --help on every command and group (subcommands inherit the context settings).
CONTEXT: Final = {"help_option_names": ["-h", "--help"]}


class MainGroup(click.Group):
    """``agent-os``: its own commands, and those of :data:`COMMANDS`, imported on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        return _load(f"the {cmd_name} command", cmd_name, *entry)


def _load(what: str, name: str, module_name: str, summary: str) -> click.Command:
    """The ``main`` command of ``module_name``, or one that fails naming why it cannot load."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return _unavailable(what, name, summary, exc)
    command = getattr(module, "main", None)
    if not isinstance(command, click.Command):
        return _unavailable(what, name, summary, RuntimeError(f"{module_name} has no main command"))
    return command


@click.group(cls=MainGroup, context_settings=CONTEXT)
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
        return _load(f"the {cmd_name} service", cmd_name, *entry)


def _unavailable(what: str, name: str, summary: str, error: Exception) -> click.Command:
    def fail() -> None:
        raise click.ClickException(f"{what} cannot start: {type(error).__name__}: {error}")

    return click.Command(name, callback=fail, help=summary, short_help=summary)


@main.group(cls=ServiceGroup)
def serve() -> None:
    """Run a service until SIGINT/SIGTERM (then it drains in-flight requests and exits 0).

    Every service verifies senders with --identities PATH (an IATP key store; passphrase in
    AGENTOS_KEY_PASSPHRASE) and refuses to start without it unless --trust-bus is given (only
    for a broker whose ACLs already authenticate senders)."""


if __name__ == "__main__":
    main()
