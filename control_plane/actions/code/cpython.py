"""The CPython backend: code runs in a real interpreter inside a bubblewrap sandbox
(:class:`CPythonBackend`), one sandbox per run, taken from a pool kept warm in the background.

A pooled sandbox has started the runner (:mod:`.runner`), which has said ``ready`` on its
channel; a run sends it the job, serves its tool calls, waits for ``done`` (or the time limit,
not counting time spent in tool calls), then kills the sandbox, collects the files the code
left in its workspace and closes it. Where the host cannot sandbox, nothing runs
(SandboxUnavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import agent_os
from agent_os.amb.numbers import whole
from agent_os.control_plane.actions.code.job import (
    CodeLimits,
    Job,
    RunOutcome,
    ToolCall,
    error_text,
)
from agent_os.control_plane.errors import ChannelClosed, ChannelError, KernelError, SandboxError
from agent_os.control_plane.sandbox import Sandbox, SandboxLimits, SandboxSpec, start
from agent_os.control_plane.sandbox.channel import Channel, Peer

log = logging.getLogger(__name__)

READY_TIMEOUT: Final = 30.0
"""Seconds a new sandbox may take to say ``ready``."""
_ROOT: Final = os.path.dirname(os.path.realpath(agent_os.__file__))
_RUNNER: Final = os.path.join(_ROOT, "control_plane", "actions", "code", "runner.py")
_INTERPRETER_MEMORY: Final = 64 << 20  # address space the interpreter takes before the code runs


class _Slot:
    """A started sandbox, its channel and the task serving it."""

    def __init__(self, sandbox: Sandbox, peer: Peer, ready: asyncio.Event) -> None:
        self.sandbox = sandbox
        self.peer = peer
        self.ready = ready
        self.task = asyncio.get_running_loop().create_task(peer.run())

    async def close(self) -> None:
        await self.peer.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        await self.sandbox.close()


class CPythonBackend:
    """Runs code in CPython in a bubblewrap sandbox. ``limits``: the most a run may ask for
    (the pooled sandboxes are started with them; a run lowers them for itself); ``pool_size``:
    sandboxes kept started and ready (0: every run starts its own). :meth:`close` closes them."""

    name: Final = "cpython"

    def __init__(self, limits: CodeLimits, *, pool_size: int = 2) -> None:
        whole(pool_size, "pool_size", 0, error=KernelError)
        self.limits = limits
        self.pool_size = pool_size
        self._idle: list[_Slot] = []
        self._starting = 0
        self._refill: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def _spec(self) -> SandboxSpec:
        limits = self.limits
        return SandboxSpec(
            limits=SandboxLimits(
                memory=limits.memory + _INTERPRETER_MEMORY,
                cpu_seconds=math.ceil(limits.timeout) + 5,
                processes=limits.processes,
                file_size=max(limits.max_artifacts, 1),
            )
        )

    async def _start(self) -> _Slot:
        """A new sandbox with the runner started and ready. Raises SandboxUnavailable,
        SandboxError when the runner does not get ready."""
        ours, theirs = socket.socketpair()
        try:
            sandbox = await start(
                [sys.executable, "-I", _RUNNER, str(theirs.fileno()), _ROOT],
                self._spec(),
                pass_fds=[theirs.fileno()],
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ready = asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        try:
            channel = await Channel.open(ours)
        except BaseException:  # cancelled (the pool closing) or failed: nothing may leak
            ours.close()
            await sandbox.close()
            raise
        slot = _Slot(sandbox, Peer(channel, {"ready": on_ready}), ready)
        try:
            waiting = asyncio.ensure_future(ready.wait())
            await asyncio.wait({waiting, slot.task}, timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED")
            waiting.cancel()
            if not ready.is_set():
                raise SandboxError(f"the code runner did not start (sandbox status {sandbox.returncode})")
        except BaseException:
            await slot.close()
            raise
        return slot

    async def start(self) -> None:
        """Fill the pool now (runs do it otherwise). Raises SandboxUnavailable."""
        if self._closed:
            raise KernelError("the CPython backend is closed")
        while len(self._idle) + self._starting < self.pool_size:
            self._starting += 1
            try:
                slot = await self._start()
            finally:
                self._starting -= 1
            if self._closed:
                await slot.close()
                return
            self._idle.append(slot)

    def _fill_later(self) -> None:
        if self.pool_size and not self._closed and (self._refill is None or self._refill.done()):
            self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        try:
            await self.start()
        except Exception as exc:  # the next run starts its own sandbox and reports the error
            log.warning("cannot refill the code sandbox pool: %s", exc)

    async def _take(self) -> _Slot:
        while self._idle:
            slot = self._idle.pop()
            if slot.sandbox.returncode is None and not slot.task.done():
                self._fill_later()
                return slot
            await slot.close()
        self._fill_later()
        return await self._start()

    def _close_later(self, slot: _Slot) -> None:
        task = asyncio.get_running_loop().create_task(slot.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the pooled sandboxes and those of finished runs, stop refilling; idempotent."""
        self._closed = True
        await asyncio.gather(*list(self._closing), return_exceptions=True)
        if self._refill is not None:
            # Let a sandbox being started finish starting (the refill closes it, seeing the pool
            # closed): a start cancelled half way leaves asyncio a process it cannot reap.
            done, _ = await asyncio.wait({self._refill}, timeout=READY_TIMEOUT / 6)
            if not done:
                self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        idle, self._idle = self._idle, []
        for slot in idle:
            await slot.close()

    async def run(self, job: Job, call: ToolCall) -> RunOutcome:
        """Run ``job`` in a sandbox of its own; tool calls go through ``call``. The code's
        failures and its limits are the outcome's ``error``. Raises SandboxUnavailable
        (nothing ran), SandboxError when no sandbox could be started, CancelledError (the
        sandbox is killed and closed first)."""
        if self._closed:
            raise KernelError("the CPython backend is closed")
        slot = await self._take()
        try:
            exchange = _Exchange(slot, job, call)
            outcome = await exchange.run()
            await _ended(slot.sandbox, exchange.done.done())  # nothing of the code's runs now
            found = await asyncio.to_thread(_artifacts, slot.sandbox.workspace, job.limits.max_artifacts)
        except BaseException:
            await slot.close()
            raise
        self._close_later(slot)  # the caller has its result; the sandbox goes in the background
        if isinstance(found, str):
            return replace(outcome, error=outcome.error or error_text("ArtifactLimitExceeded", found))
        return replace(outcome, artifacts=found)


class _Exchange:
    """One job on one sandbox: the tool calls it makes and the clock of its time limit, which
    stops while a tool call is served."""

    def __init__(self, slot: _Slot, job: Job, call: ToolCall) -> None:
        self.slot = slot
        self.job = job
        self.call = call
        self.done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.in_tools = 0
        self.used = 0.0
        self.since = time.monotonic()
        self.calls = 0
        self.over_calls = False

    async def on_tool(self, name: Any = None, args: Any = None, kwargs: Any = None) -> Any:
        if not isinstance(name, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ChannelError("a malformed tool call")
        self.calls += 1
        if self.calls > self.job.limits.max_tool_calls:
            self.over_calls = True
            self.slot.sandbox.signal(signal.SIGKILL)
            raise ChannelClosed("too many tool calls")
        self._pause()
        try:
            return await self.call(name, args, kwargs)
        finally:
            self._resume()

    async def on_done(self, value: Any = None, stdout: Any = "", error: Any = None) -> None:
        if not self.done.done():
            self.done.set_result({"value": value, "stdout": stdout, "error": error})

    def _pause(self) -> None:
        if self.in_tools == 0:
            self.used += time.monotonic() - self.since
        self.in_tools += 1

    def _resume(self) -> None:
        self.in_tools -= 1
        if self.in_tools == 0:
            self.since = time.monotonic()

    def _left(self) -> float:
        if self.in_tools:
            return self.job.limits.timeout  # the clock stands while a tool call is served
        return self.job.limits.timeout - self.used - (time.monotonic() - self.since)

    async def run(self) -> RunOutcome:
        self.slot.peer.handlers.update({"tool": self.on_tool, "done": self.on_done})
        self.since = time.monotonic()
        await self.slot.peer.notify("job", self.job.wire())
        while not self.done.done():
            left = self._left()
            if left <= 0:
                return RunOutcome(
                    error=error_text(
                        "TimeoutError", f"ran past its time limit of {self.job.limits.timeout:g}s"
                    )
                )
            waiting: set[asyncio.Future[Any]] = {self.done, self.slot.task}
            await asyncio.wait(waiting, timeout=left, return_when="FIRST_COMPLETED")
            if self.slot.task.done() and not self.done.done():
                with contextlib.suppress(TimeoutError):  # its status tells a kill from an exit
                    await asyncio.wait_for(self.slot.sandbox.wait(), 2.0)
                return RunOutcome(error=self._died())
        result = self.done.result()
        return _outcome(result)

    def _died(self) -> str:
        if self.over_calls:
            return error_text("ToolLimitExceeded", f"more than {self.job.limits.max_tool_calls} tool calls")
        task = self.slot.task
        why = ""
        if not task.cancelled() and task.exception() is not None:
            why = f": {task.exception()}"
        status = self.slot.sandbox.returncode
        if status is not None and (status < 0 or status > 128):  # bwrap passes 128 + the signal
            return error_text(
                "ProcessKilled", f"the code's process was killed (a limit: CPU time or memory){why}"
            )
        return error_text(
            "ProcessExited", f"the code's process ended without a result (status {status}){why}"
        )


async def _ended(sandbox: Sandbox, finished: bool) -> None:
    """Wait for the sandbox to end: the runner exits after its result (``finished``), and its
    pid namespace (every process of the code) with it; else, or when it does not within a
    second, it is killed."""
    if not finished:
        await sandbox.kill()
    elif sandbox.returncode is None:
        try:
            await asyncio.wait_for(asyncio.shield(sandbox.wait()), 1.0)
        except TimeoutError:
            await sandbox.kill()


def _outcome(result: Mapping[str, Any]) -> RunOutcome:
    error = result.get("error")
    text = None
    if isinstance(error, list) and len(error) >= 2:
        text = error_text(str(error[0]), str(error[1]))
    elif error is not None:
        text = error_text("RunnerError", str(error)[:500])
    stdout = result.get("stdout")
    return RunOutcome(result.get("value"), stdout if isinstance(stdout, str) else "", {}, text)


def _artifacts(root: Path, budget: int) -> dict[str, bytes] | str:
    """The regular files under ``root`` (relative path -> content), never following a link and
    skipping files with other links; or why not (over ``budget`` bytes)."""
    found: dict[str, bytes] = {}
    total = 0
    for parent, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(parent, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # a symlink, a socket, a file gone
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                    continue
                total += info.st_size
                if total > budget:
                    return f"files in the workspace over {budget} bytes (max_artifacts)"
                found[os.path.relpath(path, root)] = file.read(budget + 1)
    return found
