"""KernelSpace: registers agents, runs them under supervision, and governs their bus traffic.

Example::

    kernel = KernelSpace(policy="strict")

    @kernel.register(name="analyzer", permissions=["read"], rate_limit=60)
    async def analyzer(data: str) -> dict:
        await kernel.authorize("read", f"data/{data}")      # the gate for non-bus actions
        return {"analyzed": True}

    result = await kernel.execute(analyzer, "sample", context={"user_id": "u1"})

Choices (the API reference is a sketch; these make it sound):

- **Registration is the grant to run.** ``execute`` of a registered agent is allowed under any
  policy (subject to its ``rate_limit`` per minute and ``max_concurrent_agents``, admitted by
  ``priority``); what the agent *does* passes the policy: its bus traffic through an attached
  client (:meth:`attach`) and other actions through :meth:`authorize`. Calling the decorated
  function directly goes through ``execute`` too, so there is no way around the kernel.
- **Permissions** (``["read", "write", "execute", "network"]``): an agent with a permission list
  may only perform operations its list covers: an operation is covered by a permission of the
  same name; bus ``publish``/``request``/``reply`` are also covered by ``write`` and ``deliver``
  by ``read``. Restrictions ``"no_<permission>"`` remove one for good (children keep them).
- **Children** (``spawn``) get permissions by the policy's ``inheritance``: ``strict``: the
  intersection of the parent's and their own; ``permissive``: their own (or the parent's);
  ``none`` or ``inherit_permissions=False``: their own.
- ``current_agent_id`` is the agent whose code is running; outside agent code it is the agent
  started most recently (so the reference's signal example works from ``main``).
- Verifier modules (``add_module``: anything with ``async verify(prompt, response, context)``
  returning ``.verified``) check every result; an unverified result raises
  :class:`~agent_os.control_plane.errors.VerificationFailed` instead of being returned.
- ``debug=True`` turns on debug logging: the ``control_plane`` logger's level is set to DEBUG
  (process-wide, as logging levels are) and this kernel logs every decision (each message's,
  in both directions, and each ``authorize``), every signal and every lifecycle record there.
  With ``debug=False`` (the default) the kernel logs none of them and leaves the level alone.
- A verifier module gets the execution's arguments as its prompt: the single positional
  argument itself, else ``{"args": [...], "kwargs": {...}}`` when there are keyword arguments,
  else the tuple of positional arguments.
- ``authoritative`` (set by the control-plane service): a signal to an agent this kernel does
  not know creates the agent's (external) process here instead of going out on the bus, so it
  applies to the agent's messages passing this kernel from the first one on.
- Every decision is one flight-recorder record: ``execute``, ``policy_decision``,
  ``message_held``, ``message_dropped``, ``signal``, ``verification``; lifecycle records
  ``agent_completed`` / ``agent_failed`` / ``agent_killed`` carry ``data.status``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent_os.control_plane.admission import Admission
from agent_os.control_plane.errors import (
    AgentNotFound,
    AgentStoppedError,
    KernelError,
    PolicyError,
    RateLimitExceeded,
    VerificationFailed,
)
from agent_os.control_plane.kernel_bus import KernelBus
from agent_os.control_plane.kernel_gate import _CURRENT, KernelGate
from agent_os.control_plane.policy import PermissionSource, Policy, PolicySet
from agent_os.control_plane.process import AgentProcess, AgentStatus, Life
from agent_os.control_plane.ratelimit import RateLimit, RateLimiter
from agent_os.control_plane.recorder import FlightRecorder
from agent_os.control_plane.signals import AgentSignal, SignalDispatcher

if TYPE_CHECKING:
    from agent_os.amb import AMB

log = logging.getLogger("agent_os.control_plane.kernel")


class AgentTimeoutError(AgentStoppedError, TimeoutError):
    """An execution ran past its timeout; SIGALRM was sent and the execution cancelled."""

    reason = "timeout"


class Verifier(Protocol):
    async def verify(self, prompt: Any, response: Any, context: Any = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class RegisteredAgent:
    name: str
    fn: Callable[..., Awaitable[Any]]
    permissions: frozenset[str] | None
    limiter: RateLimiter | None
    priority: int


class KernelSpace(KernelGate, KernelBus):
    """The orchestrator (see the module docstring).

    Args: ``policy`` (a Policy or a built-in name), ``flight_recorder`` (default: an in-memory
    recorder), ``signal_dispatcher`` (an unbound dispatcher, ``SignalDispatcher(None, ...)``,
    becomes this kernel's; default: a new one; ``SignalDispatcher(kernel, ...)`` later replaces
    it, keeping its handlers: see :mod:`agent_os.control_plane.signals`), ``max_concurrent_agents``,
    ``timeout`` (default seconds per execution), ``debug``; and ``policies`` (several policies
    that must all allow) and ``permissions`` (the trust-edge hook for
    ``conditions={"permission": ...}``);
    ``keep_finished``: how many finished executions (``execute``/``spawn``) stay known for
    ``get_agent_status``/``wait_all`` before the oldest are forgotten (running agents and
    attached bus agents are always kept), so a long-running kernel does not grow without bound.
    Raises PolicyError for an unknown policy name, KernelError for ``keep_finished < 0`` or a
    ``signal_dispatcher`` bound to another kernel.
    """

    def __init__(
        self,
        policy: str | Policy = "strict",
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
    ) -> None:
        if keep_finished < 0:
            raise KernelError("keep_finished must be >= 0")
        base = Policy.builtin(policy) if isinstance(policy, str) else policy
        if permissions is not None:
            base.permissions = permissions
        self.policy: Policy | PolicySet = PolicySet([base, *policies]) if policies else base
        self.recorder = flight_recorder or FlightRecorder(storage="memory")
        self._procs: dict[str, AgentProcess] = {}
        self._adopt(signal_dispatcher if signal_dispatcher is not None else SignalDispatcher())
        self.max_concurrent_agents = max_concurrent_agents
        self.timeout = timeout
        self.debug = debug
        if debug:
            logging.getLogger("agent_os.control_plane").setLevel(logging.DEBUG)
        self.authoritative = False
        self.signal_timeout = signal_timeout
        self.modules: list[Verifier] = []
        self._agents: dict[Callable[..., Any], RegisteredAgent] = {}
        self._runs: dict[str, asyncio.Task[Any]] = {}
        self._last: AgentProcess | None = None
        self._admission = Admission(max_concurrent_agents)
        self._bus: list[AMB] = []
        self.keep_finished = keep_finished
        self._finished: deque[str] = deque()

    # -- registration --------------------------------------------------------------------------

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
            agent = RegisteredAgent(
                name or f.__name__,
                f,
                frozenset(permissions) if permissions is not None else None,
                RateLimiter(RateLimit(rate_limit, 60.0)) if rate_limit is not None else None,
                priority,
            )

            @functools.wraps(f)
            async def governed(*args: Any, **kwargs: Any) -> Any:
                return await self.execute(governed, *args, **kwargs)

            self._agents[f] = self._agents[governed] = agent
            return governed

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
        proc = self._new_process(agent, None, True, None)
        return await self._run(proc, agent, args, kwargs, timeout, context)

    async def spawn(
        self,
        agent: Callable[..., Any],
        *args: Any,
        parent_id: str | None = None,
        inherit_permissions: bool = True,
        additional_restrictions: list[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Start a child agent in the background and return its id (see :meth:`wait_all`)."""
        proc = self._new_process(agent, parent_id, inherit_permissions, additional_restrictions)
        coro = self._run(proc, agent, args, kwargs, None, None)
        self._runs[proc.id] = asyncio.get_running_loop().create_task(coro)
        return proc.id

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
        perms = spec.permissions
        denied: set[str] = set()
        parent = self._find(parent_id) if parent_id else _CURRENT.get()
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
        proc = AgentProcess(
            str(uuid.uuid4()),
            spec.name,
            perms,
            parent.id if parent is not None else None,
            self.signals.queue_size,
            recorder=self.recorder,
        )
        proc.restrictions = frozenset(denied)
        self._procs[proc.id] = proc
        return proc

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
            self._procs.pop(old, None)
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
        if spec.limiter is not None and not spec.limiter.take(spec.name):
            await self._record("execute", proc, {"decision": "deny", "reason": "rate limit"}, "warning")
            proc.life = Life.TERMINATED
            raise RateLimitExceeded(f"agent {spec.name} exceeded {spec.limiter.limit.limit} runs per minute")
        await self._record(
            "execute",
            proc,
            {
                "decision": "allow",
                "agent": spec.name,
                "context": dict(context or {}),
                "priority": spec.priority,
            },
        )
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
        _CURRENT.set(proc)
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
        """Send a signal (see :mod:`agent_os.control_plane.signals`); True when it took effect."""
        return await self.signals.send(agent_id, signal)

    def get_agent_status(self, agent_id: str) -> AgentStatus:
        """The agent's status; raises AgentNotFound."""
        return self._process(agent_id).status()

    def get_agent(self, agent_id: str) -> AgentProcess:
        """The agent's process: what signals act on, and the API reference's ``cleanup()``,
        ``save_state()`` and ``get_state()`` (see :class:`~agent_os.control_plane.process.AgentProcess`).
        Raises AgentNotFound."""
        return self._process(agent_id)

    @property
    def current_agent(self) -> AgentProcess:
        """The process of :attr:`current_agent_id`: inside agent code (an execution, a handler
        of an attached client) the agent's own. Agent code publishes its state there
        (``kernel.current_agent.data["step"] = 3``, read by ``get_state``) and registers what
        to release on SIGTERM (``kernel.current_agent.add_cleanup(conn.close)``). Raises
        AgentNotFound when no agent has run yet."""
        proc = _CURRENT.get() or self._last
        if proc is None:
            raise AgentNotFound("no agent is running")
        return proc

    def agents(self) -> list[AgentStatus]:
        return [p.status() for p in self._procs.values()]

    @property
    def current_agent_id(self) -> str | None:
        proc = _CURRENT.get() or self._last
        return None if proc is None else proc.id

    def is_stopped(self) -> bool:
        """True while the current agent is stopped (SIGSTOP)."""
        proc = _CURRENT.get() or self._last
        return proc is not None and proc.stopped

    async def wait_for_continue(self) -> None:
        """Wait until the current agent is continued; raises AgentStoppedError once killed."""
        proc = _CURRENT.get() or self._last
        if proc is not None:
            await proc.wait_for_continue()

    def _adopt(self, dispatcher: SignalDispatcher) -> None:
        """Make ``dispatcher`` this kernel's (``self.signals``), sharing the handlers of the
        dispatcher it replaces; its ``queue_size`` bounds every hold queue from now on. Raises
        KernelError when it is bound to another kernel."""
        if dispatcher.kernel is not None and dispatcher.kernel is not self:
            raise KernelError("this SignalDispatcher is bound to another KernelSpace")
        current: SignalDispatcher | None = getattr(self, "signals", None)
        if current is not None:
            dispatcher._join(current)
        dispatcher.kernel = self
        self.signals = dispatcher
        for proc in self._procs.values():
            proc.hold_limit = dispatcher.queue_size

    def _find(self, agent_id: str | None) -> AgentProcess | None:
        return self._procs.get(agent_id) if agent_id is not None else None

    def _process(self, agent_id: str) -> AgentProcess:
        proc = self._procs.get(agent_id)
        if proc is None:
            raise AgentNotFound(f"no agent {agent_id!r}")
        return proc

    async def _record(
        self, event: str, proc: AgentProcess, data: Mapping[str, Any], severity: str = "info"
    ) -> None:
        if self.debug:
            log.debug("%s %s (%s): %s", event, proc.id, proc.name, dict(data))
        await self.recorder.log(event, proc.id, {"name": proc.name, **data}, severity, execution_id=proc.id)

    async def _record_signal(
        self, agent_id: str, sig: AgentSignal, outcome: str, detail: str, sender: str | None
    ) -> None:
        if self.debug:
            log.debug("signal %s to %s: %s %s (sender %s)", sig.name, agent_id, outcome, detail, sender)
        await self.recorder.log(
            "signal",
            agent_id,
            {"signal": sig.name, "outcome": outcome, "detail": detail, "sender": sender},
            "warning" if not sig.catchable else "info",
        )

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
        """Stop spawned agents still running, wait for signal handlers, close the recorder."""
        for task in self._runs.values():
            task.cancel()
        await asyncio.gather(*self._runs.values(), return_exceptions=True)
        await self.signals.drain()
        await self.recorder.close()


def _intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    return a if b is None else a & b


def current_process() -> AgentProcess | None:
    return _CURRENT.get()
