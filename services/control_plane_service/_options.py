"""The control-plane service's parts built from command-line options: the flight recorder, the
policy and the recorder's encryption key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent_os.control_plane import FlightRecorder, Policy
from agent_os.control_plane.policy.loader import load_policy as load_policy_file


def recorder_from_spec(
    spec: str, *, retention_days: float | None = 90, encryption_key: bytes | None = None
) -> FlightRecorder:
    """A flight recorder from ``memory``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``
    (or a plain path) or a ``postgresql://`` DSN. Raises RecorderConfigError for a bad
    combination."""
    options: dict[str, Any] = {"retention_days": retention_days, "encryption_key": encryption_key}
    if spec == "memory":
        return FlightRecorder("memory", **options)
    if spec.startswith(("postgresql://", "postgres://")):
        return FlightRecorder("postgresql", spec, **options)
    for prefix in ("sqlite:///", "sqlite:"):
        if spec.startswith(prefix):
            return FlightRecorder("sqlite", spec[len(prefix) :], **options)
    return FlightRecorder("sqlite", spec, **options)


def load_policy(source: str) -> Policy:
    """A policy from a YAML file (any name), or a built-in name (strict, permissive, audit).
    Raises PolicyLoadError (the line and field) or PolicyError."""
    path = Path(source)
    return load_policy_file(path) if path.is_file() else Policy.builtin(source)


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
