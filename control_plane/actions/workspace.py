"""A directory actions cannot leave: :class:`Workspace`.

Paths are judged twice. :meth:`Workspace.resolve` refuses, by the text alone, what could name
something outside (``..`` segments, absolute paths elsewhere, NUL, backslashes, percent-encoded
characters, over-long paths and names) and gives the normalized absolute path the policy
judges. Then every file operation walks from the root one component at a time with directory
file descriptors opened ``O_NOFOLLOW`` (:meth:`Workspace.open_dir`), so a symlink anywhere in
the path, including one put there after the check, fails the operation instead of being
followed. Guarantees and limits: ``docs/control-plane.md`` (Actions).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
from typing import Final

from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.errors import KernelError
from agent_os.control_plane.policy.guards import path_refusal

MAX_PATH: Final = 4096
"""The longest target (in UTF-8 bytes) a workspace accepts."""
MAX_NAME: Final = 255
"""The longest path component (in UTF-8 bytes)."""

_ENCODED: Final = re.compile(r"%[0-9a-fA-F]{2}")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Workspace:
    """The directory ``root`` (resolved once, with symlinks, when the workspace is made).

    Raises KernelError when ``root`` is not an existing directory, or is ``/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        real = os.path.realpath(os.fspath(root))
        if not os.path.isdir(real):
            raise KernelError(f"a workspace must be an existing directory, got {os.fspath(root)!r}")
        if real == "/":
            raise KernelError("the workspace cannot be /")
        self.root = real

    def __repr__(self) -> str:
        return f"Workspace({self.root!r})"

    def resolve(self, target: str) -> tuple[str, tuple[str, ...]]:
        """The normalized absolute path of ``target`` (relative to the root, or absolute under
        it) and its components below the root (empty: the root itself).

        Raises ActionRefused for a target that is not a string, is too long, has a component
        over :data:`MAX_NAME` bytes, a NUL, a backslash, a percent-encoded character or a
        ``..`` segment, or is an absolute path outside the root."""
        if not isinstance(target, str):
            raise ActionRefused(f"a path must be a string, got {type(target).__name__}")
        if len(target.encode("utf-8", "surrogatepass")) > MAX_PATH:
            raise ActionRefused(f"path longer than {MAX_PATH} bytes")
        if _ENCODED.search(target):
            raise ActionRefused("percent-encoded characters in the path")
        path = target if target.startswith("/") else f"{self.root}/{target}"
        why = path_refusal(self.root, path)
        if why is not None:
            raise ActionRefused(f"{why} (the workspace is {self.root})")
        normal = posixpath.normpath(path)
        parts = tuple(p for p in normal[len(self.root) :].split("/") if p)
        if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME for p in parts):
            raise ActionRefused(f"a path component longer than {MAX_NAME} bytes")
        return normal, parts

    def open_dir(self, parts: tuple[str, ...], *, create: bool = False) -> int:
        """A file descriptor of the directory ``parts`` below the root, reached one component
        at a time without following symlinks (``create``: make missing directories). The
        caller closes it. Raises OSError (ELOOP or ENOTDIR for a symlink or a file on the
        way, ENOENT for a missing directory)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=fd)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd


def describe(exc: OSError, target: str) -> str:
    """A message for a failed file operation on ``target`` that names only the target."""
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return f"{target!r}: a symlink in the path (symlinks are not followed)"
    if exc.errno == errno.ENOTDIR:
        return f"{target!r}: a symlink or a file where a directory is expected"
    if exc.errno == errno.ENOENT:
        return f"{target!r}: no such file or directory"
    if exc.errno == errno.EISDIR:
        return f"{target!r}: is a directory"
    if exc.errno == errno.EEXIST:
        return f"{target!r}: already exists"
    return f"{target!r}: {os.strerror(exc.errno) if exc.errno else type(exc).__name__}"
