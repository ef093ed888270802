"""The supervisor of sandboxed agents: ``kernel.spawn(script, sandbox=SandboxSpec(...))``.

It starts the agent's runtime (:mod:`agent_os.control_plane.actions.sandboxed_agent`) in a bubblewrap
sandbox with one end of a socket pair as its only channel, and serves that channel in the
kernel's process as the agent: publishes, requests and subscriptions go through the agent's bus
client attached to the kernel (its mediator, IATP signing with the agent's key, records), actions
through ``kernel.submit`` with the agent's process as the running agent. Signals reach the OS
processes (``AgentProcess.on_signal``); the end of the agent is recorded with its reason.
``docs/sandbox.md`` (Sandboxed agents) explains it. It lives in the kernel layer because it needs
the kernel (submit, attach, signals) and the sandbox below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import signal as signals
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from agent_os.control_plane.actions.bus import bus_pattern, bus_subject, is_platform_subject
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.errors import AgentStoppedError, ChannelError, KernelError, SandboxedAgentError
from agent_os.control_plane.mediation.identity import message_sender
from agent_os.control_plane.process import RUNNING_AGENT, AgentProcess, Life
from agent_os.control_plane.sandbox.bwrap import Sandbox, SandboxConfigError, SandboxSpec, start
from agent_os.control_plane.sandbox.channel import Channel, Peer

if TYPE_CHECKING:
    from agent_os.amb import AMB, Metadata
    from agent_os.control_plane.kernel.processes import ProcessTable
    from agent_os.control_plane.mediation.mediator import Mediator
    from agent_os.control_plane.recorder import FlightRecorder

log = logging.getLogger(__name__)

RUNTIME: Final = "agent_os.control_plane.actions.sandboxed_agent"
MAX_SUBSCRIPTIONS: Final = 64
"""Subscriptions one sandboxed agent may hold; more are refused."""
MAX_REQUEST_TIMEOUT: Final = 60.0
TAIL_LINES: Final = 20
"""Lines of the sandbox's output (stdout and stderr) kept for the record of its end."""
OUTPUT_LINES_PER_SECOND: Final = 1000
"""Output lines of one sandboxed agent passed on per second; more are counted, not passed on."""
_LINE: Final = 1000
_clock = time.monotonic  # seconds, for the output's rate
_REPORT_FIELDS: Final = ("type", "errno", "errno_name", "message", "traceback")

Output = Callable[[str, str], None]
"""Where a sandboxed agent's output lines go: ``output(agent_id, line)``."""


class SupervisingKernel(Protocol):
    """What the supervisor needs of its kernel (a KernelSpace)."""

    timeout: float

    @property
    def processes(self) -> ProcessTable: ...

    @property
    def recorder(self) -> FlightRecorder: ...

    async def submit(self, request: ActionRequest) -> ActionResult: ...

    def attach(self, client: AMB, *, agent_id: str | None = None) -> Mediator: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """What runs in the sandbox: ``script`` (a host path, bound read-only at the same place)
    and the name of its async ``entry`` function."""

    script: Path
    entry: str = "main"

    @classmethod
    def of(cls, agent: Any, entry: str = "main") -> Entry:
        """The entry of a script path (``main`` in it; ``path.py:name`` names another) or of a
        module-level async function (its file and name). Raises KernelError for anything else."""
        if isinstance(agent, str | os.PathLike):
            path = Path(agent)
            file, colon, name = str(agent).rpartition(":")
            if not path.is_file() and colon and name.isidentifier():  # "script.py:entry"
                path, entry = Path(file), name
            if not path.is_file():
                raise KernelError(f"no agent script {str(agent)!r}")
            return cls(path.resolve(), entry)
        fn = inspect.unwrap(agent)
        name = getattr(fn, "__qualname__", "")
        source = inspect.getsourcefile(fn) if inspect.iscoroutinefunction(fn) else None
        if source is None or "<locals>" in name:
            raise KernelError(
                "a sandboxed agent is a script path or a module-level async function, "
                f"not {getattr(agent, '__name__', agent)!r}"
            )
        return cls(Path(source).resolve(), name)


def outcome_reason(data: Mapping[str, Any]) -> str:
    """One line saying why a sandboxed agent ended, from its record's data: the kernel's own
    observation (killed, timeout, channel error, exit status or signal) first, then what the
    sandbox reported (labelled as such: the sandbox is not trusted)."""
    parts: list[str] = []
    status = data.get("status")
    if status == "killed":
        parts.append("killed by SIGKILL")
    elif status == "timeout":
        parts.append(f"ran past its timeout of {data.get('timeout')}s")
    elif data.get("channel_error"):
        parts.append(f"broke its channel: {data['channel_error']}")
    report = data.get("reported")
    if isinstance(report, Mapping):
        errno_name = f" {report['errno_name']}" if report.get("errno_name") else ""
        parts.append(f"the sandbox reports {report.get('type')}{errno_name}: {report.get('message')}")
    sig = data.get("signal")
    if sig:
        parts.append(f"its process ended by {sig}")
    elif data.get("exit_status") not in (None, 0):
        parts.append(f"exit status {data['exit_status']}")
    if not parts and data.get("stderr_tail"):
        parts.append(f"last output: {data['stderr_tail'][-1]}")
    return "; ".join(parts) or "ended without a result"


class SandboxedRun:
    """One sandboxed agent while it runs (``kernel.sandboxes.runs[agent_id]``): its ``proc``,
    ``sandbox``, channel (``peer``) and ``bus`` client; ``started`` is set once the runtime
    in the sandbox has made its first call."""

    def __init__(
        self,
        kernel: SupervisingKernel,
        proc: AgentProcess,
        entry: Entry,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        bus: AMB | None,
        output: Output | None,
    ) -> None:
        self.kernel = kernel
        self.proc = proc
        self.entry = entry
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.bus = bus
        self.output = output
        self.sandbox: Sandbox | None = None
        self.peer: Peer | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.started = asyncio.Event()  # set once the runtime's first call (start) is answered
        self.result: tuple[str, Any] | None = None  # ("done", value) or ("failed", report)
        self.channel_error: str | None = None
        self.withheld = 0
        """Deliveries on the platform's own subjects (``_``...) not passed to the sandbox."""
        self._subs: dict[int, Any] = {}
        self._ids = itertools.count(1)
        self._deliveries: dict[int, Metadata] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._window, self._lines, self._dropped = 0, 0, 0  # output lines passed on per second

    # -- the lifetime -------------------------------------------------------------------------

    async def launch(self, spec: SandboxSpec) -> None:
        """Start the sandbox with the runtime and the channel. Raises SandboxUnavailable,
        SandboxConfigError, SandboxError."""
        script = str(self.entry.script)
        spec = replace(spec, read_only=(*spec.read_only, script))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            command = [sys.executable, "-m", RUNTIME, str(theirs.fileno()), script, self.entry.entry]
            pipe = asyncio.subprocess.PIPE
            self.sandbox = await start(command, spec, pass_fds=[theirs.fileno()], stdout=pipe, stderr=pipe)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.peer = Peer(await Channel.open(ours), self._handlers())
        self.proc.on_signal.append(self._signal)
        if self.proc.stopped:  # stopped before it started
            self._signal(Life.STOPPED)
        process = self.sandbox.process
        for stream, keep in ((process.stdout, False), (process.stderr, True)):
            if stream is not None:
                self._readers.append(asyncio.get_running_loop().create_task(self._read(stream, keep)))

    async def lifetime(self, timeout: float) -> dict[str, Any]:
        """Serve the channel until the sandbox ends (or ``timeout`` seconds); the data of the
        record of its end (``status``: completed, failed, killed or timeout)."""
        if self.sandbox is None or self.peer is None:
            raise KernelError("the sandboxed agent was not launched")
        token = RUNNING_AGENT.set(self.proc)  # the handlers' tasks act as the agent
        try:
            serving = asyncio.get_running_loop().create_task(self._serve(self.peer))
        finally:
            RUNNING_AGENT.reset(token)
        status = "failed"
        try:
            await asyncio.wait_for(self.sandbox.wait(), timeout)
        except TimeoutError:
            status = "timeout"
            await self.sandbox.kill()
        with contextlib.suppress(TimeoutError):  # the last frames after the exit
            await asyncio.wait_for(asyncio.shield(serving), 2.0)
        await self.peer.close()
        await asyncio.gather(serving, *self._readers, return_exceptions=True)
        return self._ending(status, timeout)

    def _ending(self, status: str, timeout: float) -> dict[str, Any]:
        assert self.sandbox is not None
        code = self.sandbox.returncode
        data: dict[str, Any] = {"name": self.proc.name, "sandbox_uid": self.sandbox.uid}
        data["exit_status"], data["signal"] = _exit(code)
        if self.proc.killed and status != "timeout":
            status = "killed"
        elif self.channel_error is not None:
            data["channel_error"] = self.channel_error
        elif status != "timeout" and self.result is not None and self.result[0] == "done":
            status = "completed"
        if self.result is not None and self.result[0] == "failed":
            data["reported"] = self.result[1]
            data["reported_by"] = "sandbox (untrusted)"
        if status == "timeout":
            data["timeout"] = timeout
        data["status"] = status
        data["stderr_tail"] = list(self.tail)
        if status != "completed":
            data["reason"] = outcome_reason(data)
        return data

    async def close(self) -> None:
        """Kill what still runs, close the channel and the bus client."""
        with contextlib.suppress(ValueError):
            self.proc.on_signal.remove(self._signal)
        try:
            if self.sandbox is not None:
                await self.sandbox.close()
            if self.peer is not None:
                await self.peer.close()
            for reader in self._readers:
                reader.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
        finally:
            if self.bus is not None:
                await self.bus.close()

    async def _serve(self, peer: Peer) -> None:
        try:
            await peer.run()
        except ChannelError as exc:  # malformed: the channel is closed; so is the sandbox
            self.channel_error = str(exc)[:_LINE]
            await self.kernel.recorder.log(
                "sandbox_channel_error",
                self.proc.id,
                {"name": self.proc.name, "error": self.channel_error},
                "error",
                execution_id=self.proc.id,
            )
            if self.sandbox is not None:
                await self.sandbox.kill()

    def _signal(self, life: Life) -> None:
        sandbox = self.sandbox
        if sandbox is None or sandbox.returncode is not None:
            return
        sig = {Life.STOPPED: signals.SIGSTOP, Life.RUNNING: signals.SIGCONT}.get(life, signals.SIGKILL)
        sandbox.signal(sig)
        if sig == signals.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                sandbox.process.kill()

    async def _read(self, stream: asyncio.StreamReader, keep: bool) -> None:
        pending = b""
        while chunk := await stream.read(1 << 16):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()[: _LINE * 4]
            for raw in lines:
                self._line(raw, keep)
        if pending:
            self._line(pending, keep)

    def _line(self, raw: bytes, keep: bool) -> None:
        line = raw[:_LINE].decode(errors="replace")
        if keep:
            self.tail.append(line)
        if self.output is None:
            return
        now = int(_clock())
        if now != self._window:  # a new second: say what the last one dropped
            if self._dropped:
                self.output(self.proc.id, f"({self._dropped} lines of output dropped)")
            self._window, self._lines, self._dropped = now, 0, 0
        self._lines += 1
        if self._lines > OUTPUT_LINES_PER_SECOND:
            self._dropped += 1
            return
        self.output(self.proc.id, line)

    # -- what the sandbox may call ------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        return {
            "start": self._start,
            "done": self._done,
            "failed": self._failed,
            "publish": self._publish,
            "request": self._request,
            "subscribe": self._subscribe,
            "reply": self._reply,
            "submit": self._submit,
        }

    async def _start(self, pid: int) -> dict[str, Any]:
        if self.started.is_set():
            raise KernelError("the agent has started already")
        self.started.set()
        return {"agent_id": self.proc.id, "args": self.args, "kwargs": self.kwargs}

    async def _done(self, value: Any = None) -> None:
        if self.result is None:
            self.result = ("done", value)

    async def _failed(self, report: Any) -> None:
        if self.result is None:
            fields = report if isinstance(report, dict) else {"message": repr(report)}
            self.result = ("failed", {k: _short(fields.get(k)) for k in _REPORT_FIELDS})

    def _client(self) -> AMB:
        if self.bus is None:
            raise KernelError(f"agent {self.proc.id} was started without a bus client")
        return self.bus

    async def _publish(self, topic: Any, message: Any = None, recipient: Any = None) -> str:
        client = self._client()
        return await client.publish(bus_subject(topic), message, recipient=_recipient(recipient))

    async def _request(
        self, topic: Any, message: Any = None, timeout: Any = 5.0, recipient: Any = None
    ) -> Any:
        client = self._client()
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
        if not 0 < timeout <= MAX_REQUEST_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_REQUEST_TIMEOUT}] seconds, got {timeout}")
        subject = bus_subject(topic)
        return await client.request(subject, message, timeout=float(timeout), recipient=_recipient(recipient))

    async def _subscribe(self, pattern: Any) -> int:
        client = self._client()
        pattern = bus_pattern(pattern)  # never a pattern that covers the platform's subjects
        if len(self._subs) >= MAX_SUBSCRIPTIONS:
            raise KernelError(f"at most {MAX_SUBSCRIPTIONS} subscriptions per sandboxed agent")
        sub_id = next(self._ids)
        self._subs[sub_id] = await client.subscribe(pattern, self._delivery(sub_id))
        return sub_id

    def _delivery(self, sub_id: int) -> Callable[[Any, Metadata], Awaitable[None]]:
        trust_bus = self.bus is not None and self.bus.broker.name == "memory"

        async def deliver(message: Any, metadata: Metadata) -> None:
            peer = self.peer
            if peer is None:
                return
            if is_platform_subject(metadata.subject) or is_platform_subject(metadata.topic):
                # Defence in depth (a broker whose wildcards differ): never the platform's own.
                self.withheld += 1
                return
            sender, verified, trust, _ = message_sender(metadata, trust_bus)
            token = next(self._ids)
            self._deliveries[token] = metadata
            delivery = {
                "id": metadata.id,
                "topic": metadata.topic,
                "sender": sender,
                "verified": verified,
                "trust_level": trust,
                "expects_reply": bool(metadata.reply_to),
                "token": token,
            }
            try:
                await peer.call("deliver", {"sub": sub_id, "message": message, "delivery": delivery})
            finally:
                self._deliveries.pop(token, None)

        return deliver

    async def _reply(self, token: Any, message: Any = None) -> None:
        metadata = self._deliveries.get(token) if isinstance(token, int) else None
        if metadata is None:
            raise LookupError("no request to answer: reply while its handler runs")
        await self._client().reply(metadata, message)

    async def _submit(
        self, action: Any, target: Any, params: Any = None, agent_id: Any = None
    ) -> dict[str, Any]:
        if not isinstance(action, str) or not isinstance(target, str):
            raise TypeError("an action and its target are strings")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params are a map, not {type(params).__name__}")
        if agent_id is not None and not isinstance(agent_id, str):
            raise TypeError(f"agent_id is a string, not {type(agent_id).__name__}")
        result = await self.kernel.submit(ActionRequest(action, target, params or {}, agent_id))
        return {
            "allowed": result.allowed,
            "output": result.output,
            "error": result.error,
            "record_id": result.record_id,
        }


def _recipient(recipient: Any) -> str | None:
    if recipient is not None and (not isinstance(recipient, str) or not recipient):
        raise ValueError(f"recipient must be an agent id, got {recipient!r}")
    return recipient


def _short(value: Any) -> Any:
    if isinstance(value, str):
        return value[: _LINE * 2]
    return value if value is None or isinstance(value, int | float | bool) else repr(value)[:_LINE]


def _exit(code: int | None) -> tuple[int | None, str | None]:
    """(exit status, signal name) of the sandbox: bwrap passes its command's status, and
    128 + N when a signal ended it; a negative code is bwrap itself killed."""
    if code is None:
        return None, None
    number = -code if code < 0 else code - 128 if code > 128 else 0
    if number:
        try:
            return code, signals.Signals(number).name
        except ValueError:
            return code, f"signal {number}"
    return code, None


class SandboxSupervisor:
    """The kernel's sandboxed agents (``kernel.sandboxes``): :meth:`spawn` starts one.

    ``output``: where the agents' output lines go (default: this module's logger at INFO)."""

    def __init__(self, kernel: SupervisingKernel, output: Output | None = None) -> None:
        self.kernel = kernel
        self.output: Output = output or _log_line
        self.runs: dict[str, SandboxedRun] = {}

    async def spawn(
        self,
        agent: Any,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        spec: SandboxSpec,
        *,
        proc: AgentProcess,
        bus: AMB | None = None,
        entry: str = "main",
    ) -> Callable[[], Awaitable[Any]]:
        """Start ``agent`` (a script path or a module-level async function) as ``proc`` in a
        sandbox made to ``spec``; returns the coroutine function that waits for its end (the
        kernel runs it as the agent's task). Raises KernelError, SandboxUnavailable,
        SandboxConfigError."""
        if not isinstance(spec, SandboxSpec):
            raise SandboxConfigError(f"sandbox= takes a SandboxSpec, not {type(spec).__name__}")
        target = Entry.of(agent, entry)
        if bus is not None:
            self.kernel.attach(bus, agent_id=proc.id)
        run = SandboxedRun(self.kernel, proc, target, args, kwargs, bus, self.output)
        try:
            if bus is not None:
                await bus.connect()
            await run.launch(spec)
        except BaseException:
            await run.close()
            raise
        proc.life = Life.RUNNING if not proc.stopped else proc.life
        self.runs[proc.id] = run
        assert run.sandbox is not None
        await self.kernel.recorder.log(
            "agent_started",
            proc.id,
            {"name": proc.name, "sandbox_uid": run.sandbox.uid, "script": str(target.script)},
            execution_id=proc.id,
        )
        return lambda: self._wait(run)

    async def _wait(self, run: SandboxedRun) -> Any:
        proc = run.proc
        try:
            data = await run.lifetime(self.kernel.timeout)
        finally:
            try:
                await run.close()
            finally:
                self.runs.pop(proc.id, None)
                if not proc.killed:
                    proc.life = Life.TERMINATED
        status = data["status"]
        event = {"completed": "agent_completed", "killed": "agent_killed"}.get(status, "agent_failed")
        severity = {"completed": "info", "killed": "warning"}.get(status, "error")
        await self.kernel.recorder.log(event, proc.id, data, severity, execution_id=proc.id)
        if status == "killed":
            raise AgentStoppedError(f"sandboxed agent {proc.id} was killed")
        if status != "completed":
            raise SandboxedAgentError(proc.id, data["reason"], data)
        assert run.result is not None
        return run.result[1]


def _log_line(agent_id: str, line: str) -> None:
    log.info("[%s] %s", agent_id, line)
