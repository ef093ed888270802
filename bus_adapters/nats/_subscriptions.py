"""NATS subscriptions: core (ephemeral, at most once) and JetStream pull consumers (durable).

Both hand each message to the subscription's :class:`~agent_os.amb.dispatch.Dispatcher` inline,
in nats-py's callback task; the dispatcher's queue holds only local redeliveries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent_os.amb.broker import DeliveryHandler
from agent_os.amb.dispatch import Dispatcher, LocalDelivery
from agent_os.amb.errors import BusError
from agent_os.bus_adapters.nats._errors import translate

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from agent_os.bus_adapters.nats._broker import NatsBroker

log = logging.getLogger("agent_os.bus_adapters.nats")


class JetStreamDelivery:
    """A JetStream message; ``extra`` has ``stream``, ``stream_seq``, ``consumer_seq``, ..."""

    __slots__ = ("_msg", "attempt", "data", "extra", "subject")

    def __init__(self, msg: Msg) -> None:
        meta = msg.metadata
        self._msg = msg
        self.subject = msg.subject
        self.data = msg.data
        self.attempt = meta.num_delivered or 1
        self.extra: Mapping[str, Any] = {
            "stream": meta.stream,
            "consumer": meta.consumer,
            "stream_seq": meta.sequence.stream,
            "consumer_seq": meta.sequence.consumer,
            "num_pending": meta.num_pending,
            "timestamp": meta.timestamp,
            # Resets the message's ack_wait: for a handler that runs longer (a background task).
            "in_progress": self.in_progress,
        }

    async def ack(self) -> None:
        try:
            await self._msg.ack()
        except Exception as exc:
            raise (translate(exc, "ack") or exc) from exc

    async def in_progress(self) -> None:
        """Tell the server the message is still being handled: its ``ack_wait`` starts again."""
        try:
            await self._msg.in_progress()
        except Exception as exc:
            raise (translate(exc, "in_progress") or exc) from exc

    async def nack(self, delay: float | None = None) -> None:
        try:
            await self._msg.nak(delay=delay)
        except Exception as exc:
            raise (translate(exc, "nack") or exc) from exc


_Item = LocalDelivery | JetStreamDelivery


class NatsSubscription:
    """A nats-py subscription feeding a dispatcher; stops by drain (finish what arrived) or
    unsubscribe (drop what is queued)."""

    def __init__(
        self, broker: NatsBroker, pattern: str, handler: DeliveryHandler, queue: str | None, max_pending: int
    ) -> None:
        self.broker = broker
        self.pattern = pattern
        self.queue = queue
        self.dispatcher: Dispatcher[_Item] = Dispatcher(
            handler, max_pending=max_pending, name=f"nats broker {pattern!r}"
        )
        self._nats_sub: Subscription | None = None
        self._stopped = False

    @property
    def handler_errors(self) -> int:
        return self.dispatcher.handler_errors

    async def resume(self, nc: Client) -> None:
        """Take messages from ``nc``, a new connection replacing one closed for good."""
        raise NotImplementedError

    async def _discard(self, items: list[_Item]) -> None:
        return None

    async def _stop_nats_sub(self, drain: bool, timeout: float | None) -> None:
        sub, self._nats_sub = self._nats_sub, None
        if sub is None:
            return
        try:
            if drain:
                await asyncio.wait_for(sub.drain(), timeout)  # type: ignore[no-untyped-call]
            else:
                await sub.unsubscribe()
        except Exception as exc:  # closed connection, drain timeout: interest goes with the connection
            log.debug("nats broker: stopping %r: %r", self.pattern, exc)

    async def unsubscribe(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.broker._forget(self)
        left = await self.dispatcher.stop(None, drop=True)
        if self.dispatcher.in_handler():
            # Called by the handler, inside nats-py's task: unsubscribing there would cancel the
            # handler itself. Finish the nats-py side once the handler has returned.
            self.broker._finish_after_handler(self, self._finish_unsubscribe(left))
            return
        await self._stop_nats_sub(drain=False, timeout=None)
        await self._discard(left)

    async def _finish_unsubscribe(self, left: list[_Item]) -> None:
        await self.dispatcher.stop(None, drop=True)
        await self._stop_nats_sub(drain=False, timeout=None)
        await self._discard(left)

    async def drain(self, timeout: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.broker._forget(self)
        if self.dispatcher.in_handler():
            self.broker._finish_after_handler(self, self._finish_unsubscribe([]))
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # nats-py's drain: no more interest, then every message already received goes through
        # the dispatcher; the dispatcher's stop then cancels a handler stuck past the deadline.
        await self._stop_nats_sub(drain=True, timeout=timeout)
        left = await self.dispatcher.stop(None if deadline is None else max(0.0, deadline - time.monotonic()))
        await self._discard(left)


async def round_trip(nc: Client, timeout: float) -> None:
    """A PING/PONG after every command written so far: when it returns, the server has
    processed them (SUBs have their interest, PUBs are queued to subscribers). nats-py's own
    ``flush()`` writes its PING straight to the socket, ahead of commands still in the client's
    write buffer, so its PONG alone does not prove that: have the buffer written first."""
    write_pending = getattr(nc, "_flush_pending", None)
    if write_pending is not None:
        await write_pending(force_flush=True)
    else:
        await asyncio.sleep(0)
    await nc.flush(timeout=max(1, int(timeout)))


class CoreSubscription(NatsSubscription):
    """A core NATS subscription (native wildcards and queue groups); nack redelivers locally."""

    async def resume(self, nc: Client) -> None:
        """Subscribe again on ``nc``, a new connection replacing one closed for good."""
        if self._stopped:
            return
        self.dispatcher.new_source()  # a new nats-py subscription calls from a new task
        await self.start(nc)

    async def start(self, nc: Client) -> None:
        # The dispatcher takes nats-py's messages itself (as LocalDelivery, attempt 1).
        cb = self.dispatcher.deliver_message
        self._nats_sub = await nc.subscribe(self.pattern, queue=self.queue or "", cb=cb)
        await round_trip(nc, self.broker.config.publish_timeout)  # the server has the interest


class DurableSubscription(NatsSubscription):
    """A durable JetStream pull consumer fed by long-lived pull requests on a private inbox."""

    def __init__(
        self,
        broker: NatsBroker,
        pattern: str,
        handler: DeliveryHandler,
        queue: str | None,
        max_pending: int,
        stream: str,
        durable: str,
    ) -> None:
        super().__init__(broker, pattern, handler, queue, max_pending)
        self.stream = stream
        self.durable = durable
        self._owed = 0  # messages the open pull requests may still bring
        self._last_pull = 0.0
        self._nc: Client | None = None
        self._inbox = ""
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._watchdog: asyncio.Task[None] | None = None
        self._receiving = False  # inside _on_msg, which asks for more itself
        self.dispatcher.on_handled = self._handled

    async def resume(self, nc: Client) -> None:
        """Pull again on ``nc``, a new connection replacing one closed for good (messages
        received on the old one and not acked are redelivered by the server after ``ack_wait``)."""
        if self._stopped:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.start(nc)

    async def start(self, nc: Client) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        self._nats_sub = await nc.subscribe(self._inbox, cb=self._on_msg)
        await self.pull(reset=True)
        await round_trip(nc, self.broker.config.publish_timeout)
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name=f"nats-pull:{self.durable}"
        )

    def _held(self) -> int:
        sub = self._nats_sub
        return len(self.dispatcher) + (sub.pending_msgs if sub is not None else 0)

    async def pull(self, reset: bool = False) -> None:
        """Ask for another batch once what is owed and held is at most half a batch.

        So a consumer holds at most about 1.5 batches of unacked messages: the rest stays with
        the server for other members of the durable, or for redelivery after a crash.
        """
        cfg = self.broker.config
        if reset:
            self._owed = 0
        if self.dispatcher.stopping or self._nc is None or self._owed + self._held() > cfg.pull_batch // 2:
            return
        request = {"batch": cfg.pull_batch, "expires": int(cfg.pull_expires * 1e9)}
        self._owed += cfg.pull_batch
        self._last_pull = time.monotonic()
        try:
            await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:  # the watchdog asks again once the connection is back
            self._owed -= cfg.pull_batch
            log.debug("nats broker: pull for %r failed: %r", self.durable, exc)

    def _handled(self) -> None:
        # A handler run by the dispatcher's own task (a redelivery, or a message queued behind
        # one) may have emptied what this consumer holds: ask for more if nothing is owed.
        if self._owed == 0 and not self._receiving and not self.dispatcher.stopping and not self._held():
            self.broker._spawn(self.pull())

    async def _watch(self) -> None:
        # A pull request dies with a server restart and nothing says so: ask again when silent.
        expires = self.broker.config.pull_expires
        while not self.dispatcher.stopping:
            await asyncio.sleep(expires / 2)
            if time.monotonic() - self._last_pull > expires + 1.0 and not self._held():
                await self.pull(reset=True)

    async def _on_msg(self, msg: Msg) -> None:
        self._last_pull = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            try:
                delivery = JetStreamDelivery(msg)
            except Exception as exc:
                # Not a message of the consumer (anyone may publish to this inbox): nothing to
                # ack or redeliver; counted, logged and dropped.
                self.broker.malformed += 1
                log.warning("nats broker: dropped a message on the pull inbox of %r: %r", self.durable, exc)
                return
            self._owed -= 1
            self._receiving = True
            try:
                await self.dispatcher.deliver(delivery)
            finally:
                self._receiving = False
            await self.pull()
            return
        if status == "100":  # idle heartbeat / flow control
            return
        # 408: a request expired; 409: it ended (consumer deleted, leadership change, ...).
        left = msg.headers.get("Nats-Pending-Messages") if msg.headers else None
        self._owed = max(0, self._owed - int(left)) if left and left.isdigit() else 0
        if status != "408":
            log.warning(
                "nats broker: pull for %r ended: %s %s",
                self.durable,
                status,
                msg.headers.get("Description", "") if msg.headers else "",
            )
        await self.pull()

    async def _discard(self, items: list[_Item]) -> None:
        # Messages this subscription will not handle go back to the consumer now rather than
        # after ack_wait.
        if self._watchdog is not None:
            self._watchdog.cancel()
        for item in items:
            try:
                await item.nack()
            except BusError as exc:
                log.debug("nats broker: nack on stop failed: %r", exc)
