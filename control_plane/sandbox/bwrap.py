"""Start a command in a bubblewrap sandbox: :func:`start`, :class:`SandboxSpec`, :class:`Sandbox`.

The sandbox has no network (a new, empty network namespace), its own pid, ipc and uts
namespaces, a read-only view of the system (``/usr``, ``/etc``, the Python installation and the
import path), a private read-write workspace at ``/workspace``, a small private ``/tmp``, and
rlimits on memory, CPU time, processes, open files and file size. It runs under a uid of its own,
allocated from a range and held by a lock for the sandbox's life, so that the process limit counts
only its own processes, the host's files are out of reach by permissions (``/etc/shadow``), and
every process of the sandbox can be found and signalled by that uid.

It needs root (to give each sandbox its uid) and bubblewrap; where either is missing,
:func:`check_available` and :func:`start` raise SandboxUnavailable: never a silent fallback.
``docs/sandbox.md`` says what is isolated and how.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import importlib.util
import os
import random
import shutil
import signal as signals
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from agent_os.amb.numbers import shown, whole
from agent_os.control_plane.errors import SandboxError, SandboxUnavailable

WORKSPACE: Final = "/workspace"
"""Where the sandbox sees its workspace (its working directory and ``HOME``)."""

UID_SLOTS: Final = 65536


def _uid_base(text: str) -> int:
    """The sandboxes' first uid from ``AGENT_OS_SANDBOX_UID_BASE``: a number of ASCII digits
    from 65536 (above every account a system makes, root's 0 included) up to where the
    :data:`UID_SLOTS` that follow stay below 2**31. Raises SandboxError otherwise: a sandbox
    must never run as a real account."""
    if not (text.isascii() and text.isdigit()) or not 65536 <= int(text) <= 2**31 - 1 - UID_SLOTS:
        raise SandboxError(
            f"AGENT_OS_SANDBOX_UID_BASE must be a uid from 65536 to {2**31 - 1 - UID_SLOTS}, "
            f"got {text[:40]!r}"
        )
    return int(text)


UID_BASE: Final = _uid_base(os.environ.get("AGENT_OS_SANDBOX_UID_BASE", "1500000000"))
"""The first uid sandboxes run as (``AGENT_OS_SANDBOX_UID_BASE``); :data:`UID_SLOTS` follow it."""
_LOCKS: Final = Path(os.environ.get("AGENT_OS_SANDBOX_LOCKS", "/run/agent-os/sandbox-uids"))
_SYSTEM_DIRS: Final = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_MiB: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-process resource limits inside a sandbox (rlimits, so each process of the sandbox
    gets them; ``processes`` counts every process and thread of the sandbox's uid).

    ``memory``: address space in bytes (an allocation past it fails: ``MemoryError`` in
    Python); ``cpu_seconds``: CPU time, then SIGKILL; ``processes``: processes and threads
    (a fork past it fails with EAGAIN); ``open_files``: file descriptors; ``file_size``: the
    largest file it may write, in bytes; ``tmp_size``: the size of its private ``/tmp``.
    Raises SandboxError (ValueError) for a value that is not a positive integer."""

    memory: int = 1024 * _MiB
    cpu_seconds: int = 300
    processes: int = 64
    open_files: int = 256
    file_size: int = 256 * _MiB
    tmp_size: int = 64 * _MiB

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = whole(getattr(self, name), f"sandbox limit {name}", error=SandboxConfigError)
            if value > 2**62:  # prlimit's range
                raise SandboxConfigError(f"sandbox limit {name} must be at most 2**62, got {shown(value)}")
            object.__setattr__(self, name, value)  # a plain int (NumPy's are taken by value)


class SandboxConfigError(SandboxError, ValueError):
    """A sandbox specification that cannot be honoured (a bad limit, workspace or variable)."""


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What a sandbox sees and may use.

    ``workspace``: a host directory mounted read-write at ``/workspace`` (created when missing,
    and handed to the sandbox's uid); None: a fresh private directory, removed when the sandbox
    is closed. ``read_only``: more host paths visible read-only at the same place. ``env``:
    environment variables (the rest of the host's environment is not passed, except
    ``PYTHONPATH``). The Python installation and import path are always visible read-only."""

    workspace: str | Path | None = None
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    read_only: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@functools.cache
def _probe() -> str | None:
    """Why this host cannot sandbox, or None; tried once per process."""
    if sys.platform != "linux":
        return f"bubblewrap sandboxes need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return (
            "sandboxes need root: each runs under a uid of its own, which only root can give "
            "(docs/sandbox.md, Requirements)"
        )
    for tool in ("bwrap", "prlimit", "setpriv"):
        if shutil.which(tool) is None:
            package = "bubblewrap" if tool == "bwrap" else "util-linux"
            return f"{tool} is not installed (Debian package {package})"
    argv = [shutil.which("bwrap") or "bwrap", *_namespaces(), "--ro-bind", "/", "/", "--", "/bin/true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap cannot run: {exc}"
    if done.returncode != 0:
        return f"bwrap cannot create namespaces here: {done.stderr.decode(errors='replace').strip()}"
    return None


def check_available() -> None:
    """Raise SandboxUnavailable, saying what is missing, when this host cannot run sandboxes
    (not Linux, not root, bwrap, prlimit or setpriv missing, namespaces refused)."""
    reason = _probe()
    if reason is not None:
        raise SandboxUnavailable(reason)


def _namespaces() -> list[str]:
    # No user namespace: bwrap runs privileged (as root) so that setpriv can give the sandbox its
    # own uid; the uid is what keeps host files and other processes out of reach.
    ns = ["--unshare-net", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    return [*ns, "--die-with-parent", "--new-session"]


class _UidLease:
    """A uid no other sandbox on this host uses while the lease is held (a flock'ed file)."""

    def __init__(self) -> None:
        _LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_lock_dir(_LOCKS)
        rng = random.SystemRandom()
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        for _ in range(64):
            uid = UID_BASE + rng.randrange(UID_SLOTS)
            try:  # never through a link planted in the lock directory, never a fifo or device
                fd = os.open(_LOCKS / f"{uid}.lock", flags, 0o600)
            except OSError:
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if _pids_of(uid):  # left over by a supervisor that died: not ours to reuse
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise SandboxError("no free sandbox uid after 64 tries")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _check_lock_dir(path: Path) -> None:
    """Refuse a uid lock directory someone else could plant files in: it must be a real
    directory (not a link) owned by this user and writable by nobody else."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise SandboxError(
            f"the sandbox uid lock directory {path} is not a directory of uid {os.geteuid()} "
            "writable only by it: refusing to allocate uids through it"
        )


def _pids_of(uid: int) -> list[int]:
    """Host pids of the processes whose real uid is ``uid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(entry.name))
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def _python_paths() -> list[str]:
    """The interpreter, its installation and the import path: what a sandboxed Python needs."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    if sys.executable:
        paths.add(os.path.dirname(os.path.realpath(sys.executable)))
        # A virtual environment's own interpreter link and its configuration: shown on their
        # own where the environment's directory is closed (see _ro_binds).
        paths.add(os.path.dirname(os.path.abspath(sys.executable)))
    config = os.path.join(sys.prefix, "pyvenv.cfg")
    if os.path.isfile(config):
        paths.add(config)
    paths.update(p for p in sys.path if p and os.path.exists(p))
    spec = importlib.util.find_spec("agent_os")  # an editable install maps it to the source tree
    for location in (spec.submodule_search_locations or []) if spec else []:
        root = os.path.dirname(os.path.realpath(location))
        paths.add(root)
        paths.update(_package_dirs(location, root))
    return sorted(paths)


def _package_dirs(location: str, root: str) -> set[str]:
    """The package's own folder at ``location`` and the folders its links lead to inside
    ``root`` (a source tree links its top-level folders in): all a sandbox is shown of a closed
    tree (see _ro_binds). A link that leads out of ``root``, or nowhere, adds nothing."""
    found = {os.path.realpath(location)}
    under = root.rstrip("/") + "/"
    with contextlib.suppress(OSError), os.scandir(location) as entries:
        for entry in entries:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if target.startswith(under) and os.path.exists(target):
                    found.add(target)
    return found


def _outermost(paths: Iterator[str] | Sequence[str]) -> list[str]:
    """Absolute real paths, without those inside another of them, without the system dirs
    (already bound whole)."""
    real = sorted({os.path.realpath(p) for p in paths})
    kept: list[str] = []
    for path in real:
        if any(path == k or path.startswith(k.rstrip("/") + "/") for k in (*_SYSTEM_DIRS, *kept)):
            continue
        kept.append(path)
    return kept


def _closed_dir(path: str) -> bool:
    """True when ``path`` is a directory other users may not enter (``mktemp -d`` makes them
    0700): the sandbox's uid is such a user."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and not mode & stat.S_IXOTH


def _ro_binds(path: str, visible: Sequence[str]) -> list[str]:
    """The bwrap arguments that show host ``path`` read-only at the same place.

    A directory bound whole keeps its mode, so one closed to other users stays closed to the
    sandbox: a source tree or virtual environment inside it would not load. Such a directory
    is not opened whole: the sandbox gets a 0755 directory there holding only the ``visible``
    paths inside it (the Python installation, the ``agent_os`` package), under 0755 directories
    too. Whatever else it holds stays out of sight, as its owner meant."""
    if not _closed_dir(path):
        return ["--ro-bind", path, path]
    under = path.rstrip("/") + "/"
    inside = _outermost(p for p in visible if os.path.realpath(p).startswith(under))
    if not inside:
        return ["--ro-bind", path, path]  # nothing in it is needed: it stays closed
    dirs = {path}
    for found in inside:
        dirs.update(str(q) for q in Path(found).parents if str(q).startswith(under))
    argv: list[str] = []
    for directory in sorted(dirs):
        argv += ["--perms", "0755", "--dir", directory]
    for found in inside:
        argv += ["--ro-bind", found, found]
    return argv


def _check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SandboxConfigError(f"sandbox environment variables are strings: {key!r}={value!r}")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxConfigError(f"invalid sandbox environment variable {key!r}")


def _check_workspace(workspace: Path, bound: Sequence[str]) -> None:
    for path in (*bound, *_SYSTEM_DIRS, "/proc", "/sys", "/dev", "/run"):
        if path == str(workspace) or path.startswith(str(workspace).rstrip("/") + "/"):
            raise SandboxConfigError(f"workspace {workspace} would expose {path} read-write")


def _chown_tree(root: Path, uid: int) -> None:
    """Hand ``root`` and what it holds to ``uid``; links are changed, never followed."""
    os.lchown(root, uid, uid)
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), uid, uid)


def build_argv(
    spec: SandboxSpec, command: Sequence[str], uid: int, workspace: Path, visible: Sequence[str]
) -> list[str]:
    """The bwrap command line that runs ``command`` in ``spec``'s sandbox as ``uid`` with
    ``workspace`` at ``/workspace`` and the host paths ``visible`` read-only (from :func:`_prepare`;
    exposed for tests and ``docs/sandbox.md``)."""
    limits = spec.limits
    argv = [shutil.which("bwrap") or "bwrap", *_namespaces(), "--hostname", "sandbox", "--clearenv"]
    for name in _SYSTEM_DIRS:
        if os.path.islink(name):
            argv += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            argv += ["--ro-bind", name, name]
    # /tmp first: a read-only path under the host's /tmp (a script) is bound onto it, not hidden.
    # It is the sandbox's own (mode 1777: writable by its uid), never the host's /tmp bound whole.
    argv += ["--perms", "1777", "--size", str(limits.tmp_size), "--tmpfs", "/tmp"]
    bound = _outermost(p for p in visible if os.path.realpath(p) != "/tmp")
    parents = sorted({str(p) for path in bound for p in Path(path).parents if str(p) not in ("/", "/tmp")})
    for parent in parents:  # bwrap would make them 0700, closed to the sandbox's uid
        argv += ["--perms", "0755", "--dir", parent]
    for path in bound:
        argv += _ro_binds(path, visible)
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--bind", str(workspace), WORKSPACE, "--chdir", WORKSPACE]
    env = {"PATH": _PATH, "HOME": WORKSPACE, "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(spec.env)
    for key, value in env.items():
        argv += ["--setenv", key, value]
    # Until setpriv drops to the sandbox's uid (which clears every capability): change uid, and
    # enter the workspace, which only that uid may open.
    argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    argv += ["--cap-add", "CAP_DAC_READ_SEARCH", "--cap-add", "CAP_SETPCAP", "--"]
    argv += [
        "/usr/bin/prlimit",
        f"--as={limits.memory}",
        f"--cpu={limits.cpu_seconds}",
        f"--nproc={limits.processes}",
        f"--nofile={limits.open_files}",
        f"--fsize={limits.file_size}",
        "--core=0",
        "--",
        "/usr/bin/setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        *command,
    ]
    return argv


class Sandbox:
    """A running sandbox: its bwrap ``process``, ``uid`` and host ``workspace``.

    :meth:`signal` reaches every process of the sandbox (found by its uid), so a SIGSTOP
    freezes an agent that never looks at signals and its children too. :meth:`close` kills
    what is left, waits for it and frees the uid (and a private workspace)."""

    def __init__(
        self, process: asyncio.subprocess.Process, lease: _UidLease, workspace: Path, private: bool
    ) -> None:
        self.process = process
        self.uid = lease.uid
        self.workspace = workspace
        self._lease = lease
        self._private = private
        self._closed = False

    @property
    def pid(self) -> int:
        """The host pid of the bwrap process that holds the sandbox."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The sandbox's exit status (bwrap passes its command's), None while it runs."""
        return self.process.returncode

    def pids(self) -> list[int]:
        """Host pids of every process running in the sandbox."""
        return _pids_of(self.uid)

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process of the sandbox, again until no new process shows up
        (a fork racing the signal); returns how many processes got it."""
        sent: set[int] = set()
        for _ in range(16):
            fresh = [pid for pid in _pids_of(self.uid) if pid not in sent]
            if not fresh:
                break
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                sent.add(pid)
        return len(sent)

    async def wait(self) -> int:
        """Wait for the sandbox to exit; returns its status."""
        return await self.process.wait()

    async def kill(self) -> None:
        """SIGKILL every process of the sandbox and bwrap itself, and wait for it."""
        if self.process.returncode is None:
            self.signal(signals.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        for _ in range(100):  # processes of the uid outlive bwrap by at most a reaping
            if not self.signal(signals.SIGKILL):
                break
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Kill what still runs, free the uid, remove a private workspace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.kill()
        finally:
            self._lease.release()
            if self._private:
                shutil.rmtree(self.workspace, ignore_errors=True)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start(
    command: Sequence[str],
    spec: SandboxSpec | None = None,
    *,
    pass_fds: Sequence[int] = (),
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> Sandbox:
    """Start ``command`` (an argv; the first item an absolute path, e.g. ``sys.executable``) in
    a sandbox made to ``spec``; ``pass_fds`` stay open in it (a channel's socket). Returns at
    once; the caller closes the sandbox (``async with``).

    Raises SandboxUnavailable when this host cannot sandbox, SandboxConfigError for a spec
    that cannot be honoured (a workspace that would expose a system path read-write, a bad
    variable), SandboxError when the command is not an absolute path."""
    spec = spec or SandboxSpec()
    check_available()
    if not command or not os.path.isabs(command[0]):
        raise SandboxError(f"a sandboxed command starts with an absolute path, not {command[:1]!r}")
    _check_env(spec.env)
    lease, workspace, visible = await asyncio.to_thread(_prepare, spec)
    try:
        argv = build_argv(spec, command, lease.uid, workspace, visible)
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=tuple(pass_fds), stdin=stdin, stdout=stdout, stderr=stderr
        )
    except BaseException:
        _release(lease, workspace, spec.workspace is None)
        raise
    return Sandbox(process, lease, workspace, spec.workspace is None)


def _prepare(spec: SandboxSpec) -> tuple[_UidLease, Path, list[str]]:
    """A uid lease, the workspace (made and handed to that uid) and the host paths the sandbox
    sees read-only: the Python installation, the import path and ``spec.read_only``
    (blocking: file system)."""
    visible = [*_python_paths(), *spec.read_only]
    lease = _UidLease()
    workspace: Path | None = None
    try:
        if spec.workspace is None:
            workspace = Path(tempfile.mkdtemp(prefix="agent-os-ws-"))
        else:
            workspace = Path(spec.workspace).resolve()
            _check_workspace(workspace, _outermost(visible))
            workspace.mkdir(parents=True, exist_ok=True)
        _chown_tree(workspace, lease.uid)
    except BaseException:
        _release(lease, workspace, spec.workspace is None)
        raise
    return lease, workspace, visible


def _release(lease: _UidLease, workspace: Path | None, private: bool) -> None:
    lease.release()
    if private and workspace is not None:
        shutil.rmtree(workspace, ignore_errors=True)
