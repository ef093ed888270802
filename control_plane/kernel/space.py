"""KernelSpace: registers agents, runs them under supervision, and governs what they do.

Over 400 lines: one class, the kernel's public face (the API reference's, docs/api-reference.md).

It is composed of parts it holds and delegates to: the :class:`~agent_os.control_plane.kernel.gate.Gate`
(``kernel.gate``), the :class:`~agent_os.control_plane.kernel.processes.ProcessTable`
(``kernel.processes``), the signal dispatcher (``kernel.signals``), the bus attachment
(``kernel.bus``), admission and the flight recorder. What it promises is in
``docs/control-plane.md`` (The kernel).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar, overload

from agent_os.amb.numbers import seconds, shown, whole
from agent_os.control_plane.actions.code import CodeLimits, CodeResult, CodeRunner
from agent_os.control_plane.actions.fs import FileSystem
from agent_os.control_plane.actions.mcp import McpTools
from agent_os.control_plane.actions.registry import ActionRegistry
from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.actions.snapshots import SnapshotStore
from agent_os.control_plane.actions.tools import ToolDef
from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import (
    AgentNotFound,
    AgentStoppedError,
    AgentTimeoutError,
    KernelError,
    PolicyError,
    PolicyViolationError,
    VerificationFailed,
)
from agent_os.control_plane.kernel.admission import Admission
from agent_os.control_plane.kernel.gate import Gate
from agent_os.control_plane.kernel.processes import ProcessTable
from agent_os.control_plane.kernel.signals import SignalDispatcher
from agent_os.control_plane.kernel.submit import ActionDecision, Submitter
from agent_os.control_plane.kernel.supervisor import SandboxSupervisor
from agent_os.control_plane.mediation.attachment import BusAttachment
from agent_os.control_plane.mediation.mediator import Mediator
from agent_os.control_plane.policy.decision import Decision
from agent_os.control_plane.policy.policy import PermissionSource, Policy
from agent_os.control_plane.policy.policy_set import PolicySet
from agent_os.control_plane.policy.ratelimit import RateLimit, RateLimiter
from agent_os.control_plane.process import RUNNING_AGENT, AgentProcess, AgentStatus, Life
from agent_os.control_plane.recorder import FlightRecorder, Record
from agent_os.control_plane.sandbox.bwrap import SandboxSpec

if TYPE_CHECKING:
    from agent_os.amb import AMB

log = logging.getLogger(__name__)

# An agent function: what ``register`` takes, and (for type checkers) what it gives back.
_AgentFn = TypeVar("_AgentFn", bound=Callable[..., Awaitable[Any]])
_P = ParamSpec("_P")


class Verifier(Protocol):
    """A kernel module (``add_module``): CMVK, or anything with this method returning an
    object with ``verified`` (and optionally ``reason``, ``confidence``)."""

    async def verify(self, prompt: Any, response: Any, context: Any = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class RegisteredAgent:
    """What ``register`` noted about an agent function."""

    name: str
    fn: Callable[..., Awaitable[Any]]
    permissions: frozenset[str] | None
    limiter: RateLimiter | None
    priority: int


class KernelSpace:
    """The orchestrator: agents, their executions and signals, and the gate on what they do.

    Args: ``policy`` (a Policy or a built-in name), ``policies`` (several policies); the kernel
    applies exactly the policies given, all of which must allow (``policy`` first), and the
    built-in ``"strict"`` only when neither is given; ``flight_recorder`` (default: an in-memory
    recorder), ``signal_dispatcher`` (an unbound dispatcher, ``SignalDispatcher(None, ...)``,
    becomes this kernel's; default: a new one; ``SignalDispatcher(kernel, ...)`` later replaces
    it, keeping its handlers), ``max_concurrent_agents``, ``timeout`` (default seconds per
    execution), ``debug`` (log every decision, signal and lifecycle record; sets the
    ``agent_os.control_plane`` logger to DEBUG); ``permissions`` (the trust-edge hook for
    ``conditions={"permission": ...}``), ``signal_timeout`` (how long a signal sent to another
    process waits for its answer), ``keep_finished``: how many finished executions
    (``execute``/``spawn``) stay known for ``get_agent_status``/``wait_all`` before the
    oldest are forgotten (running agents and attached bus agents are always kept), so a
    long-running kernel does not grow without bound.
    ``workspace``: a directory for the ``fs.*`` actions; ``snapshots``: where ``fs.write`` and
    ``fs.delete`` keep what they change for :meth:`rollback` (None: a default
    :class:`~agent_os.control_plane.actions.snapshots.SnapshotStore`; False: none, and no
    ``fs.rollback``).
    ``code_limits`` and ``code_pool``: the default (and most) limits of :meth:`run_code` and
    how many Monty workers and CPython sandboxes are kept warm (started on first use).
    ``authoritative`` (set by the control-plane service): a signal to an agent this kernel
    does not know creates its process here instead of going out on the bus.
    Raises PolicyError for an unknown policy name or an empty ``policies`` alone, KernelError
    for ``keep_finished < 0``, a ``signal_dispatcher`` bound to another kernel, or a
    ``workspace`` that is not a directory.
    """

    def __init__(
        self,
        policy: str | Policy | None = None,
        flight_recorder: FlightRecorder | None = None,
        signal_dispatcher: SignalDispatcher | None = None,
        max_concurrent_agents: int = 100,
        timeout: float = 300.0,
        debug: bool = False,
        *,
        policies: Sequence[Policy] | None = None,
        permissions: PermissionSource | None = None,
        signal_timeout: float = 2.0,
        keep_finished: int = 1000,
        workspace: str | os.PathLike[str] | None = None,
        snapshots: SnapshotStore | Literal[False] | None = None,
        code_limits: CodeLimits | None = None,
        code_pool: int = 2,
    ) -> None:
        whole(keep_finished, "keep_finished", 0, error=KernelError)
        whole(max_concurrent_agents, "max_concurrent_agents", error=KernelError)
        if timeout is not None:  # None: no time limit
            timeout = seconds(timeout, "timeout", error=KernelError)
        signal_timeout = seconds(signal_timeout, "signal_timeout", error=KernelError)
        chosen = _policies(policy, policies)
        if permissions is not None:
            for each in chosen:
                each.permissions = permissions
        dispatcher = signal_dispatcher if signal_dispatcher is not None else SignalDispatcher()
        self.recorder = flight_recorder or FlightRecorder(storage="memory")
        policy_in_force = chosen[0] if len(chosen) == 1 else PolicySet(chosen)
        self.gate = Gate(policy_in_force, self.recorder, dispatcher, debug)
        self.processes = ProcessTable(self.recorder, dispatcher.queue_size)
        self.bus: BusAttachment = BusAttachment(self)
        self.adopt(dispatcher)
        self.max_concurrent_agents = max_concurrent_agents
        self.timeout = timeout
        if debug:
            logging.getLogger("agent_os.control_plane").setLevel(logging.DEBUG)
        self.authoritative = False
        self.signal_timeout = signal_timeout
        self.modules: list[Verifier] = []
        self._agents: dict[Callable[..., Any], RegisteredAgent] = {}
        self._governed: set[Callable[..., Any]] = set()  # the wrappers register returned
        self._runs: dict[str, asyncio.Task[Any]] = {}
        self._last: AgentProcess | None = None
        self._admission = Admission(max_concurrent_agents)
        self.keep_finished = keep_finished
        self._finished: deque[str] = deque()
        self.actions = ActionRegistry()
        self.snapshots: SnapshotStore | None = None
        if workspace is not None:
            if snapshots is not False:
                self.snapshots = SnapshotStore() if snapshots is None else snapshots
            FileSystem(workspace, snapshots=self.snapshots).register(self.actions)
        self._submitter = Submitter(self.gate, self.processes, self.actions)
        self.code = CodeRunner(
            self.submit, limits=code_limits, pool_size=code_pool, default_tools=self._code_tools
        )
        self.code.register(self.actions)
        self.sandboxes = SandboxSupervisor(self)

    @property
    def policy(self) -> Policy | PolicySet:
        """The policy (or set of policies) every decision is made by; the gate's."""
        return self.gate.policy

    @policy.setter
    def policy(self, policy: Policy | PolicySet) -> None:
        self.gate.policy = policy

    @property
    def debug(self) -> bool:
        """Whether this kernel logs every decision, signal and lifecycle record."""
        return self.gate.debug

    @debug.setter
    def debug(self, debug: bool) -> None:
        self.gate.debug = debug

    # -- registration --------------------------------------------------------------------------

    # The overloads only tell type checkers what the two forms give back: bare, an agent
    # function's own type; with options, a decorator keeping it. The wrapper is an ``async``
    # function with the agent's signature (``functools.wraps``), so calling it awaits the same
    # result. The implementation's signature below is the documented one.
    @overload
    def register(
        self,
        fn: _AgentFn,
        *,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        rate_limit: int | None = None,
        priority: int = 0,
    ) -> _AgentFn: ...

    @overload
    def register(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        rate_limit: int | None = None,
        priority: int = 0,
    ) -> Callable[[_AgentFn], _AgentFn]: ...

    def register(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        *,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        rate_limit: int | None = None,
        priority: int = 0,
    ) -> Any:
        """Register an agent: ``@kernel.register`` or ``@kernel.register(name=..., ...)``.

        Returns a wrapper that runs the agent through :meth:`execute` when called.
        """

        def decorator(f: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            if not asyncio.iscoroutinefunction(f):
                raise KernelError("an agent must be an async function")
            if whole(priority, "priority", -(2**31), error=KernelError) > 2**31:
                raise KernelError(f"priority must be from -2**31 to 2**31, got {shown(priority)}")
            agent = RegisteredAgent(
                name or getattr(f, "__name__", None) or type(f).__name__,
                f,
                frozenset(permissions) if permissions is not None else None,
                RateLimiter(RateLimit(rate_limit, 60.0)) if rate_limit is not None else None,
                priority,
            )

            @functools.wraps(f)
            async def governed(*args: Any, **kwargs: Any) -> Any:
                return await self.execute(governed, *args, **kwargs)

            self._agents[f] = self._agents[governed] = agent
            self._governed.add(governed)
            return governed

        return decorator(fn) if fn is not None else decorator

    @overload
    def govern(
        self,
        fn: Callable[_P, Any],
        *,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        rate_limit: int | None = None,
        priority: int = 0,
    ) -> Callable[_P, Awaitable[Any]]: ...

    @overload
    def govern(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        rate_limit: int | None = None,
        priority: int = 0,
    ) -> Callable[[Callable[_P, Any]], Callable[_P, Awaitable[Any]]]: ...

    def govern(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        permissions: Iterable[str] | None = None,
        rate_limit: int | None = None,
        priority: int = 0,
    ) -> Any:
        """Put an existing agent function under this kernel: ``@kernel.govern`` or
        ``kernel.govern(fn, name=..., ...)`` (the options of :meth:`register`).

        Returns an ``async`` wrapper whose every call is a governed execution (as
        :meth:`execute`: the run decision on its arguments, supervision, records). An ``async``
        function is registered as it is; a plain function (say, a framework's ``invoke``) runs
        in a worker thread (``asyncio.to_thread``), and an awaitable it returns is awaited. A
        function this kernel already governs is returned unchanged. Raises KernelError for
        something that is not callable."""

        def decorator(f: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            if f in self._governed:
                return f
            if not callable(f):
                raise KernelError(f"kernel.govern needs a function, got {type(f).__name__}")
            if asyncio.iscoroutinefunction(f):
                agent: Callable[..., Awaitable[Any]] = f
            else:

                @functools.wraps(f)
                async def agent(*args: Any, **kwargs: Any) -> Any:
                    result = await asyncio.to_thread(f, *args, **kwargs)
                    return await result if inspect.isawaitable(result) else result

            agent_name = name or getattr(f, "__name__", None) or type(f).__name__
            return self.register(
                agent, name=agent_name, permissions=permissions, rate_limit=rate_limit, priority=priority
            )

        return decorator(fn) if fn is not None else decorator

    def add_module(self, module: Verifier) -> None:
        """Add a verifier (CMVK or any object with ``async verify(prompt, response, context)``)."""
        if not callable(getattr(module, "verify", None)):
            raise KernelError("a kernel module needs an async verify(prompt, response, context) method")
        self.modules.append(module)

    # -- running -------------------------------------------------------------------------------

    async def execute(
        self,
        agent: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a registered agent to completion and return its (verified) result.

        Raises KernelError (not registered), RateLimitExceeded, AgentTimeoutError (past the
        timeout; SIGALRM was sent), AgentStoppedError (killed or terminated),
        VerificationFailed, or what the agent raised.
        """
        if timeout is not None:
            timeout = seconds(timeout, "timeout", error=KernelError)
        proc = self._new_process(agent, None, True, None)
        return await self._run(proc, agent, args, kwargs, timeout, context)

    async def spawn(
        self,
        agent: Callable[..., Any] | str | os.PathLike[str],
        *args: Any,
        parent_id: str | None = None,
        inherit_permissions: bool = True,
        additional_restrictions: list[str] | None = None,
        sandbox: SandboxSpec | None = None,
        bus: AMB | None = None,
        permissions: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Start a child agent in the background and return its id (see :meth:`wait_all`).

        With ``sandbox`` (a :class:`~agent_os.control_plane.sandbox.SandboxSpec`) the agent runs
        in its own process in an OS sandbox whose only way out is this kernel
        (``docs/sandbox.md``, Sandboxed agents): ``agent`` is a script path whose ``async def
        main(agent, *args, **kwargs)`` runs there, or a module-level async function (its file is
        loaded there); ``bus``: the agent's bus client, not yet connected (the kernel attaches,
        connects and at the end closes it; its ``agent_id`` is the agent's id, and its IATP
        middleware signs with the agent's key, which stays in this process); ``permissions``:
        the agent's permissions (with those a registered function has). Its id is the bus
        client's ``agent_id``, else the script's (or function's) name. The agent's end is one
        ``agent_completed``, ``agent_failed`` or ``agent_killed`` record with the reason;
        :meth:`wait_all` gives its result or raises SandboxedAgentError (AgentStoppedError when
        killed). Raises KernelError (bad agent, an id in use, ``bus``/``permissions`` without
        ``sandbox``), SandboxUnavailable (this host cannot sandbox: never run unsandboxed),
        SandboxConfigError."""
        if sandbox is not None:
            proc = self._sandboxed_process(
                agent, bus, permissions, parent_id, inherit_permissions, additional_restrictions
            )
            self.processes.add(proc)
            try:
                wait = await self.sandboxes.spawn(agent, args, kwargs, sandbox, proc=proc, bus=bus)
            except BaseException:
                proc.life = Life.TERMINATED
                self.processes.forget(proc.id)
                raise
            self._runs[proc.id] = asyncio.get_running_loop().create_task(self._finish(proc, wait))
            return proc.id
        if bus is not None or permissions is not None:
            raise KernelError("bus= and permissions= are for sandboxed agents (sandbox=SandboxSpec(...))")
        if not callable(agent):
            raise KernelError(f"{agent!r} is a script: it runs only sandboxed (sandbox=SandboxSpec(...))")
        proc = self._new_process(agent, parent_id, inherit_permissions, additional_restrictions)
        coro = self._run(proc, agent, args, kwargs, None, None)
        self._runs[proc.id] = asyncio.get_running_loop().create_task(coro)
        return proc.id

    def _sandboxed_process(
        self,
        agent: Any,
        bus: AMB | None,
        permissions: Iterable[str] | None,
        parent_id: str | None,
        inherit: bool,
        restrictions: Sequence[str] | None,
    ) -> AgentProcess:
        spec = self._agents.get(agent) if callable(agent) else None
        if isinstance(agent, str | os.PathLike):
            path = Path(agent)
            name = (path if path.exists() else Path(str(agent).rpartition(":")[0] or path)).stem
        else:
            name = spec.name if spec is not None else getattr(agent, "__name__", type(agent).__name__)
        agent_id = bus.agent_id if bus is not None else name
        known = self.processes.find(agent_id)
        if known is not None and not known.killed:
            raise KernelError(f"agent id {agent_id!r} is in use")
        perms = _intersect(spec.permissions if spec is not None else None, _frozen(permissions))
        parent, perms, denied = self._lineage(parent_id, perms, inherit, restrictions)
        proc = AgentProcess(
            agent_id,
            name,
            perms,
            parent.id if parent is not None else None,
            self.signals.queue_size,
            recorder=self.recorder,
        )
        proc.restrictions = frozenset(denied)
        return proc

    async def _finish(self, proc: AgentProcess, wait: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await wait()
        finally:
            self._forget_old(proc)

    async def wait_all(self, agent_ids: Sequence[str]) -> list[Any]:
        """The results of spawned agents, in the order of ``agent_ids``; raises the first error."""
        try:
            tasks = [self._runs[i] for i in agent_ids]
        except KeyError as exc:
            raise AgentNotFound(f"no spawned agent {exc.args[0]!r}") from None
        return list(await asyncio.gather(*tasks))

    def _new_process(
        self,
        agent: Callable[..., Any],
        parent_id: str | None,
        inherit: bool,
        restrictions: Sequence[str] | None,
    ) -> AgentProcess:
        spec = self._agents.get(agent)
        if spec is None:
            raise KernelError(f"{getattr(agent, '__name__', agent)!r} is not registered with this kernel")
        parent, perms, denied = self._lineage(parent_id, spec.permissions, inherit, restrictions)
        proc = AgentProcess(
            str(uuid.uuid4()),
            spec.name,
            perms,
            parent.id if parent is not None else None,
            self.signals.queue_size,
            recorder=self.recorder,
        )
        proc.restrictions = frozenset(denied)
        self.processes.add(proc)
        return proc

    def _lineage(
        self,
        parent_id: str | None,
        perms: frozenset[str] | None,
        inherit: bool,
        restrictions: Sequence[str] | None,
    ) -> tuple[AgentProcess | None, frozenset[str] | None, set[str]]:
        """A new agent's parent, permissions (inherited per the policy) and restrictions."""
        denied: set[str] = set()
        parent = self.processes.find(parent_id) if parent_id else RUNNING_AGENT.get()
        if parent_id and parent is None:
            raise AgentNotFound(f"no agent {parent_id!r}")
        if parent is not None:
            denied |= parent.restrictions  # restrictions are never shed
            mode = self.policy.inheritance
            if inherit and mode == "strict":
                perms = _intersect(perms, parent.permissions)
            elif inherit and mode == "permissive" and perms is None:
                perms = parent.permissions
        for r in restrictions or ():
            if not r.startswith("no_") or len(r) < 4:
                raise PolicyError(f"a restriction looks like 'no_<permission>', got {r!r}")
            denied.add(r[3:])
        return parent, perms, denied

    async def _run(
        self,
        proc: AgentProcess,
        agent: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        context: Mapping[str, Any] | None,
    ) -> Any:
        try:
            return await self._supervise(proc, agent, args, kwargs, timeout, context)
        finally:
            self._forget_old(proc)

    def _forget_old(self, proc: AgentProcess) -> None:
        """Keep the last ``keep_finished`` finished executions; forget older ones."""
        self._finished.append(proc.id)
        while len(self._finished) > self.keep_finished:
            old = self._finished.popleft()
            self.processes.forget(old)
            self._runs.pop(old, None)  # its task has finished (or is returning right now)

    async def _supervise(
        self,
        proc: AgentProcess,
        agent: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        context: Mapping[str, Any] | None,
    ) -> Any:
        spec = self._agents[agent]
        extra = {"agent": spec.name, "context": dict(context or {}), "priority": spec.priority}
        try:
            await self.gate.authorize_run(proc, args, kwargs, extra, spec.limiter)
        except PolicyViolationError:
            proc.life = Life.TERMINATED
            raise
        await self._admission.admit(spec.priority)
        limit = self.timeout if timeout is None else timeout
        try:
            proc.life = Life.RUNNING
            self._last = proc
            task = asyncio.get_running_loop().create_task(self._invoke(proc, spec.fn, args, kwargs))
            proc.track(task)
            done, _ = await asyncio.wait({task}, timeout=limit)
            if not done:
                await self.signals.send(proc.id, AgentSignal.SIGALRM)
                await self.signals.drain()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                proc.life = Life.TERMINATED
                await self._record("agent_failed", proc, {"status": "timeout", "timeout": limit}, "error")
                raise AgentTimeoutError(f"agent {proc.id} ran past its timeout of {limit:g}s")
            if task.cancelled() or proc.killed:
                await self._record("agent_killed", proc, {"status": "terminated"}, "warning")
                raise AgentStoppedError(f"agent {proc.id} was killed")
            exc = task.exception()
            if exc is not None:
                proc.life = Life.TERMINATED
                await self._record("agent_failed", proc, {"status": "failed", "error": repr(exc)}, "error")
                raise exc
            result = task.result()
            await self._verify(proc, args, kwargs, result, context)
            proc.life = Life.TERMINATED
            await self._record("agent_completed", proc, {"status": "completed"})
            return result
        finally:
            self._admission.release()

    async def _invoke(
        self,
        proc: AgentProcess,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        RUNNING_AGENT.set(proc)
        return await fn(*args, **kwargs)

    async def _verify(
        self,
        proc: AgentProcess,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        result: Any,
        context: Mapping[str, Any] | None,
    ) -> None:
        prompt: Any = args[0] if len(args) == 1 else args
        if kwargs:
            prompt = {"args": list(args), "kwargs": dict(kwargs)}
        for module in self.modules:
            outcome = await module.verify(prompt, result, dict(context or {}))
            ok = bool(getattr(outcome, "verified", False))
            data = {
                "module": type(module).__name__,
                "decision": "allow" if ok else "deny",
                "reason": getattr(outcome, "reason", None),
                "confidence": getattr(outcome, "confidence", None),
            }
            await self._record("verification", proc, data, "info" if ok else "warning")
            if not ok:
                proc.violations_count += 1
                proc.life = Life.TERMINATED
                raise VerificationFailed(
                    f"{type(module).__name__} did not verify the result of {proc.name}: "
                    f"{getattr(outcome, 'reason', '')}",
                    result=outcome,
                )

    # -- signals and status --------------------------------------------------------------------

    async def send_signal(self, agent_id: str, signal: AgentSignal | str) -> bool:
        """Send a signal through ``kernel.signals`` (what signals do: ``docs/control-plane.md``);
        True when it took effect."""
        return await self.signals.send(agent_id, signal)

    def get_agent_status(self, agent_id: str) -> AgentStatus:
        """The agent's status; raises AgentNotFound."""
        return self.processes.get(agent_id).status()

    def get_agent(self, agent_id: str) -> AgentProcess:
        """The agent's process: what signals act on, with ``cleanup()``,
        ``save_state()`` and ``get_state()`` (``docs/api-reference.md``; see
        :class:`~agent_os.control_plane.process.AgentProcess`). Raises AgentNotFound."""
        return self.processes.get(agent_id)

    @property
    def current_agent(self) -> AgentProcess:
        """The process of :attr:`current_agent_id`: inside agent code (an execution, a handler
        of an attached client) the agent's own. Agent code publishes its state there
        (``kernel.current_agent.data["step"] = 3``, read by ``get_state``) and registers what
        to release on SIGTERM (``kernel.current_agent.add_cleanup(conn.close)``). Raises
        AgentNotFound when no agent has run yet."""
        proc = RUNNING_AGENT.get() or self._last
        if proc is None:
            raise AgentNotFound("no agent is running")
        return proc

    def agents(self) -> list[AgentStatus]:
        """The status of every agent this kernel knows."""
        return [p.status() for p in self.processes]

    @property
    def current_agent_id(self) -> str | None:
        """The agent whose code is running; outside agent code, the agent started most recently."""
        proc = RUNNING_AGENT.get() or self._last
        return None if proc is None else proc.id

    def is_stopped(self) -> bool:
        """True while the current agent is stopped (SIGSTOP)."""
        proc = RUNNING_AGENT.get() or self._last
        return proc is not None and proc.stopped

    async def wait_for_continue(self) -> None:
        """Wait until the current agent is continued; raises AgentStoppedError once killed."""
        proc = RUNNING_AGENT.get() or self._last
        if proc is not None:
            await proc.wait_for_continue()

    def adopt(self, dispatcher: SignalDispatcher) -> None:
        """Make ``dispatcher`` this kernel's (``kernel.signals``; what
        ``SignalDispatcher(kernel, ...)`` does), sharing the handlers of the dispatcher it
        replaces; its ``queue_size`` bounds every hold queue from now on. Raises KernelError
        when it is bound to another kernel."""
        if dispatcher.kernel is not None and dispatcher.kernel is not self:
            raise KernelError("this SignalDispatcher is bound to another KernelSpace")
        current: SignalDispatcher | None = getattr(self, "signals", None)
        if current is not None:
            dispatcher.join(current)
        dispatcher.kernel = self
        self.signals = dispatcher
        self.gate.signals = dispatcher
        self.processes.hold_limit = dispatcher.queue_size

    async def _record(
        self, event: str, proc: AgentProcess, data: Mapping[str, Any], severity: str = "info"
    ) -> None:
        if self.debug:
            log.debug("%s %s (%s): %s", event, proc.id, proc.name, dict(data))
        await self.recorder.log(event, proc.id, {"name": proc.name, **data}, severity, execution_id=proc.id)

    def reload_policy(self, source: Policy | str | Path, *, policy: int | str | None = None) -> None:
        """Swap in new rules without stopping traffic (see :meth:`Policy.reload`).

        With several policies (``KernelSpace(policies=[...])``) ``policy`` names the one to
        replace: its index in the set or its name; without it the reload is refused rather
        than guessing. Raises PolicyError for a missing or unknown ``policy`` (or one given
        for a single policy that does not name it), PolicyLoadError for invalid YAML."""
        current = self.policy
        if isinstance(current, PolicySet):
            if policy is None:
                raise PolicyError(
                    f"this kernel has {len(current.policies)} policies ({current.name}): "
                    "say which one to reload with policy=<index or name>"
                )
            current.policy(policy).reload(source)
            return
        if policy is not None and policy not in (0, current.name):
            raise PolicyError(f"this kernel has one policy, {current.name!r}; there is no {policy!r}")
        current.reload(source)

    async def close(self) -> None:
        """Stop spawned agents still running, wait for signal handlers, stop the code runners
        (the kernel's and one registered in its place), close the connections of registered
        MCP tools (:class:`~agent_os.control_plane.actions.mcp.McpTools`), close the recorder."""
        for task in self._runs.values():
            task.cancel()
        await asyncio.gather(*self._runs.values(), return_exceptions=True)
        await self.signals.drain()
        registered = self.actions.get(CodeRunner.ACTION)
        runners = {id(r): r for r in (self.code, registered.provider if registered else None)}
        for runner in runners.values():
            if isinstance(runner, CodeRunner):
                await runner.close()
        for spec in self.actions:
            if isinstance(spec.provider, McpTools):
                await spec.provider.close()
        await self.recorder.close()

    async def __aenter__(self) -> KernelSpace:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the gate and the bus ------------------------------------------------------------------

    def decide(self, operation: str, resource: str, context: Mapping[str, Any] | None = None) -> Decision:
        """The decision on ``operation`` on ``resource`` for the running agent (its permissions,
        then the policy), without recording it or raising (see :meth:`Gate.decide`)."""
        return self.gate.decide(operation, resource, context)

    async def authorize(
        self, operation: str, resource: str, context: Mapping[str, Any] | None = None
    ) -> Decision:
        """The gate for actions that are not messages: check, record, and raise when denied.

        Waits while the running agent is stopped. Raises PolicyViolationError (or
        RateLimitExceeded), AgentStoppedError when the agent was killed.
        """
        return await self.gate.authorize(operation, resource, context)

    async def submit(self, request: ActionRequest) -> ActionResult:
        """Do an action through the kernel: identity, signals (a stopped agent waits for
        SIGCONT), the action's provider accepting the target, permissions, policy and rate
        limits, then the provider; one ``policy_decision`` and one ``action_outcome`` record
        when allowed, one record of the denial's kind when denied (``action_blocked``,
        ``permission_denied``, ``policy_violation``, ``rate_limit_exceeded``). A denial is a result with
        ``allowed=False`` and the reason in ``error``, not an exception
        (``docs/control-plane.md``, Actions). Raises RecorderError when a record cannot be
        stored."""
        return await self._submitter.submit(request)

    async def run_code(
        self,
        code: str,
        *,
        tools: Sequence[ToolDef] = (),
        inputs: Mapping[str, Any] | None = None,
        backend: Literal["monty", "cpython"] = "monty",
        limits: CodeLimits | None = None,
        agent_id: str | None = None,
    ) -> CodeResult:
        """Run agent-written Python: the ``code.run`` action through :meth:`submit` (governed,
        recorded and rate-limited like any; permission ``execute``, the resource the backend,
        the code the content rules see), on ``backend``: ``"monty"`` (pydantic-monty's
        interpreter, sub-millisecond starts, no OS access) or ``"cpython"`` (a real
        interpreter in a bubblewrap sandbox; refused where the host cannot sandbox).

        Each of ``tools`` (ToolDefs, as the agent loop takes them), and ``ask_llm`` while
        ``llm.ask`` is registered, is a function in the code whose call is a :meth:`submit`
        as the same agent; a denied call raises PermissionError in the code, a failed one
        RuntimeError. ``inputs``: plain data bound as globals; ``limits``: at most the
        kernel's ``code_limits``; ``agent_id``: outside agent code, the acting agent.

        Returns a CodeResult (``value``, ``stdout``, ``artifacts``, ``error``, ``tool_calls``,
        ``record_id``); a denial, a failure of the code or a limit is its ``error``, not an
        exception (``docs/code-execution.md``). Raises RecorderError."""
        params = {"code": code, "tools": tools, "inputs": inputs, "limits": limits}
        result = await self.submit(ActionRequest(CodeRunner.ACTION, backend, params, agent_id))
        return CodeResult.of(result, backend)

    def _code_tools(self) -> list[ToolDef]:
        """The tools every code run gets: ``ask_llm`` while ``llm.ask`` has a provider with a
        ``tool()`` (:class:`~agent_os.control_plane.actions.llm.LLM`)."""
        spec = self.actions.get("llm.ask")
        make = getattr(spec.provider, "tool", None) if spec is not None else None
        tool = make() if callable(make) else None
        return [tool] if isinstance(tool, ToolDef) else []

    async def decide_action(
        self,
        request: ActionRequest,
        *,
        refusal: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> ActionDecision:
        """The decision part of :meth:`submit`, for a control plane whose providers run in
        another process (mediated mode's tool service): identity, the action and its
        provider's ``resource``, permissions, policy and rate limits, and the one record
        (``policy_decision``, or ``policy_violation`` when denied). It does not wait for the
        agent's signals (the caller applied them; a killed agent is denied) and runs nothing:
        :meth:`record_action_outcome` records what came of it. ``refusal``: deny for this
        reason (the caller's own check of the request failed), recorded like any denial;
        ``context``: more fields the policy sees (of a request that came as a message: its
        ``sender``, ``verified``, ``trust_level``), under the action's own. Raises
        RecorderError."""
        return await self._submitter.decide(request, refusal, context)

    async def record_action_outcome(self, decided: ActionDecision, error: str | None = None) -> Record:
        """Record the outcome of an action :meth:`decide_action` allowed and another process
        ran: one ``action_outcome`` record (status ``ok``, or ``error`` with ``error``).
        Raises RecorderError."""
        return await self._submitter.record_outcome(decided, error)

    async def rollback(
        self, record_id: str, *, agent_id: str | None = None, force: bool = False
    ) -> ActionResult:
        """Undo the ``fs.write`` or ``fs.delete`` whose outcome is ``record_id`` (its
        ``ActionResult.record_id``): the ``fs.rollback`` action, submitted and governed like any
        (permission ``write`` on the path; one decision and one outcome record, or one denial).
        Inside agent code only the agent that made the change may; outside, ``agent_id`` names
        the acting agent. ``force``: roll back even when the file changed after the action.
        Unknown, expired or already rolled-back records are denied (``docs/control-plane.md``,
        Reversible actions)."""
        return await self.submit(ActionRequest("fs.rollback", record_id, {"force": force}, agent_id))

    def attach(
        self, client: AMB, *, agent_id: str | None = None, trust_bus: bool | None = None, **options: Any
    ) -> Mediator:
        """Govern ``client``: its messages pass this kernel's mediator (after IATP) and its agent
        can be signalled here and from other processes. Call before the client connects.

        ``trust_bus``: whether a message without an IATP result is from the sender it claims
        (None: only on the in-process ``memory`` broker); ``options`` go to the
        :class:`~agent_os.control_plane.mediation.mediator.Mediator`. Returns the mediator.
        Raises agent_os.amb.StateError once the client is connected."""
        return self.bus.attach(client, agent_id=agent_id, trust_bus=trust_bus, **options)

    def external(self, agent_id: str) -> AgentProcess:
        """The process of a bus agent (attached here, or living elsewhere in mediated mode),
        created on first use: signals sent to it here act on its messages passing this kernel."""
        return self.processes.external(agent_id)


def _policies(policy: str | Policy | None, policies: Sequence[Policy] | None) -> list[Policy]:
    """The policies a kernel applies: ``policy`` and every one of ``policies`` (all must allow);
    the built-in ``"strict"`` only when neither is given."""
    if policies is not None and not policies and policy is None:
        raise PolicyError("policies=[] names no policy: give at least one, or leave it out for 'strict'")
    chosen = [] if policy is None else [Policy.builtin(policy) if isinstance(policy, str) else policy]
    chosen += list(policies or ())
    return chosen or [Policy.builtin("strict")]


def _frozen(permissions: Iterable[str] | None) -> frozenset[str] | None:
    if isinstance(permissions, str):
        raise KernelError("permissions are a list of names, not one string")
    return None if permissions is None else frozenset(permissions)


def _intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    return a if b is None else a & b
