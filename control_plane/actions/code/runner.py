"""The code runner inside a CPython sandbox: ``python -I runner.py <fd> <agent_os dir>``.

It says ``ready`` on the channel (the socket ``fd``), waits for one ``job``, runs its code with
each tool as a function that calls the kernel back over the channel, sends ``done`` with the
value, the printed output and the error, and exits: one job per sandbox.

Started by path, not with ``-m``: importing the ``agent_os`` packages would import the whole
control plane (half a second); only the channel and the errors are needed, so the packages on
their way are put in ``sys.modules`` as empty packages first (:func:`_bootstrap`).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import os
import resource
import sys
import threading
import traceback
import types
from typing import Any

_MAX_TRACEBACK = 8000


def _bootstrap(root: str) -> Any:
    """The channel module, imported without running the ``__init__`` of its packages."""
    for name in ("agent_os", "agent_os.amb", "agent_os.control_plane", "agent_os.control_plane.sandbox"):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, *name.split(".")[1:])]
        sys.modules[name] = package
    return importlib.import_module("agent_os.control_plane.sandbox.channel")


class OutputLimitExceeded(BaseException):
    """More was printed than ``max_output`` allows (a BaseException: ``except Exception`` in
    the code does not swallow it)."""


class ToolDenied(PermissionError):
    """The kernel denied a tool call."""


class ToolFailed(RuntimeError):
    """A tool call's action failed."""


class _Output:
    """``sys.stdout`` and ``sys.stderr``: what the code prints, up to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.over = False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.size += len(text.encode("utf-8", "surrogatepass"))
        if self.size > self.limit:
            self.over = True
            raise OutputLimitExceeded(f"output over {self.limit} bytes (max_output)")
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _kind(exc: BaseException) -> str:
    """The name of the nearest builtin exception class (a ToolDenied reads PermissionError)."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins":
            return cls.__name__
    return type(exc).__name__


def _tool(peer: Any, lock: threading.Lock, name: str, channel: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            try:
                return peer.call("tool", {"name": name, "args": list(args), "kwargs": kwargs})
            except channel.RemoteError as exc:
                kinds = {"ToolDenied": ToolDenied, "ToolFailed": ToolFailed, "ToolArgumentError": TypeError}
                raise kinds.get(exc.kind, RuntimeError)(exc.text) from None
            except channel.ChannelError as exc:
                raise TypeError(f"{name}(): arguments cannot be sent: {exc}") from None

    call.__name__ = call.__qualname__ = name
    return call


def _run(code: str, scope: dict[str, Any]) -> Any:
    """Run ``code``; the value of its last statement when that is an expression."""
    tree = ast.parse(code, "<code>", "exec")
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        tree.body.pop()
    else:
        last = None
    exec(compile(tree, "<code>", "exec"), scope)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), "<code>", "eval"), scope)


def _plain(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if depth >= 32:
        return repr(value)[:1000]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, depth + 1) for v in value]
    return repr(value)


def _limit(which: int, value: int) -> None:
    """Lower a limit (never raise it above the sandbox's)."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def main() -> None:
    import socket

    channel = _bootstrap(sys.argv[2])
    sock = socket.socket(fileno=int(sys.argv[1]))
    peer = channel.SyncPeer(sock)
    peer.send({"t": "note", "op": "ready", "args": {}})
    frame = peer.receive()
    if not isinstance(frame, dict) or frame.get("op") != "job" or not isinstance(frame.get("args"), dict):
        raise SystemExit("expected a job")
    job = frame["args"]
    limits = job["limits"]
    _limit(resource.RLIMIT_AS, int(limits["memory"]))
    used = resource.getrusage(resource.RUSAGE_SELF)
    _limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + float(limits["timeout"])) + 2)
    _limit(resource.RLIMIT_NPROC, int(limits["processes"]))
    _limit(resource.RLIMIT_FSIZE, int(limits["max_artifacts"]))
    output = _Output(int(limits["max_output"]))
    lock = threading.Lock()
    scope: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    scope.update(job["inputs"])
    for name in job["tools"]:
        scope[name] = _tool(peer, lock, name, channel)
    sys.argv = ["<code>"]
    sys.stdout = sys.stderr = output
    value, error = None, None
    try:
        value = _plain(_run(job["code"], scope))
    except BaseException as exc:  # the code's failure is the result
        tb = "".join(traceback.format_exception(exc))[-_MAX_TRACEBACK:]
        error = [_kind(exc), str(exc), tb]
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    if output.over:
        error = ["OutputLimitExceeded", f"output over {output.limit} bytes (max_output)", ""]
    result = {"value": value, "stdout": "".join(output.parts), "error": error}
    try:
        peer.send({"t": "note", "op": "done", "args": result})
    except channel.ChannelError as exc:  # a value too large or not packable
        result = {"value": None, "stdout": result["stdout"], "error": ["ValueError", str(exc), ""]}
        peer.send({"t": "note", "op": "done", "args": result})
    sock.close()
    os._exit(0)  # no atexit handlers or threads of the code's


if __name__ == "__main__":
    main()
