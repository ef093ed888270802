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


def _import_pgserver() -> Any:
    """pgserver, once every package of the ``embedded`` extra is known to import (a missing one
    is named with the extra, not left to fail later as a bare ModuleNotFoundError)."""
    with warnings.catch_warnings():
        # pgserver computes a runtime path at import; without XDG_RUNTIME_DIR platformdirs warns
        # and falls back to /tmp/runtime-<uid>, which is fine for a lock file.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import pgserver
            import pgvector.psycopg  # noqa: F401
            import platformdirs  # noqa: F401
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"embedded storage needs {exc.name or 'pgserver'}: pip install 'agent-os[embedded]'"
            ) from None
    return pgserver


def _start(data_dir: str | None) -> tuple[Any, str]:
    pgserver = _import_pgserver()
    path = Path(data_dir).expanduser() if data_dir else default_data_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.postgres_server.get_server(path, cleanup_mode="stop")
    return server, server.get_uri("postgres")


async def start_embedded(data_dir: str | None) -> tuple[Any, str]:
    """Start (or join) the embedded server for ``data_dir``; return it and its connection URI.

    Raises ConfigError naming the ``embedded`` extra when a package of it is missing,
    StorageUnavailable when it fails to start.
    """
    try:
        return await asyncio.to_thread(_start, data_dir)
    except ConfigError:
        raise
    except Exception as exc:
        raise StorageUnavailable(f"the embedded PostgreSQL in {data_dir} did not start: {exc!r}") from exc
