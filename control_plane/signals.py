"""POSIX-style signals for agents, delivered locally and across processes over the bus.

What each signal does (these are enforced, not flags for agent code to poll):

=========  =========  ===========================================================================
signal     catchable  effect
=========  =========  ===========================================================================
SIGKILL    no         now: the agent is terminated, its tasks (execution, running handlers) are
                      cancelled, its held messages are dropped (each recorded once as
                      ``message_dropped``; deliveries are dead-lettered with reason
                      ``agent_killed``), its bus clients are closed; nothing of it is delivered
                      or published afterwards
SIGSTOP    no         now: the agent's deliveries and publishes wait in its bounded hold queue
                      (``queue_size``); ``kernel.is_stopped()`` is true for agent code
SIGCONT    yes        handlers run, then the hold queue is released in arrival order; a SIGSTOP
                      sent after it (while its handlers still run) wins: the agent stays stopped
SIGTERM    yes        handlers run (cleanup), then the agent's cleanup callbacks not run yet
                      (:meth:`AgentProcess.add_cleanup <control_plane.process.AgentProcess.add_cleanup>`),
                      then the agent is terminated as by SIGKILL, unless a handler returned
                      ``False``: that vetoes the termination (recorded as ``vetoed``; nothing
                      is cleaned up then; SIGKILL cannot be vetoed and runs no cleanup)
SIGUSR1/2  yes        handlers run; nothing else
SIGALRM    yes        sent by the kernel when an execution exceeds its timeout: handlers run, then
                      the execution is cancelled (``kernel.execute`` raises ``AgentTimeoutError``)
=========  =========  ===========================================================================

A masked catchable signal is ignored (``send`` returns False). SIGKILL and SIGSTOP cannot be
handled or masked: trying raises :class:`~agent_os.control_plane.errors.SignalError`.

**Handlers' return values.** The API reference's SIGTERM handler ends with ``return True  #
Allow termination``: a SIGTERM handler returning ``False`` (exactly False; None, True or a
handler that raises do not veto) keeps the agent running. With ``async_delivery=False``,
``send`` then returns False; with the default background delivery ``send`` has already returned
True (delivered) and the veto shows in the agent's state and the ``signal`` record. Other
signals' return values are ignored.

**Across processes.** A kernel that attaches a bus client subscribes, for each attached agent,
to the control subject ``_ctl.signal.<agent_id>``. :meth:`SignalDispatcher.send` for an agent
that is not local sends the signal there as a request and returns the remote ``send``'s
result; the receiving mediator checks it against policy as operation ``signal`` on resource
``<agent_id>``, so only senders the policy allows can signal an agent. Control messages skip the
hold queue (SIGCONT must reach a stopped agent).

**Dispatchers and their kernel.** A dispatcher is bound to one kernel, and every dispatcher
bound to a kernel shares that kernel's handlers: a handler registered on any of them runs on
every signal the kernel delivers, however it was sent (``kernel.send_signal``, any bound
dispatcher's ``send``, a signal arriving over the bus, a rule's ``on_violation``, SIGALRM on a
timeout). Binding happens in one of two ways, both keeping the handlers already registered:

- ``SignalDispatcher(kernel, queue_size=..., async_delivery=...)`` (the API reference's way): the
  kernel adopts the new dispatcher as ``kernel.signals``, so ``dispatcher.send`` *is*
  ``kernel.send_signal``; its ``queue_size`` bounds the hold queue of every agent of the kernel
  from then on, and its ``async_delivery`` applies to the signals the kernel sends itself. A
  dispatcher bound earlier (the kernel's default one, or another constructed with the kernel)
  stays bound: its handlers keep running and its ``send`` goes through the same kernel, waiting
  for the handlers or not by its own ``async_delivery``.
- ``KernelSpace(signal_dispatcher=SignalDispatcher(None, ...))``: a dispatcher created unbound
  (handlers may be registered on it first) becomes the kernel's when the kernel is created.

A dispatcher bound to one kernel cannot be given to another (KernelError); an unbound one
cannot send (SignalError).

**Agents not seen yet.** A kernel marked ``authoritative`` (the control-plane service's, which
every message of every agent passes) creates the process of an agent it does not know when it is
signalled, instead of sending the signal on the bus: the signal then applies to that agent's
messages from the first one on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from agent_os.control_plane.errors import AgentNotFound, SignalError

if TYPE_CHECKING:
    from agent_os.control_plane.kernel import KernelSpace

log = logging.getLogger(__name__)

CONTROL_PREFIX: Final = "_ctl.signal"


def control_subject(agent_id: str) -> str:
    """The subject on which ``agent_id`` receives signals from other processes."""
    return f"{CONTROL_PREFIX}.{agent_id}"


class AgentSignal(enum.Enum):
    """The signals of the API reference, with their POSIX numbers."""

    SIGKILL = 9
    SIGSTOP = 19
    SIGCONT = 18
    SIGTERM = 15
    SIGUSR1 = 10
    SIGUSR2 = 12
    SIGALRM = 14

    @property
    def catchable(self) -> bool:
        return self not in (AgentSignal.SIGKILL, AgentSignal.SIGSTOP)

    @classmethod
    def parse(cls, value: AgentSignal | str | int) -> AgentSignal:
        """``"SIGKILL"``, ``"kill"``, ``9`` or the member itself. Raises SignalError otherwise."""
        if isinstance(value, AgentSignal):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            name = value.upper()
            name = name if name.startswith("SIG") else "SIG" + name
            if name in cls.__members__:
                return cls[name]
        raise SignalError(f"unknown signal {value!r}")


SignalHandler = Callable[[str, AgentSignal], Awaitable[Any]]


class _Table:
    """What every dispatcher bound to one kernel shares: the handlers, and the deliveries
    running in the background (so that any of them can wait for all)."""

    __slots__ = ("background", "handlers")

    def __init__(self) -> None:
        self.handlers: dict[AgentSignal, list[tuple[str | None, SignalHandler]]] = {}
        self.background: set[asyncio.Task[Any]] = set()

    def take_over(self, other: _Table) -> None:
        for sig, entries in other.handlers.items():
            self.handlers.setdefault(sig, []).extend(entries)
        self.background |= other.background


class SignalDispatcher:
    """Sends signals to agents and runs their handlers.

    Example (the API reference's)::

        dispatcher = SignalDispatcher(kernel, queue_size=1000, async_delivery=True)

        @dispatcher.register_handler(AgentSignal.SIGUSR1)
        async def dump_state(agent_id: str, signal: AgentSignal) -> None:
            state = await kernel.get_agent(agent_id).get_state()
            await flight_recorder.log_state_dump(agent_id, state)

        await kernel.send_signal(agent_id, AgentSignal.SIGUSR1)   # runs dump_state

    Args:
        kernel: the KernelSpace whose agents this dispatcher signals. Given, the kernel adopts
            this dispatcher as ``kernel.signals`` and the two share their handlers (see
            "Dispatchers and their kernel" in the module docstring); None: unbound until a
            KernelSpace is created with it (``signal_dispatcher=``).
        queue_size: the bound of each agent's hold queue while it is stopped.
        async_delivery: run catchable handlers in the background (``send`` returns at once);
            with False, ``send`` returns after the handlers (and the signal's effect).

    Raises SignalError for ``queue_size < 1``, KernelError for a kernel this dispatcher cannot
    join.
    """

    def __init__(
        self, kernel: KernelSpace | None = None, queue_size: int = 1000, async_delivery: bool = True
    ) -> None:
        if queue_size < 1:
            raise SignalError("queue_size must be at least 1")
        self.kernel: KernelSpace | None = None
        self.queue_size = queue_size
        self.async_delivery = async_delivery
        self._table = _Table()
        if kernel is not None:
            kernel._adopt(self)

    def _join(self, other: SignalDispatcher) -> None:
        """Share ``other``'s handlers and background deliveries from now on (both are bound to
        one kernel); handlers registered on this one so far are kept."""
        if other._table is not self._table:
            other._table.take_over(self._table)
            self._table = other._table

    def register_handler(
        self, signal: AgentSignal | str, agent_id: str | None = None
    ) -> Callable[[SignalHandler], SignalHandler]:
        """Decorator: ``handler(agent_id, signal)`` runs when ``signal`` reaches an agent (only
        ``agent_id`` when given), whoever sent it: the handler is the kernel's, shared by every
        dispatcher bound to it. Raises SignalError for SIGKILL and SIGSTOP."""
        sig = AgentSignal.parse(signal)
        if not sig.catchable:
            raise SignalError(f"{sig.name} cannot be caught")

        def decorator(fn: SignalHandler) -> SignalHandler:
            self._table.handlers.setdefault(sig, []).append((agent_id, fn))
            return fn

        return decorator

    def mask(self, agent_id: str, signal: AgentSignal | str) -> None:
        """Ignore ``signal`` for ``agent_id`` from now on. Raises SignalError for SIGKILL/SIGSTOP."""
        sig = AgentSignal.parse(signal)
        if not sig.catchable:
            raise SignalError(f"{sig.name} cannot be masked")
        self._kernel()._process(agent_id).masked.add(sig)

    def unmask(self, agent_id: str, signal: AgentSignal | str) -> None:
        self._kernel()._process(agent_id).masked.discard(AgentSignal.parse(signal))

    def _kernel(self) -> KernelSpace:
        if self.kernel is None:
            raise SignalError("this dispatcher is not bound to a KernelSpace")
        return self.kernel

    async def send(
        self, agent_id: str, signal: AgentSignal | str | int, *, sender: str | None = None
    ) -> bool:
        """Deliver ``signal`` to ``agent_id``; True when it took effect (or was handled).

        Local agents are signalled directly; others through the bus (see the module docstring),
        which returns False when no kernel answers. Masked signals return False. Every signal
        is recorded in the kernel's flight recorder. The handlers that run are those of every
        dispatcher bound to the kernel. Raises SignalError for an unknown signal or an unbound
        dispatcher.
        """
        sig = AgentSignal.parse(signal)
        kernel = self._kernel()
        try:
            proc = kernel._process(agent_id)
        except AgentNotFound:
            if not kernel.authoritative:
                return await kernel._send_remote(agent_id, sig, sender)
            proc = kernel.external(agent_id)
        if proc.killed:
            await kernel._record_signal(proc.id, sig, "ignored", "agent already terminated", sender)
            return False
        if sig.catchable and sig in proc.masked:
            await kernel._record_signal(proc.id, sig, "ignored", "masked", sender)
            return False
        await kernel._record_signal(proc.id, sig, "delivered", "", sender)
        if sig is AgentSignal.SIGKILL:
            proc.kill()
            return True
        if sig is AgentSignal.SIGSTOP:
            proc.stop()
            return True
        if self.async_delivery:
            task = asyncio.get_running_loop().create_task(self._deliver(proc.id, sig, proc.stops))
            background = self._table.background
            background.add(task)
            task.add_done_callback(background.discard)
            return True
        return await self._deliver(proc.id, sig, proc.stops)

    async def _deliver(self, agent_id: str, sig: AgentSignal, stops: int) -> bool:
        """Run the handlers of a catchable signal, then apply its effect. ``stops``: the
        agent's SIGSTOP count when the signal was sent; a SIGCONT does not continue an agent
        stopped again since (signals take effect in the order they were sent, although SIGSTOP
        acts at once and SIGCONT only after its handlers)."""
        kernel = self._kernel()
        vetoed = False
        for target, handler in list(self._table.handlers.get(sig, ())):
            if target is None or target == agent_id:
                try:
                    outcome = await handler(agent_id, sig)
                except Exception as exc:
                    log.warning("handler for %s on %s failed: %r", sig.name, agent_id, exc)
                    await kernel._record_signal(agent_id, sig, "handler_error", repr(exc), None)
                else:
                    vetoed = vetoed or outcome is False
        proc = kernel._find(agent_id)
        if proc is None:
            return False
        if sig is AgentSignal.SIGCONT:
            if proc.stops == stops:
                proc.cont()
        elif sig is AgentSignal.SIGTERM:
            if vetoed:
                await kernel._record_signal(agent_id, sig, "vetoed", "a handler returned False", None)
                return False
            if not proc.killed:  # SIGKILL meanwhile: no cleanup
                try:
                    await proc.cleanup()  # what the handlers have not cleaned up
                except Exception as exc:
                    log.warning("cleanup of %s failed: %r", agent_id, exc)
                    await kernel._record_signal(agent_id, sig, "cleanup_error", repr(exc), None)
            proc.kill()
        return True

    async def drain(self) -> None:
        """Wait for handlers running in the background (those started by any dispatcher bound
        to the same kernel)."""
        background = self._table.background
        while background:
            await asyncio.gather(*list(background), return_exceptions=True)
