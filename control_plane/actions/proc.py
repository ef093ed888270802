"""The ``proc.exec`` provider: run an allow-listed program, never through a shell (:class:`Process`).

The program is one of a configured list, resolved to absolute paths when the provider is made;
the arguments go to ``execve`` as they are (no shell ever parses them). The child gets a
minimal environment, runs in its own process group, and is killed with its whole group when it
runs past the time limit or writes more than the output cap. Guarantees and limits:
``docs/control-plane.md`` (Actions).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.actions.workspace import Workspace, describe
from agent_os.control_plane.errors import KernelError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest

MAX_OUTPUT: Final = 1 * 2**20
MAX_STDIN: Final = 1 * 2**20
MAX_ARGS: Final = 1_000
MAX_ARG_BYTES: Final = 128 * 1024
BASE_ENV: Final = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_CHUNK: Final = 64 * 1024


class ProcError(Exception):
    """A program could not be run, ran past the time limit or wrote past the output cap (it
    was killed with its process group)."""


class Process:
    """The ``proc.exec`` action (permission ``execute``): run one program of ``allow``.

    ``allow``: program names (looked up on ``PATH`` now, once) or absolute paths; the target
    is one of these names or the absolute path of one. ``workspace``: the directory processes
    run in, and that ``params['cwd']`` (relative, or absolute inside it) must stay in (None:
    they run in ``/`` and ``cwd`` is refused). ``env``: the environment every process gets
    (default :data:`BASE_ENV`); ``pass_env``: the variable names a request may set with
    ``params['env']`` (others are refused). ``timeout``: seconds before the process group is
    killed; ``max_output``: bytes of stdout and of stderr each before it is killed;
    ``max_stdin``: the largest ``params['stdin']``. Raises KernelError for a program that is not
    found or not executable, or a bad limit."""

    ACTION: Final = "proc.exec"
    PERMISSION: Final = "execute"

    def __init__(
        self,
        allow: Iterable[str],
        *,
        workspace: str | os.PathLike[str] | Workspace | None = None,
        env: Mapping[str, str] | None = None,
        pass_env: Collection[str] = (),
        timeout: float = 30.0,
        max_output: int = MAX_OUTPUT,
        max_stdin: int = MAX_STDIN,
    ) -> None:
        if isinstance(allow, str):
            raise KernelError("allow is a list of programs, not one string")
        self.programs: dict[str, str] = {}  # a name or absolute path -> the real absolute path
        for entry in allow:
            path = _locate(entry)
            self.programs[entry] = path
            self.programs[path] = path
        seconds(timeout, "timeout", error=KernelError)
        whole(max_output, "max_output", 0, error=KernelError)
        whole(max_stdin, "max_stdin", 0, error=KernelError)
        if workspace is None or isinstance(workspace, Workspace):
            self.workspace = workspace
        else:
            self.workspace = Workspace(workspace)
        self.env = dict(BASE_ENV if env is None else env)
        self.pass_env = frozenset(pass_env)
        self.timeout = float(timeout)
        self.max_output = max_output
        self.max_stdin = max_stdin

    def __repr__(self) -> str:
        return f"Process({sorted(set(self.programs.values()))!r})"

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``proc.exec`` (permission ``execute``) in ``registry``."""
        registry.register(self.ACTION, self, self.PERMISSION, replace=replace)

    # -- the provider ---------------------------------------------------------------------------

    def program(self, target: object) -> str:
        """The absolute path of the allow-listed program ``target`` names. Raises ActionRefused."""
        if not isinstance(target, str) or target not in self.programs:
            raise ActionRefused(f"program {target!r} is not on the allow-list")
        return self.programs[target]

    def resource(self, request: ActionRequest) -> str:
        """The program's absolute path; refuses a program not on the allow-list and malformed
        ``args``, ``cwd``, ``env`` or ``stdin``."""
        path = self.program(request.target)
        _argv(request)
        self._cwd(request)
        self._env(request)
        _stdin(request, self.max_stdin)
        return path

    def context(self, request: ActionRequest) -> dict[str, Any]:
        """``argv`` (the program's path and the args, a list), ``command`` (the argv quoted as
        a shell would need, one string for ``$regex`` conditions; never run by a shell) and
        ``cwd`` for the policy's conditions."""
        argv = [self.program(request.target), *_argv(request)]
        return {"argv": argv, "command": shlex.join(argv), "cwd": self._cwd(request)}

    async def run(self, request: ActionRequest) -> dict[str, Any]:
        """Run the program. Output: ``exit_code`` (negative: killed by that signal),
        ``stdout`` and ``stderr`` (text, invalid UTF-8 replaced; bytes with
        ``params['binary']``). Raises ProcError on a timeout or output over the cap (the
        process group is killed first), or when the program cannot start."""
        path = self.program(request.target)
        argv = _argv(request)
        cwd = self._cwd(request)
        env = {**self.env, **self._env(request)}
        stdin = _stdin(request, self.max_stdin)
        if self.workspace is not None:  # no symlink on the way, as for the fs.* actions
            _, parts = self.workspace.resolve(cwd)
            try:
                os.close(self.workspace.open_dir(parts))
            except OSError as exc:
                raise ProcError(describe(exc, str(request.params.get("cwd", ".")))) from None
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group, killed as one
                close_fds=True,
            )
        except OSError as exc:
            raise ProcError(f"{path}: cannot start: {exc.strerror or exc}") from None
        over: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                assert proc.stdout is not None
                assert proc.stderr is not None
                results = await asyncio.gather(
                    self._feed(proc, stdin),
                    self._drain(proc, proc.stdout, "stdout", over),
                    self._drain(proc, proc.stderr, "stderr", over),
                )
                code = await proc.wait()
        except TimeoutError:
            raise ProcError(f"{path}: timed out after {self.timeout}s (process group killed)") from None
        finally:
            _kill_group(proc)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
        if over:
            raise ProcError(
                f"{path}: {over[0]} over {self.max_output} bytes (max_output; process group killed)"
            )
        out, err = results[1], results[2]
        if request.params.get("binary", False) is True:
            return {"exit_code": code, "stdout": out, "stderr": err}
        return {
            "exit_code": code,
            "stdout": out.decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace"),
        }

    async def _feed(self, proc: asyncio.subprocess.Process, data: bytes | None) -> bytes:
        if proc.stdin is None:
            return b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if data:
                proc.stdin.write(data)
                await proc.stdin.drain()
            proc.stdin.close()
            await proc.stdin.wait_closed()
        return b""

    async def _drain(
        self, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader, name: str, over: list[str]
    ) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await stream.read(_CHUNK):
            size += len(chunk)
            if size > self.max_output:
                over.append(name)
                _kill_group(proc)
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _cwd(self, request: ActionRequest) -> str:
        cwd = request.params.get("cwd")
        if self.workspace is None:
            if cwd is not None:
                raise ActionRefused("params['cwd'] needs a workspace (Process(..., workspace=dir))")
            return "/"
        if cwd is None:
            return self.workspace.root
        if not isinstance(cwd, str):
            raise ActionRefused("params['cwd'] must be a path in the workspace")
        path, _ = self.workspace.resolve(cwd)
        return path

    def _env(self, request: ActionRequest) -> dict[str, str]:
        env = request.params.get("env") or {}
        if not isinstance(env, Mapping):
            raise ActionRefused("params['env'] must be a mapping of str to str")
        for key, value in env.items():
            if key not in self.pass_env:
                raise ActionRefused(f"environment variable {key!r} is not allowed (pass_env)")
            if not isinstance(value, str) or "\0" in value:
                raise ActionRefused(f"environment variable {key!r}: the value must be a str without NUL")
        return dict(env)


def _locate(entry: object) -> str:
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise KernelError(f"a program is a name or an absolute path, got {entry!r}")
    if entry.startswith("/"):
        found: str | None = entry
    elif "/" in entry:
        raise KernelError(f"a program is a name or an absolute path, not a relative path: {entry!r}")
    else:
        found = shutil.which(entry)
    if found is None:
        raise KernelError(f"program {entry!r} is not found on PATH")
    path = os.path.realpath(found)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise KernelError(f"program {entry!r} ({path}) is not an executable file")
    return path


def _argv(request: ActionRequest) -> list[str]:
    args = request.params.get("args", ())
    if not isinstance(args, list | tuple):
        raise ActionRefused("params['args'] must be a list of str")
    if len(args) > MAX_ARGS:
        raise ActionRefused(f"more than {MAX_ARGS} args")
    total = 0
    for arg in args:
        if not isinstance(arg, str) or "\0" in arg:
            raise ActionRefused("every arg must be a str without NUL")
        total += len(arg.encode("utf-8", "surrogateescape"))
    if total > MAX_ARG_BYTES:
        raise ActionRefused(f"args longer than {MAX_ARG_BYTES} bytes")
    return list(args)


def _stdin(request: ActionRequest, limit: int) -> bytes | None:
    data = request.params.get("stdin")
    if data is None:
        return None
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise ActionRefused("params['stdin'] must be str or bytes")
    if len(raw) > limit:
        raise ActionRefused(f"stdin of {len(raw)} bytes is over the limit of {limit} (max_stdin)")
    return raw


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
