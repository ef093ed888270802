"""The control-plane service's parts built from command-line options: the flight recorder, the
policy and the recorder's encryption key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from agent_os.control_plane import FlightRecorder, Policy, PolicyError
from agent_os.control_plane.errors import RecorderConfigError, RecorderError
from agent_os.control_plane.policy.loader import load_policy as load_policy_file

BUILTIN_POLICIES: Final = ("strict", "permissive", "audit")
F = TypeVar("F", bound=Callable[..., Any])
RECORDER_FORMS: Final = "memory, sqlite:///relative.db, sqlite:////abs.db, a path, or a postgresql:// DSN"
_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def recorder_storage(spec: str) -> tuple[str, str | None]:
    """The recorder storage and location ``spec`` names: ``("memory", None)``,
    ``("postgresql", dsn)`` or ``("sqlite", path)``. Raises RecorderConfigError for a URL
    whose scheme is none of these (``ftp://...`` is refused, never taken for a file name)."""
    if spec == "memory":
        return "memory", None
    if spec.startswith(("postgresql://", "postgres://")):
        return "postgresql", spec
    for prefix in ("sqlite:///", "sqlite:"):
        if spec.startswith(prefix):
            return "sqlite", spec[len(prefix) :]
    scheme = _SCHEME.match(spec)
    if scheme and (len(scheme[1]) > 1 or spec[2:3] not in ("\\", "/")):  # C:/x is a path
        raise RecorderConfigError(f"unsupported recorder URL scheme {scheme[1]!r}: {RECORDER_FORMS}")
    if not spec:
        raise RecorderConfigError(f"empty recorder: {RECORDER_FORMS}")
    return "sqlite", spec


def recorder_from_spec(
    spec: str, *, retention_days: float | None = 90, encryption_key: bytes | None = None
) -> FlightRecorder:
    """A flight recorder from ``memory``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``
    (or a plain path) or a ``postgresql://`` DSN. Raises RecorderConfigError for a bad
    combination."""
    options: dict[str, Any] = {"retention_days": retention_days, "encryption_key": encryption_key}
    storage, location = recorder_storage(spec)
    if location is None:
        return FlightRecorder(storage, **options)
    return FlightRecorder(storage, location, **options)


def reader_from_spec(spec: str, *, encryption_key: bytes | None = None) -> FlightRecorder:
    """A flight recorder that only reads the records ``spec`` names (``agent-os log``): no
    writer lock (it reads beside the service writing them), no retention, nothing written.
    Raises RecorderConfigError for a bad spec or ``memory`` (nothing to read), RecorderError
    for a SQLite file that does not exist."""
    storage, location = recorder_storage(spec)
    if storage == "memory" or location is None:
        raise RecorderConfigError("a memory recorder lives in its process: name a file or a DSN")
    if storage == "sqlite":
        if not Path(location).is_file():
            raise RecorderError(f"no such recorder file: {location!r}")
        from agent_os.control_plane.recorder.sqlite import SqliteStorage

        return FlightRecorder(SqliteStorage(location, read_only=True), None, None, True, encryption_key)
    from agent_os.control_plane.recorder.postgres import PostgresStorage

    return FlightRecorder(PostgresStorage(location, read_only=True), None, None, True, encryption_key)


def load_policy(source: str) -> Policy:
    """A policy from a built-in name (strict, permissive, audit) or a YAML file (any name).
    Raises PolicyLoadError (the line and field), or PolicyError for a source that is neither
    (naming both, so a mistyped path reads as one)."""
    if source in BUILTIN_POLICIES:
        return Policy.builtin(source)
    path = Path(source)
    if not path.is_file():
        what = "no such policy file" if not path.exists() else "not a policy file"
        raise PolicyError(f"{what}: {source!r} (or a built-in policy: {', '.join(BUILTIN_POLICIES)})")
    return load_policy_file(path)


class PolicyParam(click.ParamType[Policy]):
    """``--policy``: a built-in name or a YAML file, loaded while the command line is read, so a
    mistyped path or a bad file is a one-line usage error."""

    name = "policy"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Policy:
        if isinstance(value, Policy):
            return value
        try:
            return load_policy(str(value))
        except (PolicyError, OSError) as exc:
            self.fail(str(exc), param, ctx)


policy_option: Final = click.option(
    "--policy",
    type=PolicyParam(),
    default="strict",
    show_default=True,
    help="A policy YAML file or a built-in name (strict, permissive, audit).",
)
"""``--policy``, as every command that builds a kernel takes it (loaded while the line is read)."""


class RecorderParam(click.ParamType[str]):
    """``--recorder``: checked while the command line is read (opened when the service starts)."""

    name = "recorder"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            recorder_storage(str(value))
        except RecorderConfigError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


def read_key_file(path: str) -> bytes:
    """A 32-byte key from a file holding it raw or as 64 hex characters. Raises ValueError for
    any other content, OSError when the file cannot be read."""
    data = Path(path).read_bytes()
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    if len(data) != 32:
        raise ValueError(f"{path}: a key file holds 32 raw bytes or 64 hex characters")
    return data


def _permission_set(_ctx: click.Context, _param: click.Parameter, value: str | None) -> frozenset[str] | None:
    return None if value is None else frozenset(p.strip() for p in value.split(",") if p.strip())


def kernel_options(command: F) -> F:
    """``--permissions`` (a frozenset, None for all), ``--policy``, ``--workspace`` and
    ``--recorder``: the kernel of a command that acts as one agent (``agent-os submit``,
    ``agent-os serve mcp``)."""
    command = click.option(
        "--recorder",
        type=RecorderParam(),
        default="memory",
        show_default=True,
        help=f"Where decisions and outcomes are recorded: {RECORDER_FORMS}.",
    )(command)
    command = click.option(
        "--workspace",
        type=click.Path(exists=True, file_okay=False),
        default=".",
        show_default=True,
        help="The directory the fs.* actions act in.",
    )(command)
    command = policy_option(command)
    return click.option(
        "--permissions",
        default=None,
        metavar="P1,P2",
        callback=_permission_set,
        help="The agent's permissions (read, write, execute, network, ...); default: all (policy decides).",
    )(command)
