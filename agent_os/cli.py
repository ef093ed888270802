"""The ``agent-os`` command line."""

from __future__ import annotations

import asyncio
import logging

import click

from agent_os import __version__


@click.group()
def main() -> None:
    """Agent OS: a governed message bus for AI agents."""


@main.command()
def version() -> None:
    """Print the installed version."""
    click.echo(f"agent-os {__version__}")


@main.command()
def demo() -> None:
    """Run a small multi-agent scenario on the in-memory broker and narrate it."""
    from agent_os.demo import run_demo

    # The demo narrates dead letters itself; the bus's own warning would repeat them.
    logging.getLogger("amb").setLevel(logging.ERROR)
    asyncio.run(run_demo(click.echo))


if __name__ == "__main__":
    main()
