"""The NATS broker client: connection, publishing, and subscription set-up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import random
import re
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

from agent_os.amb.broker import BrokerSubscription, Capabilities, DeliveryHandler, Lifecycle, LifecycleState
from agent_os.amb.dispatch import check_group_names, drain_all, stop_task
from agent_os.amb.errors import BrokerUnavailable, ConfigError
from agent_os.amb.subjects import INBOX_ROOT, plain_text, validate_pattern, validate_subject
from agent_os.bus_adapters.nats._config import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_URL,
    INSTALL_HINT,
    NAME_OK,
    NatsConfig,
    covers,
)
from agent_os.bus_adapters.nats._errors import translate, translated
from agent_os.bus_adapters.nats._jetstream import ensure_consumer, stream_for
from agent_os.bus_adapters.nats._publish import AckWindow
from agent_os.bus_adapters.nats._subscriptions import (
    CoreSubscription,
    DurableSubscription,
    NatsSubscription,
    round_trip,
)

if TYPE_CHECKING:
    from nats.aio.client import Client, Server
    from nats.js.manager import JetStreamManager

log = logging.getLogger("agent_os.bus_adapters.nats")

_ROUTE_CACHE_MAX: Final = 8192
_OPEN: Final = LifecycleState.OPEN  # an enum member read from the class costs ~70 ns per access
_WHITESPACE: Final = re.compile(r"\s")

_SEND_PUBLISH_PARAMS: Final = ["subject", "reply", "payload", "payload_size", "headers"]


def connected_status(nc: Client) -> int | None:
    """The ``_status`` value of a connected nats-py client, when the installed nats-py has the
    internal PUB send ``_send_publish(subject, reply, payload, payload_size, headers)`` and the
    state this adapter reads (else None: every publish takes the public ``Client.publish``).

    ``Client.publish`` spends about 0.3 µs per call on checks the adapter makes otherwise:
    subjects are validated once per subject; a client that is not connected (closed, draining,
    reconnecting) or a payload over the server's limit take the public path, which raises or
    buffers as nats-py does. So a core publish on a connected client goes straight to the send
    that ``publish`` itself ends in.
    """
    send = getattr(nc, "_send_publish", None)
    connected = getattr(type(nc), "CONNECTED", None)
    if send is None or type(connected) is not int or not inspect.iscoroutinefunction(send):
        return None
    if type(getattr(nc, "_status", None)) is not int or type(getattr(nc, "_max_payload", None)) is not int:
        return None
    try:
        params = list(inspect.signature(send).parameters)
    except (TypeError, ValueError):
        return None
    return connected if params == _SEND_PUBLISH_PARAMS else None


class NatsBroker(Lifecycle):
    """A NATS (and JetStream) client. ``NatsBroker("nats://HOST:PORT", **NatsConfig fields)``.

    Raises ConfigError for a bad URL or option; see ``docs/bus.md`` for the guarantees.
    """

    name = "nats"
    capabilities = Capabilities(
        durable=True,
        redelivery=True,
        queue_groups=True,
        wildcards=True,
        ordered_per_key=False,
        native_request_reply=True,
        max_payload=DEFAULT_MAX_PAYLOAD,
    )
    _what = "nats broker"

    def __init__(
        self, connection_string: str | None = None, *, config: NatsConfig | None = None, **options: Any
    ) -> None:
        if config is not None and options:
            raise ConfigError("pass either config= or keyword options, not both")
        try:
            self.config = config or NatsConfig(**options)
        except TypeError as exc:
            raise ConfigError(f"nats broker: {exc}") from None
        self.servers = [s.strip() for s in (connection_string or DEFAULT_URL).split(",") if s.strip()]
        for url in self.servers:
            if not re.match(r"^(nats|tls|ws|wss)://", url):
                raise ConfigError(f"nats broker URL must look like nats://HOST:PORT, got {url!r}")
        self._nc: Client | None = None
        self._jsm: JetStreamManager | None = None
        self._acks: AckWindow | None = None
        # nats-py's _status when connected, if core publishes may skip Client.publish's checks
        # (see connected_status()); -1: never.
        self._direct_status = -1
        self._subs: set[NatsSubscription] = set()
        self._stream_patterns: list[str] = list(self.config.stream_subjects)
        # subject -> "a stream captures it"; a subject is in it only once validated, so a
        # publish validates each subject once (nats-py's own per-publish check is off).
        self._routes: dict[str, bool] = {}
        self._confirm_all = self.config.confirm_publish
        self._background: set[asyncio.Task[Any]] = set()
        # Background tasks finishing a subscription's stop once the handler that stopped it has
        # returned (see NatsSubscription.unsubscribe), and that subscription; and the task
        # closing the connection after such a handler (see close).
        self._finishing: dict[asyncio.Task[Any], NatsSubscription] = {}
        self._closing: asyncio.Task[None] | None = None
        self._inbox = f"_INBOX.{os.urandom(12).hex()}"
        self._reopening: asyncio.Task[None] | None = None
        self.malformed = 0  # messages on a durable's pull inbox that are not the consumer's
        self.reopened = 0  # connections opened again after nats-py closed one for good

    @property
    def connection(self) -> Client:
        """The nats-py connection. Raises StateError before connect()."""
        return self._connected(self._nc)

    @property
    def publish_acks(self) -> AckWindow:
        """The window of durable publishes awaiting JetStream's ack (counters: ``confirmed``,
        ``resent``, ``failures``, ``outstanding``). Raises StateError before connect()."""
        return self._connected(self._acks)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while open and connected to a server; False while nats-py reconnects, and from
        the moment it closes the connection for good until this adapter has opened a new one."""
        nc = self._nc
        return self._state is _OPEN and nc is not None and nc.is_connected

    async def connect(self) -> None:
        """Connect (within ``connect_timeout``); raises BrokerUnavailable when no server answers."""
        if not self._begin_connect():
            return
        self._use(await self._open_connection())
        self._state = LifecycleState.OPEN

    async def _open_connection(self) -> Client:
        """A new connected nats-py client with this adapter's options; raises BrokerUnavailable."""
        try:
            from nats.aio.client import Client
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        nc = Client()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await nc.connect(
                    servers=self.servers,
                    name=self.config.name,
                    connect_timeout=max(1, int(self.config.connect_timeout)),
                    max_reconnect_attempts=-1,
                    reconnect_to_server_handler=self._next_server,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    # Subjects are checked by this adapter (stricter than nats-py, and once
                    # per subject instead of per publish); queue names too, in subscribe().
                    skip_subject_validation=True,
                )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise BrokerUnavailable(f"cannot connect to NATS at {', '.join(self.servers)}: {exc!r}") from exc
        return nc

    def _use(self, nc: Client) -> None:
        """Make ``nc`` the connection every publish, subscription and JetStream call goes to."""
        self._nc = nc
        direct = connected_status(nc)
        self._direct_status = -1 if direct is None else direct
        self._jsm = nc.jsm()
        if self._acks is None:
            self._acks = AckWindow(
                nc.jetstream(), window=self.config.publish_window, publish_timeout=self.config.publish_timeout
            )
        else:
            self._acks.rebind(nc.jetstream())
        self.capabilities = dataclasses.replace(self.capabilities, max_payload=nc.max_payload)

    async def _on_closed(self) -> None:
        # nats-py closes a connection for good on any -ERR from the server but a permissions
        # violation or a stale connection (a protocol line too long, a parser error, ...) and
        # never reconnects it. While this adapter is open that is not the user's close: open a
        # new connection and move every subscription to it.
        if self._state is not _OPEN:
            return
        error = getattr(self._nc, "last_error", None)
        if error is None:
            # Closed without an error: by whoever holds the nats-py connection (as when its
            # process is going away). Not reopened; ``connected`` says it is gone.
            log.error("nats broker: the server connection was closed outside the adapter")
            return
        log.error("nats broker: the server closed the connection for good (%s); opening a new one", error)
        task = self._reopening
        if task is None or task.done():
            self._reopening = asyncio.get_running_loop().create_task(self._reopen(), name="nats-reopen")

    async def _reopen(self) -> None:
        """Open a new connection while the current one is closed for good (retrying with
        backoff), then resume every subscription on it."""
        failures = 0
        while self._state is _OPEN:
            current = self._nc
            if current is not None and not current.is_closed:
                return
            try:
                nc = await self._open_connection()
            except BrokerUnavailable as exc:
                cfg = self.config
                delay = min(cfg.reconnect_wait_max, cfg.reconnect_wait * 2 ** min(failures, 20))
                failures += 1
                log.warning("nats broker: reopening failed (%s); again in %.2fs", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if self._state is not _OPEN:  # closed meanwhile
                with contextlib.suppress(Exception):
                    await nc.close()
                return
            self._use(nc)
            for sub in list(self._subs):
                try:
                    await sub.resume(nc)
                except Exception as exc:
                    log.error("nats broker: could not resume the subscription to %r: %r", sub.pattern, exc)
            self.reopened += 1
            log.warning("nats broker: connection reopened; %d subscriptions resumed", len(self._subs))

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        server = min(servers, key=lambda s: s.reconnects)
        cfg = self.config
        delay = min(cfg.reconnect_wait_max, cfg.reconnect_wait * 2 ** min(server.reconnects, 20))
        return server, delay * random.uniform(0.5, 1.0)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats broker: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if self._state is LifecycleState.OPEN:
            log.warning("nats broker: disconnected, reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("nats broker: reconnected")
        for sub in list(self._subs):
            if isinstance(sub, DurableSubscription):
                await sub.pull(reset=True)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait for durable publishes' acks, drain every subscription, close; all within ``timeout``."""
        if not self._begin_close():
            return
        deadline = time.monotonic() + timeout
        if self._reopening is not None:
            await stop_task(self._reopening)
        if self._acks is not None:
            await self._acks.close(timeout)
        subs = list(self._subs)
        self._subs.clear()
        await drain_all(subs, max(0.0, deadline - time.monotonic()))
        handlers = [task for task, sub in self._finishing.items() if sub.dispatcher.in_handler()]
        if handlers:
            # Called by a handler: closing the connection now would cancel it (nats-py cancels
            # every subscription's callback task). It closes once the handler has returned.
            self._closing = asyncio.get_running_loop().create_task(self._close_connection(deadline, handlers))
        else:
            await self._close_connection(deadline, [])
        self._state = LifecycleState.CLOSED

    async def _close_connection(self, deadline: float, after: list[asyncio.Task[Any]]) -> None:
        """Close the connection once the tasks ``after`` have ended (or at ``deadline``)."""
        if after:
            await asyncio.wait(after, timeout=max(0.0, deadline - time.monotonic()))
        for task in list(self._background):
            task.cancel()
        nc = self.connection
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), max(1.0, deadline - time.monotonic()))

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        """Publish ``data``; see ``docs/bus.md`` for what returning means on each kind of
        subject. Raises BrokerUnavailable / TransportError (a bad subject: ConfigError)."""
        if self._state is not _OPEN:
            self._require_open()
        if type(subject) is not str:  # the cache is keyed by plain text, never by a caller's object
            subject = plain_text(subject, "subject")
        durable = self._routes.get(subject)
        if durable is None:
            durable = self._route(subject)
        if durable:
            assert self._acks is not None  # guaranteed by the OPEN state
            await self._acks.publish(subject, data, confirm=self._confirm_all)
            return
        nc: Any = self._nc  # set while OPEN; Any: the fast path reads nats-py's private state
        try:
            if nc._status == self._direct_status and len(data) <= nc._max_payload:
                await nc._send_publish(subject, "", data, len(data), None)
            else:
                await nc.publish(subject, data)
            if self._confirm_all:
                await self._confirm(nc)
        except Exception as exc:
            raise (translate(exc, f"publish to {subject!r}") or exc) from exc

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every durable publish so far is acknowledged by JetStream (and core
        publishes are written). Raises TransportError for durable publishes given up."""
        self._require_open()
        assert self._acks is not None
        await self._acks.flush(timeout)
        with translated("flush"):
            await round_trip(self.connection, timeout or self.config.publish_timeout)

    async def _confirm(self, nc: Client) -> None:
        # The server has processed the message (and queued it to every subscriber) before
        # publish() returns.
        await round_trip(nc, self.config.publish_timeout)

    def _route(self, subject: str) -> bool:
        """Validate ``subject`` (ConfigError) and cache whether a known stream captures it
        (not for a reply subject, new for each request)."""
        validate_subject(subject)
        durable = any(covers(p, subject) for p in self._stream_patterns)
        if subject.startswith(INBOX_ROOT):
            return durable
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[subject] = durable
        return durable

    # -- subscribing --------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
        max_pending: int | None = None,
    ) -> BrokerSubscription:
        """Core subscription, or a JetStream durable consumer when ``durable`` is given (its
        stream found or created). Raises ConfigError for bad names or overlapping streams."""
        self._require_open()
        validate_pattern(pattern)
        check_group_names(queue, durable)
        if queue is not None and _WHITESPACE.search(queue):
            raise ConfigError(f"queue group name {queue!r} may not contain whitespace")
        nc = self.connection
        bound = max_pending or self.config.max_pending
        sub: CoreSubscription | DurableSubscription
        if durable is None:
            sub = CoreSubscription(self, pattern, handler, queue, bound)
        else:
            stream = await self._durable_consumer(pattern, durable)
            sub = DurableSubscription(
                self, pattern, handler, queue, max(bound, self.config.pull_batch), stream, durable
            )
        try:
            with translated(f"subscribe to {pattern!r}"):
                await sub.start(nc)
        except BaseException:
            await sub.unsubscribe()
            raise
        self._subs.add(sub)
        return sub

    async def capture(self, pattern: str, durable: str) -> None:
        """Keep what is published to ``pattern`` from now on for the durable subscription
        ``durable``, before any subscriber binds it: find or create the stream capturing the
        pattern and the durable consumer (as a durable subscription does), and publish to the
        pattern through JetStream from now on. Raises ConfigError for a bad pattern or name, a
        stream that overlaps the pattern without covering it, or ``durable`` consuming another
        pattern; StateError before connect()."""
        self._require_open()
        validate_pattern(pattern)
        check_group_names(None, durable)
        await self._durable_consumer(pattern, durable)

    async def _durable_consumer(self, pattern: str, durable: str) -> str:
        """Find or create the stream capturing ``pattern`` and the durable consumer ``durable``
        on it; returns the stream's name. Raises ConfigError for a bad durable name."""
        if not NAME_OK.match(durable):
            raise ConfigError(f"durable name {durable!r} may only use letters, digits, '-' and '_'")
        assert self._jsm is not None  # guaranteed by the OPEN state
        stream, subjects = await stream_for(self._jsm, self.config, pattern)
        self._remember_stream(subjects)
        await ensure_consumer(self._jsm, self.config, stream, durable, pattern)
        return stream

    def _remember_stream(self, subjects: list[str]) -> None:
        new = [s for s in subjects if s not in self._stream_patterns]
        if new:
            self._stream_patterns.extend(new)
            self._routes.clear()

    def inbox_prefix(self) -> str:
        return self._inbox

    def _forget(self, sub: NatsSubscription) -> None:
        self._subs.discard(sub)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _finish_after_handler(self, sub: NatsSubscription, coro: Coroutine[Any, Any, None]) -> None:
        """Spawn ``coro``, which finishes stopping ``sub`` once the handler that stopped it has
        returned; close() does not close the connection under that handler (see close)."""
        task = self._spawn(coro)
        self._finishing[task] = sub
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._finishing.pop(task, None)
