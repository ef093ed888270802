"""The embedded PostgreSQL: the ``pgserver`` wheel (PostgreSQL 16 with pgvector), no server to
install; one server per data directory and process (see ``docs/memory.md``)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

from agent_os.emk.errors import ConfigError, StorageUnavailable


def default_data_dir() -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import platformdirs

    return Path(platformdirs.user_data_path("agent-os")) / "emk"


def _start(data_dir: str | None) -> tuple[Any, str]:
    path = Path(data_dir).expanduser() if data_dir else default_data_dir()
    with warnings.catch_warnings():
        # pgserver computes a runtime path at import; without XDG_RUNTIME_DIR platformdirs warns
        # and falls back to /tmp/runtime-<uid>, which is fine for a lock file.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import pgserver
        except ImportError:
            raise ConfigError("embedded storage needs: pip install 'agent-os[embedded]'") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.postgres_server.get_server(path, cleanup_mode="stop")
    return server, server.get_uri("postgres")


async def start_embedded(data_dir: str | None) -> tuple[Any, str]:
    """Start (or join) the embedded server for ``data_dir``; return it and its connection URI.

    Raises ConfigError when pgserver is not installed, StorageUnavailable when it fails to start.
    """
    try:
        return await asyncio.to_thread(_start, data_dir)
    except ConfigError:
        raise
    except Exception as exc:
        raise StorageUnavailable(f"the embedded PostgreSQL in {data_dir} did not start: {exc!r}") from exc
