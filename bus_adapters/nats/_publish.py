"""Durable (JetStream) publishing with a bounded window of outstanding acknowledgements.

Unacknowledged messages are kept and sent again with the same ``Nats-Msg-Id`` until the stream
acknowledges them or ``publish_timeout`` passes (see ``docs/bus.md``, "nats").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.errors import BusError, TransportError
from agent_os.bus_adapters.nats._errors import transient, translate

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

log = logging.getLogger("agent_os.bus_adapters.nats")

_TICK: Final = 0.05  # how often unacknowledged publishes are checked


@dataclass(slots=True, eq=False)
class _Unacked:
    subject: str
    data: bytes
    msg_id: str
    give_up_at: float
    resend_at: float = 0.0
    future: asyncio.Future[Any] | None = None
    waiter: asyncio.Future[None] | None = None  # set when the publisher waits for this ack


class AckWindow:
    """JetStream publishes awaiting their acknowledgement, at most ``window`` at once."""

    def __init__(self, js: JetStreamContext, *, window: int, publish_timeout: float) -> None:
        self._js = js
        self.window = window
        self.publish_timeout = publish_timeout
        self.retry_after = min(2.0, publish_timeout / 2)
        self.confirmed = 0
        self.resent = 0
        self.failures = 0
        self._unacked: dict[str, _Unacked] = {}
        self._errors: list[BusError] = []  # failures not yet raised to the publisher
        self._room: asyncio.Future[None] | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self._watcher: asyncio.Task[None] | None = None

    def rebind(self, js: JetStreamContext) -> None:
        """Send through ``js`` (a new connection's) from now on; what awaits an ack is sent
        again on it at the watcher's next tick."""
        self._js = js
        for entry in self._unacked.values():
            entry.resend_at = 0.0

    @property
    def outstanding(self) -> int:
        """Durable publishes sent but not yet acknowledged."""
        return len(self._unacked)

    async def publish(self, subject: str, data: bytes, *, confirm: bool) -> None:
        """Send through JetStream; with ``confirm`` wait for the ack. See ``docs/bus.md``, "nats"."""
        self._raise_failures()
        loop = asyncio.get_running_loop()
        while len(self._unacked) >= self.window:
            if self._room is None or self._room.done():
                self._room = loop.create_future()
            await self._room
            self._raise_failures()
        entry = _Unacked(subject, data, os.urandom(12).hex(), loop.time() + self.publish_timeout)
        if confirm:
            entry.waiter = loop.create_future()
        self._unacked[entry.msg_id] = entry
        self._empty.clear()
        if self._watcher is None:
            self._watcher = loop.create_task(self._watch(), name="nats-publish-acks")
        try:
            await self._send(entry)
        except BusError:
            self._settle(entry, None, report=False)
            raise
        if entry.waiter is not None:
            await entry.waiter

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every durable publish is acknowledged or given up, then raise the failures.

        Raises TransportError for publishes that were given up (or when ``timeout`` passes first).
        """
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            raise TransportError(
                f"{len(self._unacked)} durable publishes still unacknowledged after {timeout:g}s"
            ) from None
        self._raise_failures()

    async def close(self, timeout: float) -> None:
        """Flush for up to ``timeout`` seconds, then stop; failures are logged, not raised."""
        try:
            await self.flush(timeout)
        except TransportError as exc:
            log.error("nats broker: closing with durable publishes lost: %s", exc)
        if self._watcher is not None:
            self._watcher.cancel()
        for entry in list(self._unacked.values()):
            self._settle(entry, TransportError("the NATS broker closed before JetStream acknowledged"))

    # -- internals ----------------------------------------------------------------------------

    async def _send(self, entry: _Unacked) -> None:
        loop = asyncio.get_running_loop()
        entry.resend_at = loop.time() + self.retry_after
        try:
            fut = await self._js.publish_async(
                entry.subject, entry.data, headers={"Nats-Msg-Id": entry.msg_id}
            )
        except Exception as exc:
            if transient(exc):
                entry.resend_at = loop.time() + _TICK  # the watcher sends it again
                return
            raise (translate(exc, f"JetStream publish to {entry.subject!r}") or exc) from exc
        entry.future = fut
        fut.add_done_callback(functools.partial(self._on_ack, entry))

    def _on_ack(self, entry: _Unacked, fut: asyncio.Future[Any]) -> None:
        if entry.future is not fut or fut.cancelled() or self._unacked.get(entry.msg_id) is not entry:
            return  # superseded by a resend, or already settled
        exc = fut.exception()
        if exc is None:
            self.confirmed += 1
            self._settle(entry, None)
        elif transient(exc):
            entry.resend_at = 0.0  # the watcher sends it again on its next tick
        else:
            self._settle(
                entry,
                translate(exc, f"JetStream publish to {entry.subject!r}")
                or TransportError(f"JetStream publish to {entry.subject!r} failed: {exc!r}"),
            )

    def _settle(self, entry: _Unacked, error: BusError | None, *, report: bool = True) -> None:
        if self._unacked.pop(entry.msg_id, None) is None:
            return
        if entry.future is not None and not entry.future.done():
            entry.future.cancel()  # frees nats-py's slot for it
        if error is not None:
            self.failures += 1
            log.error("nats broker: %s", error)
            if entry.waiter is not None:
                if not entry.waiter.done():
                    entry.waiter.set_exception(error)
            elif report:
                self._errors.append(error)
        elif entry.waiter is not None and not entry.waiter.done():
            entry.waiter.set_result(None)
        room = self._room
        if room is not None and not room.done():
            self._room = None
            room.set_result(None)
        if not self._unacked:
            self._empty.set()

    def _raise_failures(self) -> None:
        if self._errors:
            errors, self._errors = self._errors, []
            raise TransportError(
                f"{len(errors)} durable publish(es) were not acknowledged by JetStream; first: {errors[0]}"
            ) from errors[0]

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._unacked:
                await asyncio.sleep(_TICK)
                now = loop.time()
                for entry in list(self._unacked.values()):
                    if entry.resend_at > now or self._unacked.get(entry.msg_id) is not entry:
                        continue
                    if now >= entry.give_up_at:
                        self._settle(
                            entry,
                            TransportError(
                                f"JetStream did not acknowledge the publish to {entry.subject!r} "
                                f"within {self.publish_timeout:g}s"
                            ),
                        )
                        continue
                    if entry.future is not None and not entry.future.done():
                        entry.future.cancel()
                    self.resent += 1
                    log.debug("nats broker: sending %s to %r again", entry.msg_id, entry.subject)
                    try:
                        await self._send(entry)
                    except BusError as exc:
                        self._settle(entry, exc)
                    except Exception as exc:  # untranslated: settle this one, keep watching
                        error = TransportError(f"JetStream publish to {entry.subject!r} failed: {exc!r}")
                        error.__cause__ = exc
                        self._settle(entry, error)
        finally:
            self._watcher = None
