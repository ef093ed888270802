"""``agent-os policy validate FILE``: load a YAML policy with the policy loader and print what it
holds, or the first error with its line. Exit 0 valid, 1 invalid, 2 bad usage (no such file)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Policies in YAML (docs/control-plane.md, Policies in YAML)."""


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def validate(file: str) -> None:
    """Load FILE as a policy; print its name, rule count, default and mode, or the error (exit 1)."""
    from agent_os.control_plane.errors import PolicyError
    from agent_os.control_plane.policy.loader import load_policy

    try:
        policy = load_policy(file)
    except PolicyError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file}: cannot read: {exc}") from None
    click.echo(
        f"{file}: valid policy {policy.name!r}: {len(policy.rules)} rules, "
        f"default {policy.default_action}, mode {policy.mode}"
    )
