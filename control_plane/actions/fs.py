"""The ``fs.*`` providers: read, write, delete and list files inside a :class:`Workspace`.

``FileSystem(root, ...)`` holds the workspace and its limits; ``register(registry)`` registers
``fs.read`` and ``fs.list`` (permission ``read``) and ``fs.write`` and ``fs.delete``
(permission ``write``), and with a snapshot store ``fs.rollback`` (``write``), which undoes a
write or a delete (:mod:`agent_os.control_plane.actions.snapshots`). Every operation goes
through directory file descriptors opened without following symlinks (see
:mod:`agent_os.control_plane.actions.workspace`); writes are atomic (a temporary file in the
same directory, renamed over the target).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from agent_os.amb.numbers import whole
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.actions.snapshots import (
    RollbackRefused,
    Snapshot,
    SnapshotError,
    SnapshotStore,
    digest,
)
from agent_os.control_plane.actions.workspace import Workspace, describe
from agent_os.control_plane.errors import KernelError
from agent_os.control_plane.process import RUNNING_AGENT

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest

Kind = Literal["read", "write", "delete", "list"]
_T = TypeVar("_T")

MAX_READ: Final = 10 * 2**20
MAX_WRITE: Final = 10 * 2**20
MAX_ENTRIES: Final = 10_000
_FILE_FLAGS: Final = os.O_NOFOLLOW | os.O_CLOEXEC


class FsError(Exception):
    """A file operation failed; the message names only the request's target."""


class FileSystem:
    """The ``fs.*`` actions rooted at ``root`` (an existing directory, resolved once).

    ``max_read``: the largest file ``fs.read`` returns (bytes); ``max_write``: the largest
    content ``fs.write`` accepts; ``max_entries``: the most entries ``fs.list`` returns;
    ``snapshots``: where ``fs.write`` and ``fs.delete`` keep what they change (None: they
    keep nothing and ``fs.rollback`` is not registered). Raises KernelError for a root that
    is not a directory (or is ``/``)."""

    ACTIONS: Final = {"fs.read": "read", "fs.list": "read", "fs.write": "write", "fs.delete": "write"}

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_read: int = MAX_READ,
        max_write: int = MAX_WRITE,
        max_entries: int = MAX_ENTRIES,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.workspace = Workspace(root)
        self.max_read = whole(max_read, "max_read", 0, error=KernelError)
        self.max_write = whole(max_write, "max_write", 0, error=KernelError)
        self.max_entries = whole(max_entries, "max_entries", 0, error=KernelError)
        self.snapshots = snapshots

    @property
    def root(self) -> str:
        return self.workspace.root

    def provider(self, kind: Kind) -> FsProvider:
        """The provider of one operation: ``"read"``, ``"write"``, ``"delete"`` or ``"list"``."""
        return FsProvider(self, kind)

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``fs.read``, ``fs.list`` (``read``), ``fs.write`` and ``fs.delete``
        (``write``), and ``fs.rollback`` (``write``) when the file system has a snapshot store."""
        for action, permission in self.ACTIONS.items():
            kind: Kind = action.split(".", 1)[1]  # type: ignore[assignment]
            registry.register(action, self.provider(kind), permission, replace=replace)
        if self.snapshots is not None:
            registry.register("fs.rollback", RollbackProvider(self), "write", replace=replace)

    # -- the operations (blocking: run in a thread) -------------------------------------------

    def read(self, parts: tuple[str, ...], target: str, binary: bool) -> str | bytes:
        if not parts:
            raise FsError(f"{target!r}: is a directory")
        data = self._with_dir(parts[:-1], target, lambda d: self._read_at(d, parts[-1], target))
        if binary:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FsError(f"{target!r}: not UTF-8 text (pass binary=True)") from None

    def _read_at(self, dir_fd: int, name: str, target: str) -> bytes:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _FILE_FLAGS, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FsError(f"{target!r}: not a regular file")
            if st.st_size > self.max_read:
                raise FsError(f"{target!r}: larger than {self.max_read} bytes (max_read)")
            data = f.read(self.max_read + 1)
        if len(data) > self.max_read:
            raise FsError(f"{target!r}: larger than {self.max_read} bytes (max_read)")
        return data

    def write(self, parts: tuple[str, ...], target: str, data: bytes, parents: bool) -> int:
        if not parts:
            raise FsError(f"{target!r}: is a directory")
        name = parts[-1]
        return self._with_dir(
            parts[:-1], target, lambda d: self._write_at(d, name, target, data, None), create=parents
        )

    def _write_at(self, dir_fd: int, name: str, target: str, data: bytes, mode: int | None) -> int:
        """Write ``data`` atomically as ``name``, with ``mode`` (None: the mode of the file it
        replaces, or the umask's for a new one)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise FsError(f"{target!r}: is a directory")
        if mode is None and st is not None and stat.S_ISREG(st.st_mode):
            mode = stat.S_IMODE(st.st_mode)
        tmp = f".{name[:200]}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                if mode is not None:  # keep the mode of the file it replaces
                    os.fchmod(fd, mode)
                f.write(data)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return len(data)

    def delete(self, parts: tuple[str, ...], target: str) -> None:
        if not parts:
            raise FsError(f"{target!r}: is the workspace root")
        name = parts[-1]

        def delete_at(dir_fd: int) -> None:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise FsError(f"{target!r}: is a directory")
            os.unlink(name, dir_fd=dir_fd)  # a symlink is removed, never followed

        self._with_dir(parts[:-1], target, delete_at)

    def list(self, parts: tuple[str, ...], target: str) -> list[dict[str, Any]]:
        def list_at(dir_fd: int) -> list[dict[str, Any]]:
            entries: list[dict[str, Any]] = []
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if len(entries) >= self.max_entries:
                        raise FsError(f"{target!r}: more than {self.max_entries} entries (max_entries)")
                    st = entry.stat(follow_symlinks=False)
                    entries.append({"name": entry.name, "type": _kind(st.st_mode), "size": st.st_size})
            entries.sort(key=lambda e: str(e["name"]))
            return entries

        return self._with_dir(parts, target, list_at)

    def capture(
        self, parts: tuple[str, ...], target: str, limit: int
    ) -> tuple[bytes | str | None, int | None]:
        """What is at ``parts``: the file's content and mode, a symlink's target (str, mode
        None; the link is not followed), or (None, None) when there is nothing. Raises
        SnapshotError for something else (a directory, a FIFO ...), a file over ``limit``
        bytes, or one that cannot be read."""
        if not parts:
            raise SnapshotError(f"{target!r}: is the workspace root")
        name = parts[-1]

        def capture_at(dir_fd: int) -> tuple[bytes | str | None, int | None]:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None, None
            if stat.S_ISLNK(st.st_mode):
                return os.readlink(name, dir_fd=dir_fd), None
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"{target!r}: not a regular file or a symlink (not snapshotted)")
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _FILE_FLAGS, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise SnapshotError(f"{target!r}: not a regular file (it changed while snapshotted)")
                data = f.read(limit + 1) if st.st_size <= limit else b""
            if st.st_size > limit or len(data) > limit:
                raise SnapshotError(f"{target!r}: larger than {limit} bytes (max_snapshot)")
            return data, stat.S_IMODE(st.st_mode)

        try:
            dir_fd = self.workspace.open_dir(parts[:-1])
        except FileNotFoundError:  # a missing directory: no file either
            return None, None
        except OSError as exc:
            raise SnapshotError(describe(exc, target)) from None
        try:
            return capture_at(dir_fd)
        except OSError as exc:
            raise SnapshotError(describe(exc, target)) from None
        finally:
            os.close(dir_fd)

    def restore(self, snapshot: Snapshot, force: bool) -> str:
        """Put back what ``snapshot`` kept: its content and mode, or its symlink
        (``"restored"``), or no file (``"removed"``). Unless ``force``, the path must still
        hold what the action left there; raises FsError when it does not, or when the file
        operation fails."""
        parts, target = snapshot.parts, snapshot.path
        name = parts[-1]

        def restore_at(dir_fd: int) -> str:
            current = _digest_at(dir_fd, name)
            if current != snapshot.left and not force:
                raise FsError(
                    f"{target!r} changed after the action: not rolled back (force=True rolls back anyway)"
                )
            if snapshot.link is not None:
                tmp = f".{name[:200]}.{uuid.uuid4().hex}.tmp"
                os.symlink(snapshot.link, tmp, dir_fd=dir_fd)
                try:
                    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dir_fd)
                    raise
                return "restored"
            if snapshot.content is None:
                if current is not None:
                    os.unlink(name, dir_fd=dir_fd)
                return "removed"
            self._write_at(dir_fd, name, target, snapshot.content, snapshot.mode)
            return "restored"

        return self._with_dir(parts[:-1], target, restore_at, create=snapshot.existed)

    def _with_dir(
        self, parts: tuple[str, ...], target: str, fn: Callable[[int], _T], *, create: bool = False
    ) -> _T:
        try:
            dir_fd = self.workspace.open_dir(parts, create=create)
            try:
                return fn(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise FsError(describe(exc, target)) from None


class FsProvider:
    """One ``fs.*`` operation of a :class:`FileSystem` (a :class:`Provider`).

    Params: ``fs.read``: ``binary`` (bool: bytes instead of UTF-8 text); ``fs.write``:
    ``content`` (str, written as UTF-8, or bytes; required), ``parents`` (bool: make missing
    directories). Outputs: ``fs.read`` the content; ``fs.write`` ``{"path", "bytes"}``;
    ``fs.delete`` ``{"path"}``; ``fs.list`` entries ``{"name", "type", "size"}`` sorted by
    name (``type``: file, dir, symlink, other)."""

    def __init__(self, fs: FileSystem, kind: Kind) -> None:
        if kind not in ("read", "write", "delete", "list"):
            raise ValueError(f"kind must be read, write, delete or list, got {kind!r}")
        self.fs = fs
        self.kind = kind

    def __repr__(self) -> str:
        return f"FsProvider({self.fs.root!r}, {self.kind!r})"

    def resource(self, request: ActionRequest) -> str:
        """The normalized absolute path; refuses paths that leave the workspace, and a
        write's content that is missing, not str/bytes, or over ``max_write`` bytes."""
        path, _ = self.fs.workspace.resolve(request.target)
        if self.kind == "write":
            _content(request, self.fs.max_write)
        return path

    async def run(self, request: ActionRequest) -> Any:
        fs = self.fs
        path, parts = fs.workspace.resolve(request.target)
        target = request.target
        if self.kind == "read":
            binary = request.params.get("binary", False) is True
            return await asyncio.to_thread(fs.read, parts, target, binary)
        if self.kind == "write":
            data = _content(request, fs.max_write)
            parents = request.params.get("parents", False) is True
            written = await asyncio.to_thread(fs.write, parts, target, data, parents)
            return {"path": path, "bytes": written}
        if self.kind == "delete":
            await asyncio.to_thread(fs.delete, parts, target)
            return {"path": path}
        return await asyncio.to_thread(fs.list, parts, target)

    @property
    def snapshots(self) -> SnapshotStore | None:
        """Where a write or a delete keeps what it changes (None for reads and lists)."""
        return self.fs.snapshots if self.kind in ("write", "delete") else None

    async def capture(self, request: ActionRequest) -> Snapshot | None:
        """The path before this write or delete, and the digest of what it will leave
        (``kernel.submit`` keeps it; see :class:`Reversible`). Raises SnapshotError."""
        store = self.snapshots
        if store is None:
            return None
        fs = self.fs
        path, parts = fs.workspace.resolve(request.target)
        found, mode = await asyncio.to_thread(fs.capture, parts, request.target, store.max_snapshot)
        left = digest(_content(request, fs.max_write)) if self.kind == "write" else None
        if isinstance(found, str):
            return Snapshot(fs.root, path, parts, request.action, None, None, left, link=found)
        return Snapshot(fs.root, path, parts, request.action, found, mode, left)


class RollbackProvider:
    """``fs.rollback``: the target is the record id of a write's or a delete's outcome; it puts
    back what the snapshot kept. Params: ``force`` (bool: also when the file changed after the
    action). Inside agent code only the agent that made the change may roll it back. Output:
    ``{"path", "record_id", "restored": "restored" | "removed"}``."""

    def __init__(self, fs: FileSystem) -> None:
        if fs.snapshots is None:
            raise ValueError("fs.rollback needs a FileSystem with a snapshot store")
        self.fs = fs
        self.store: SnapshotStore = fs.snapshots

    def __repr__(self) -> str:
        return f"RollbackProvider({self.fs.root!r})"

    def _snapshot(self, record_id: str) -> Snapshot:
        snapshot = self.store.get(record_id)
        if snapshot.root != self.fs.root:
            raise RollbackRefused(f"record {record_id!r} changed another workspace ({snapshot.root})")
        return snapshot

    def resource(self, request: ActionRequest) -> str:
        """The path the rollback writes. Raises RollbackRefused (no snapshot, expired, another
        workspace's, or another agent's change inside agent code)."""
        snapshot = self._snapshot(request.target)
        running = RUNNING_AGENT.get()
        if running is not None and running.name != snapshot.agent:
            raise RollbackRefused(
                f"agent {running.name} cannot roll back record {request.target!r}: "
                f"agent {snapshot.agent} made it"
            )
        return snapshot.path

    async def run(self, request: ActionRequest) -> Any:
        snapshot = self._snapshot(request.target)
        force = request.params.get("force", False) is True
        done = await asyncio.to_thread(self.fs.restore, snapshot, force)
        self.store.discard(request.target)
        return {"path": snapshot.path, "record_id": request.target, "restored": done}


def _content(request: ActionRequest, limit: int) -> bytes:
    content = request.params.get("content")
    if isinstance(content, str):
        data = content.encode("utf-8", "surrogatepass")
    elif isinstance(content, bytes | bytearray | memoryview):
        data = bytes(content)
    else:
        raise ActionRefused("fs.write needs params['content'] (str or bytes)")
    if len(data) > limit:
        raise ActionRefused(f"content of {len(data)} bytes is over the limit of {limit} (max_write)")
    return data


def _digest_at(dir_fd: int, name: str) -> str | None:
    """The digest of the regular file ``name`` (None: nothing there; ``"other"``: not a file)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink (ELOOP) or something else that is not a file to compare
        return "other"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "other"
        return hashlib.file_digest(f, "sha256").hexdigest()


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"
