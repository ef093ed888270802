"""SignalDispatcher: sends signals to a kernel's agents and runs their handlers.

What each signal does, how handlers' return values count, how signals cross processes and how
dispatchers share a kernel's handlers: ``docs/control-plane.md`` (Signals).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent_os.amb import tracing as _tracing
from agent_os.amb.numbers import whole
from agent_os.amb.stats import LabelCounts
from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import AgentNotFound, SignalError
from agent_os.control_plane.recorder.records import TRACE_EVENT

if TYPE_CHECKING:
    from agent_os.control_plane.kernel.processes import ProcessTable
    from agent_os.control_plane.recorder import FlightRecorder

log = logging.getLogger(__name__)


class RemoteSignals(Protocol):
    """Sends a signal to an agent of another process (the kernel's bus attachment)."""

    async def send_remote(self, agent_id: str, signal: AgentSignal, sender: str | None) -> bool: ...


class SignalHost(Protocol):
    """What a dispatcher needs of its kernel (a KernelSpace)."""

    authoritative: bool

    @property
    def processes(self) -> ProcessTable: ...

    @property
    def bus(self) -> RemoteSignals: ...

    @property
    def recorder(self) -> FlightRecorder: ...

    @property
    def debug(self) -> bool: ...

    def adopt(self, dispatcher: SignalDispatcher) -> None: ...


SignalHandler = Callable[[str, AgentSignal], Awaitable[Any]]


class _Table:
    """What every dispatcher bound to one kernel shares: the handlers, the deliveries
    running in the background (so that any of them can wait for all), and the signal counts."""

    __slots__ = ("background", "counts", "handlers")

    def __init__(self) -> None:
        self.handlers: dict[AgentSignal, list[tuple[str | None, SignalHandler]]] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self.counts = LabelCounts(2)

    def take_over(self, other: _Table) -> None:
        for sig, entries in other.handlers.items():
            self.handlers.setdefault(sig, []).extend(entries)
        self.background |= other.background
        for key, count in other.counts.items():
            self.counts.add(key, count)


class SignalDispatcher:
    """Sends signals to agents and runs their handlers.

    Example (the API reference's, ``docs/api-reference.md``)::

        dispatcher = SignalDispatcher(kernel, queue_size=1000, async_delivery=True)

        @dispatcher.register_handler(AgentSignal.SIGUSR1)
        async def dump_state(agent_id: str, signal: AgentSignal) -> None:
            state = await kernel.get_agent(agent_id).get_state()
            await flight_recorder.log_state_dump(agent_id, state)

        await kernel.send_signal(agent_id, AgentSignal.SIGUSR1)   # runs dump_state

    Args:
        kernel: the KernelSpace whose agents this dispatcher signals. Given, the kernel adopts
            this dispatcher as ``kernel.signals`` and the two share their handlers
            (``docs/control-plane.md``, Dispatchers and their kernel); None: unbound until a
            KernelSpace is created with it (``signal_dispatcher=``).
        queue_size: the bound of each agent's hold queue while it is stopped.
        async_delivery: run catchable handlers in the background (``send`` returns at once);
            with False, ``send`` returns after the handlers (and the signal's effect).

    Raises SignalError for ``queue_size < 1``, KernelError for a kernel this dispatcher cannot
    join.
    """

    def __init__(
        self, kernel: SignalHost | None = None, queue_size: int = 1000, async_delivery: bool = True
    ) -> None:
        whole(queue_size, "queue_size", error=SignalError)
        self.kernel: SignalHost | None = None
        self.queue_size = queue_size
        self.async_delivery = async_delivery
        self._table = _Table()
        if kernel is not None:
            kernel.adopt(self)

    def join(self, other: SignalDispatcher) -> None:
        """Share ``other``'s handlers and background deliveries from now on (both are bound to
        one kernel: the kernel calls this when it adopts this dispatcher in place of
        ``other``); handlers registered on this one so far are kept."""
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

    @property
    def counts(self) -> LabelCounts:
        """The signal records of the kernel (every dispatcher bound to it) by ``(signal name,
        outcome)``: ``delivered``, ``ignored``, ``handler_error``, ``vetoed``, ``cleanup_error``."""
        return self._table.counts

    def mask(self, agent_id: str, signal: AgentSignal | str) -> None:
        """Ignore ``signal`` for ``agent_id`` from now on. Raises SignalError for SIGKILL/SIGSTOP."""
        sig = AgentSignal.parse(signal)
        if not sig.catchable:
            raise SignalError(f"{sig.name} cannot be masked")
        self._kernel().processes.get(agent_id).masked.add(sig)

    def unmask(self, agent_id: str, signal: AgentSignal | str) -> None:
        self._kernel().processes.get(agent_id).masked.discard(AgentSignal.parse(signal))

    def _kernel(self) -> SignalHost:
        if self.kernel is None:
            raise SignalError("this dispatcher is not bound to a KernelSpace")
        return self.kernel

    async def send(
        self, agent_id: str, signal: AgentSignal | str | int, *, sender: str | None = None
    ) -> bool:
        """Deliver ``signal`` to ``agent_id``; True when it took effect (or was handled).

        Local agents are signalled directly; others through the bus (``docs/control-plane.md``),
        which returns False when no kernel answers. Masked signals return False. Every signal
        is recorded in the kernel's flight recorder. The handlers that run are those of every
        dispatcher bound to the kernel. Raises SignalError for an unknown signal or an unbound
        dispatcher.
        """
        sig = AgentSignal.parse(signal)
        attributes = {
            "agent_os.agent.id": agent_id,
            "agent_os.signal.name": sig.name,
            "agent_os.signal.sender": sender,
        }
        with _tracing.span(f"signal {sig.name}", attributes) as span:  # (nothing while tracing is off)
            took = await self._send(agent_id, sig, sender)
            if span is not None:
                span.set_attribute("agent_os.signal.took_effect", took)
            return took

    async def _send(self, agent_id: str, sig: AgentSignal, sender: str | None) -> bool:
        kernel = self._kernel()
        try:
            proc = kernel.processes.get(agent_id)
        except AgentNotFound:
            if not kernel.authoritative:
                return await kernel.bus.send_remote(agent_id, sig, sender)
            proc = kernel.processes.external(agent_id)
        if proc.killed:
            await self._record(kernel, proc.id, sig, "ignored", "agent already terminated", sender)
            return False
        if sig.catchable and sig in proc.masked:
            await self._record(kernel, proc.id, sig, "ignored", "masked", sender)
            return False
        await self._record(kernel, proc.id, sig, "delivered", "", sender)
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
                    await self._record(kernel, agent_id, sig, "handler_error", repr(exc), None)
                else:
                    vetoed = vetoed or outcome is False
        proc = kernel.processes.find(agent_id)
        if proc is None:
            return False
        if sig is AgentSignal.SIGCONT:
            if proc.stops == stops:
                proc.cont()
        elif sig is AgentSignal.SIGTERM:
            if vetoed:
                await self._record(kernel, agent_id, sig, "vetoed", "a handler returned False", None)
                return False
            if not proc.killed:  # SIGKILL meanwhile: no cleanup
                try:
                    await proc.cleanup()  # what the handlers have not cleaned up
                except Exception as exc:
                    log.warning("cleanup of %s failed: %r", agent_id, exc)
                    await self._record(kernel, agent_id, sig, "cleanup_error", repr(exc), None)
            proc.kill()
        return True

    async def drain(self) -> None:
        """Wait for handlers running in the background (those started by any dispatcher bound
        to the same kernel)."""
        background = self._table.background
        while background:
            await asyncio.gather(*list(background), return_exceptions=True)

    async def _record(
        self,
        kernel: SignalHost,
        agent_id: str,
        sig: AgentSignal,
        outcome: str,
        detail: str,
        sender: str | None,
    ) -> None:
        self._table.counts.add((sig.name, outcome))
        if kernel.debug:
            log.debug("signal %s to %s: %s %s (sender %s)", sig.name, agent_id, outcome, detail, sender)
        _tracing.add_event(
            TRACE_EVENT, {"agent_os.recorder.event": "signal", "agent_os.signal.outcome": outcome}
        )
        await kernel.recorder.log(
            "signal",
            agent_id,
            {"signal": sig.name, "outcome": outcome, "detail": detail, "sender": sender},
            "warning" if not sig.catchable else "info",
        )
