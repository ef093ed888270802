"""One writer per SQLite recorder file: an exclusive lock file held for the recorder's life.

``<database>.lock`` (beside the database's real path, so a symlink names the same lock) is
locked with ``flock``; the operating system releases the lock when its holder closes it or
dies, so a crashed writer never leaves a stale lock. The holder writes who it is (pid, host,
when) into the file, so a refused writer can name it. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from agent_os.control_plane.errors import RecorderError, RecorderInUse


class WriterLock:
    """The exclusive lock of ``path`` (a lock file). :meth:`acquire` raises RecorderInUse
    naming the file and the holder when another recorder holds it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, database: str) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RecorderError(f"cannot open the writer lock {str(self.path)!r}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RecorderInUse(
                f"the flight recorder {database!r} is already open for writing by {holder} "
                f"(lock file {str(self.path)!r}): one recorder writes a file at a time"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise RecorderError(f"cannot lock {str(self.path)!r}: {exc}") from exc
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(data['pid'])} on host {str(data['host'])!r}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another recorder (its pid is not recorded yet)"
