"""The kernel's bus attachment: governing bus clients, and signals to and from other processes.

One :class:`BusAttachment` per kernel (``kernel.bus``); ``kernel.attach(client)`` is its
:meth:`~BusAttachment.attach`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Protocol

from agent_os.amb.errors import BusError, MessageRejected
from agent_os.control_plane.agent_signal import AgentSignal
from agent_os.control_plane.errors import KernelError
from agent_os.control_plane.mediation.control import control_subject
from agent_os.control_plane.mediation.mediator import Mediator
from agent_os.control_plane.mediation.protocols import MediatedKernel
from agent_os.iatp.middleware import BIND_TOPIC

if TYPE_CHECKING:
    from agent_os.amb import AMB, Metadata, Subscription
    from agent_os.control_plane.process import AgentProcess


class Signaller(Protocol):
    """Delivers a signal to an agent of this kernel (a SignalDispatcher)."""

    async def send(
        self, agent_id: str, signal: AgentSignal | str | int, *, sender: str | None = None
    ) -> bool: ...


class AttachingKernel(MediatedKernel, Protocol):
    """What the bus attachment needs of its kernel (a KernelSpace): the mediator's needs, its
    signal dispatcher, its agents, and how long a remote signal waits for its answer."""

    @property
    def signals(self) -> Signaller: ...

    @property
    def signal_timeout(self) -> float: ...

    def get_agent(self, agent_id: str) -> AgentProcess: ...


class BusAttachment:
    """The bus clients a kernel governs, and the first of them as its way to other kernels."""

    def __init__(self, kernel: AttachingKernel) -> None:
        self.kernel = kernel
        self.clients: list[AMB] = []

    def attach(
        self, client: AMB, *, agent_id: str | None = None, trust_bus: bool | None = None, **options: Any
    ) -> Mediator:
        """Govern ``client``: add a :class:`~agent_os.control_plane.mediation.mediator.Mediator`
        as its innermost middleware (after IATP), make its agent signalable here and from other
        processes. Call before the client connects.

        ``trust_bus``: whether an inbound message *without* an IATP result is from the sender it
        claims; None (the default) trusts only the in-process ``memory`` broker (the rule:
        ``docs/control-plane.md``, Who sent a message). ``options`` go to the Mediator.
        Returns the mediator. Raises agent_os.amb.StateError once the client is connected."""
        if trust_bus is None:
            trust_bus = client.broker.name == "memory"
        aid = agent_id or client.agent_id
        proc = self.kernel.external(aid)
        mediator = Mediator(self.kernel, proc, trust_bus=trust_bus, **options)
        client.add_middleware(mediator)
        proc.clients.append(client)
        self.clients.append(client)
        # Bound to the signed topic: IATP refuses a signal moved from another agent's subject
        # before the mediator records a decision on it (the handler checks too, for a bus
        # without IATP).
        client.subscribe(control_subject(aid), context={BIND_TOPIC: True})(
            functools.partial(self._on_control, client, aid)
        )
        return mediator

    async def expose(self, agent_id: str) -> Subscription:
        """Make ``agent_id``, an agent of this kernel (an execution, a spawned agent), signalable
        from other processes: subscribe its control subject on the first attached client, whose
        mediator judges each signal (operation ``signal`` on resource ``agent_id``) as for the
        client's own agent. Returns the subscription: unsubscribe it when the agent has ended.
        Raises KernelError without an attached client, AgentNotFound for an unknown agent."""
        if not self.clients:
            raise KernelError("no bus client is attached to this kernel: attach one first")
        self.kernel.get_agent(agent_id)
        client = self.clients[0]
        handler = functools.partial(self._on_control, client, agent_id)
        return await client.subscribe(control_subject(agent_id), handler, context={BIND_TOPIC: True})

    async def send_remote(self, agent_id: str, signal: AgentSignal, sender: str | None) -> bool:
        """Send ``signal`` to an agent of another process over the first attached client, as a
        request on its control subject; True when that kernel answers that it took effect.
        Records a ``signal`` record with the outcome; never raises a bus error."""
        recorder = self.kernel.recorder
        if not self.clients:
            await recorder.log(
                "signal", agent_id, {"signal": signal.name, "outcome": "unknown_agent"}, "warning"
            )
            return False
        try:
            reply = await self.clients[0].request(
                control_subject(agent_id), {"signal": signal.name}, timeout=self.kernel.signal_timeout
            )
        except BusError as exc:
            await recorder.log(
                "signal",
                agent_id,
                {"signal": signal.name, "outcome": "remote_failed", "detail": repr(exc)},
                "warning",
            )
            return False
        await recorder.log(
            "signal", agent_id, {"signal": signal.name, "outcome": "sent_remote", "result": reply}, "info"
        )
        return isinstance(reply, dict) and reply.get("ok") is True

    async def _on_control(self, client: AMB, agent_id: str, message: Any, metadata: Metadata) -> None:
        if metadata.topic != metadata.subject:
            # The policy judged the signal by its (signed) topic; the subject names the agent it
            # would act on. A signal for one agent replayed onto another's subject is refused.
            raise MessageRejected(
                f"a signal for {str(metadata.topic)[:200]!r} delivered on {metadata.subject!r}",
                reason="wrong_subject",
            )
        sig = AgentSignal.parse(message["signal"]) if isinstance(message, dict) else None
        if sig is None:
            raise KernelError("a control message needs {'signal': NAME}")
        sender = metadata.context.get("control_plane_sender")
        proc = self.kernel.get_agent(agent_id)
        signals = self.kernel.signals
        if sig in (AgentSignal.SIGKILL, AgentSignal.SIGTERM) and not proc.killed:
            # Answer first: the signal closes this very client.
            await client.reply(metadata, {"ok": True})
            await signals.send(agent_id, sig, sender=sender)
            return
        ok = await signals.send(agent_id, sig, sender=sender)
        await client.reply(metadata, {"ok": ok})
