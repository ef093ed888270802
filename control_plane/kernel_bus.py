"""The kernel's side of the bus: attaching clients, signals to and from other processes."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, cast

from agent_os.amb.errors import BusError
from agent_os.control_plane.errors import KernelError
from agent_os.control_plane.process import AgentProcess, Life
from agent_os.control_plane.signals import AgentSignal, SignalDispatcher, control_subject

if TYPE_CHECKING:
    from agent_os.amb import AMB, Metadata
    from agent_os.control_plane.kernel import KernelSpace
    from agent_os.control_plane.mediator import Mediator
    from agent_os.control_plane.recorder import FlightRecorder


class KernelBus:
    """Mixed into :class:`~agent_os.control_plane.kernel.KernelSpace`."""

    _bus: list[AMB]
    _procs: dict[str, AgentProcess]
    signals: SignalDispatcher
    recorder: FlightRecorder
    signal_timeout: float
    authoritative: bool

    def _process(self, agent_id: str) -> AgentProcess:
        raise NotImplementedError  # provided by KernelSpace

    async def _send_remote(self, agent_id: str, sig: AgentSignal, sender: str | None) -> bool:
        if not self._bus:
            await self.recorder.log(
                "signal", agent_id, {"signal": sig.name, "outcome": "unknown_agent"}, "warning"
            )
            return False
        try:
            reply = await self._bus[0].request(
                control_subject(agent_id), {"signal": sig.name}, timeout=self.signal_timeout
            )
        except BusError as exc:
            await self.recorder.log(
                "signal",
                agent_id,
                {"signal": sig.name, "outcome": "remote_failed", "detail": repr(exc)},
                "warning",
            )
            return False
        await self.recorder.log(
            "signal", agent_id, {"signal": sig.name, "outcome": "sent_remote", "result": reply}, "info"
        )
        return isinstance(reply, dict) and reply.get("ok") is True

    # -- the bus -------------------------------------------------------------------------------

    def attach(
        self, client: AMB, *, agent_id: str | None = None, trust_bus: bool | None = None, **options: Any
    ) -> Mediator:
        """Govern ``client``: add the mediator as its innermost middleware (after IATP), make
        its agent signalable here and from other processes. Call before the client connects.

        ``trust_bus``: whether an inbound message *without* an IATP result is from the sender it
        claims. None (the default) trusts only the in-process ``memory`` broker (every client
        of it lives in this process); over NATS, Redis or Kafka a claim is not a sender unless
        ``trust_bus=True`` says the broker's ACLs authenticate senders: put IATP's middleware
        on the client instead. ``options`` go to :class:`~agent_os.control_plane.mediator.Mediator`.
        Returns the mediator. Raises amb StateError once the client is connected."""
        from agent_os.control_plane.mediator import Mediator

        if trust_bus is None:
            trust_bus = client.broker.name == "memory"

        aid = agent_id or client.agent_id
        proc = self.external(aid)
        mediator = Mediator(cast("KernelSpace", self), proc, trust_bus=trust_bus, **options)
        client.add_middleware(mediator)
        proc.clients.append(client)
        self._bus.append(client)
        client.subscribe(control_subject(aid))(functools.partial(self._on_control, client, aid))
        return mediator

    async def _on_control(self, client: AMB, agent_id: str, message: Any, metadata: Metadata) -> None:
        sig = AgentSignal.parse(message["signal"]) if isinstance(message, dict) else None
        if sig is None:
            raise KernelError("a control message needs {'signal': NAME}")
        sender = metadata.context.get("control_plane_sender")
        proc = self._process(agent_id)
        if sig in (AgentSignal.SIGKILL, AgentSignal.SIGTERM) and not proc.killed:
            # Answer first: the signal closes this very client.
            await client.reply(metadata, {"ok": True})
            await self.signals.send(agent_id, sig, sender=sender)
            return
        ok = await self.signals.send(agent_id, sig, sender=sender)
        await client.reply(metadata, {"ok": ok})

    def external(self, agent_id: str) -> AgentProcess:
        """The process of a bus agent (one attached here, or one that lives elsewhere in mediated
        mode), created on first use: signals sent to it here act on its messages passing this
        kernel."""
        proc = self._procs.get(agent_id)
        if proc is None:
            proc = AgentProcess(
                agent_id, agent_id, None, None, self.signals.queue_size, Life.RUNNING, recorder=self.recorder
            )
            self._procs[agent_id] = proc
        return proc
