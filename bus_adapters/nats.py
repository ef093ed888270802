"""The NATS adapter: core NATS for ephemeral pub/sub, JetStream for durable subscriptions.

``NatsBroker("nats://127.0.0.1:4222", max_deliver=5)``: the URL (several may be given, comma
separated) and the fields of :class:`NatsConfig` as keyword options. Needs nats-py
(``pip install 'agent-os[nats]'``), imported only when the broker connects.

Semantics:

- **Ephemeral subscriptions** (no ``durable``) are core NATS subscriptions: ``*`` / ``>`` and
  queue groups are the server's own. Delivery is **at most once**: a message published while
  the subscriber is disconnected, or dropped by the server or by nats-py as a slow consumer, is
  lost. ``nack(delay)`` redelivers *locally*: the same subscription's handler gets the message
  again with ``attempt + 1`` after ``delay`` (the server keeps no record of core messages, so a
  local redelivery dies with the process).
- **Durable subscriptions** (``durable="name"``) use JetStream. The stream that captures the
  pattern is found (any stream whose subjects cover it) or created (``AMB_<pattern hash>``, file
  storage); the durable pull consumer ``name`` (explicit ack, deliver-new, ``max_deliver``,
  ``ack_wait``) is created once and bound by every later subscriber with that name, which then
  share its messages like a queue group (``queue`` is ignored). Delivery is **at least once**:
  a message is delivered again until acked: after ``nack(delay)``, after ``ack_wait`` without an
  ack (a consumer that crashed), after a reconnect. ``attempt`` is JetStream's delivery count.
  After ``max_deliver`` deliveries the server stops redelivering an unacked message: keep
  ``max_deliver`` >= the subscription's ``max_attempts`` so the AMB client dead-letters first.
- **Ordering**: each subscription's handler gets one message at a time, in the order the server
  delivered them (publish order per publishing connection); redeliveries break that order. No
  order per key across queue-group members (``ordered_per_key`` is False).
- **Publishing** to a subject covered by a stream this client knows (the streams of its durable
  subscriptions and ``stream_subjects``) is a JetStream publish: it returns once the stream has
  stored the message, and is retried with the same ``Nats-Msg-Id`` (so the stream drops the
  duplicate) until ``publish_timeout`` while the connection recovers. Any other publish is a
  core publish that returns once the message is in the connection's buffer (as raw nats-py
  does; order is kept per connection, not across clients). ``confirm_publish=True`` makes a
  core publish wait until the server has processed it (one PING/PONG round trip), so a publish
  that returned is delivered before any publish started after it from any client, at about
  1/40 of the throughput. JetStream stores a core publish when a stream covers the subject,
  but nothing confirms it.
- **Backpressure**: each subscription has a bounded queue (``max_pending``); when it is full,
  nats-py buffers further messages up to its own limits, then drops them as a slow consumer.
- **Connection**: reconnects forever with exponential backoff and jitter; subscriptions and
  durable pulls resume; publishes are buffered meanwhile (nats-py's ``pending_size``). nats-py
  errors reach callers as :class:`~amb.errors.BrokerUnavailable` or
  :class:`~amb.errors.TransportError` (a bad subject as ConfigError), the original chained.
- **Drain**: ``close()`` stops each subscription's interest, lets the messages already received
  reach the handlers (up to ``timeout``), then closes the connection.

Not guaranteed: exactly-once delivery; durability of core publishes or of local redeliveries;
order across redeliveries; anything beyond what the server's JetStream storage keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from amb.broker import BrokerSubscription, Capabilities, DeliveryHandler, Lifecycle, LifecycleState
from amb.errors import BrokerUnavailable, BusError, ConfigError, StateError, TransportError
from amb.subjects import validate_pattern

if TYPE_CHECKING:
    from nats.aio.client import Client, Server
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.manager import JetStreamManager

log = logging.getLogger(__name__)

INSTALL_HINT: Final = "the NATS broker needs nats-py: pip install 'agent-os[nats]'"
DEFAULT_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
_EMPTY: Final[Mapping[str, Any]] = {}
_ROUTE_CACHE_MAX: Final = 8192
_ERR_SUBJECTS_OVERLAP: Final = 10065
_NAME_OK = re.compile(r"^[A-Za-z0-9_-]+$")

if importlib.util.find_spec("nats") is None:  # fail at import, with the hint, not at connect
    raise ImportError(INSTALL_HINT)


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsConfig:
    """Options of :class:`NatsBroker` (times in seconds)."""

    name: str | None = None  # connection name shown by the server's monitoring
    connect_timeout: float = 5.0  # for the first connection; then it reconnects forever
    reconnect_wait: float = 0.1  # first reconnect delay, doubled per failed attempt...
    reconnect_wait_max: float = 2.0  # ...up to this
    max_pending: int = 4096  # per-subscription queue bound
    publish_timeout: float = 10.0  # a JetStream publish, retries included
    confirm_publish: bool = False  # True: a core publish waits for the server (one round trip)
    stream_subjects: tuple[str, ...] = ()  # patterns to publish through JetStream with confirmation
    stream_max_age: float | None = None  # age limit of the streams this adapter creates
    max_deliver: int = 5  # JetStream deliveries of a message before the server gives up
    ack_wait: float = 30.0  # an unacked durable message is redelivered after this
    pull_batch: int = 128  # messages asked for per JetStream pull request
    pull_expires: float = 10.0  # lifetime of a pull request

    def __post_init__(self) -> None:
        positive = ("connect_timeout", "reconnect_wait", "publish_timeout", "ack_wait", "pull_expires")
        for field in positive:
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive")
        if self.reconnect_wait_max < self.reconnect_wait:
            raise ConfigError("reconnect_wait_max must be at least reconnect_wait")
        if self.max_pending < 1 or self.pull_batch < 1 or self.max_deliver < 1:
            raise ConfigError("max_pending, pull_batch and max_deliver must be at least 1")
        if self.pull_batch > self.max_pending:
            raise ConfigError("pull_batch must not exceed max_pending")
        if self.stream_max_age is not None and self.stream_max_age <= 0:
            raise ConfigError("stream_max_age must be positive (or None)")
        for pattern in self.stream_subjects:
            validate_pattern(pattern)


# -- errors --------------------------------------------------------------------------------------


def _translate(exc: Exception, action: str) -> BusError | None:
    """The bus error for a nats-py (or socket) error, most specific first; None if not ours."""
    import nats.errors as ne
    import nats.js.errors as je

    text = f"{action}: {type(exc).__name__}: {exc}"
    if isinstance(exc, ne.BadSubjectError):
        return ConfigError(text)
    if isinstance(exc, ne.MsgAlreadyAckdError):
        return StateError(text)
    unavailable = (
        ne.NoServersError,
        ne.ConnectionClosedError,
        ne.ConnectionDrainingError,
        ne.ConnectionReconnectingError,
        ne.StaleConnectionError,
        ne.OutboundBufferLimitError,
        ne.AuthorizationError,
        je.NoStreamResponseError,
        je.ServiceUnavailableError,
        OSError,
    )
    if isinstance(exc, unavailable):
        return BrokerUnavailable(text)
    if isinstance(exc, ne.Error | TimeoutError):
        return TransportError(text)
    return None


def _transient(exc: BaseException | None) -> bool:
    """Worth retrying while the connection recovers (a JetStream publish)."""
    import nats.errors as ne
    import nats.js.errors as je

    return isinstance(
        exc,
        TimeoutError
        | ne.ConnectionReconnectingError
        | ne.StaleConnectionError
        | ne.OutboundBufferLimitError
        | je.NoStreamResponseError
        | je.ServiceUnavailableError
        | OSError,
    )


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """The one place where nats-py errors become bus errors (the original is chained)."""
    try:
        yield
    except BusError:
        raise
    except Exception as exc:
        error = _translate(exc, action)
        if error is None:
            raise
        raise error from exc


# -- subjects and names --------------------------------------------------------------------------


def _covers(outer: str, inner: str) -> bool:
    """True when every subject matching ``inner`` also matches ``outer`` (both patterns)."""
    o, i = outer.split("."), inner.split(".")
    for n, tok in enumerate(o):
        if tok == ">":
            return len(i) > n
        if n >= len(i) or i[n] == ">" or (tok != "*" and (tok != i[n] or i[n] == "*")):
            return False
    return len(o) == len(i)


def _stream_name(pattern: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", pattern.replace("*", "S").replace(">", "G"))[:40]
    return f"AMB_{readable}_{hashlib.sha256(pattern.encode()).hexdigest()[:12]}"


# -- deliveries ----------------------------------------------------------------------------------


class NatsDelivery:
    """A core NATS message; ``nack`` redelivers it locally to the same subscription."""

    __slots__ = ("_sub", "attempt", "data", "subject")

    extra: Mapping[str, Any] = _EMPTY

    def __init__(self, subject: str, data: bytes, attempt: int, sub: _CoreSubscription) -> None:
        self.subject = subject
        self.data = data
        self.attempt = attempt
        self._sub = sub

    async def ack(self) -> None:
        return None

    async def nack(self, delay: float | None = None) -> None:
        again = NatsDelivery(self.subject, self.data, self.attempt + 1, self._sub)
        if delay:
            asyncio.get_running_loop().call_later(delay, self._sub.requeue, again)
        else:
            self._sub.requeue(again)


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
        }

    async def ack(self) -> None:
        with _translated("ack"):
            await self._msg.ack()

    async def nack(self, delay: float | None = None) -> None:
        with _translated("nack"):
            await self._msg.nak(delay=delay)


_Item = NatsDelivery | JetStreamDelivery


# -- subscriptions -------------------------------------------------------------------------------


class _Subscription:
    """A bounded queue and the one task that feeds the handler, one delivery at a time."""

    def __init__(
        self, broker: NatsBroker, pattern: str, handler: DeliveryHandler, queue: str | None, max_pending: int
    ) -> None:
        self.broker = broker
        self.pattern = pattern
        self.queue = queue
        self.handler = handler
        self.handler_errors = 0
        self._items: asyncio.Queue[_Item | None] = asyncio.Queue(max_pending)
        self._retries: deque[_Item] = deque()
        self._stopping = False
        self._nats_sub: Subscription | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"nats-sub:{pattern}")

    def requeue(self, delivery: _Item) -> None:
        """Put a nacked message back, beyond the bound: it was already counted against it."""
        if self._task.done():
            return
        self._retries.append(delivery)
        if self._items.empty():
            self._items.put_nowait(None)  # wake the task if it waits for the queue

    async def _run(self) -> None:
        items, retries = self._items, self._retries
        while True:
            if retries:
                delivery = retries.popleft()
            elif self._stopping and items.empty():
                return
            else:
                got = await items.get()
                if got is None:
                    continue
                delivery = got
            try:
                await self.handler(delivery)
            except Exception:
                # The handler is the bus's and should not raise; the subscription survives it.
                self.handler_errors += 1
                log.exception("nats broker: handler for %r raised", self.pattern)
            await self._handled()

    async def _handled(self) -> None:
        return None

    def _leftovers(self) -> list[_Item]:
        left = list(self._retries)
        self._retries.clear()
        while not self._items.empty():
            item = self._items.get_nowait()
            if item is not None:
                left.append(item)
        return left

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

    async def _stop_task(self, timeout: float | None) -> None:
        self._stopping = True
        if self._items.empty():
            self._items.put_nowait(None)
        if self._task is asyncio.current_task():
            return  # stopped from inside its own handler: the loop ends after this message
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._discard(self._leftovers())

    async def _discard(self, items: list[_Item]) -> None:
        return None

    async def unsubscribe(self) -> None:
        self.broker._forget(self)
        await self._stop_nats_sub(drain=False, timeout=None)
        left = self._leftovers()
        await self._stop_task(None)
        await self._discard(left)

    async def drain(self, timeout: float | None = None) -> None:
        self.broker._forget(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._stop_nats_sub(drain=True, timeout=timeout)
        await self._stop_task(None if deadline is None else max(0.0, deadline - time.monotonic()))


class _CoreSubscription(_Subscription):
    async def start(self, nc: Client) -> None:
        self._nats_sub = await nc.subscribe(self.pattern, queue=self.queue or "", cb=self._on_msg)
        await nc.flush()  # the server has the interest before subscribe() returns

    async def _on_msg(self, msg: Msg) -> None:
        await self._items.put(NatsDelivery(msg.subject, msg.data, 1, self))


class _DurableSubscription(_Subscription):
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

    async def start(self, nc: Client) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        self._nats_sub = await nc.subscribe(self._inbox, cb=self._on_msg)
        await self.pull(reset=True)
        await nc.flush()
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name=f"nats-pull:{self.durable}"
        )

    async def pull(self, reset: bool = False) -> None:
        """Ask for another batch once what is owed and queued is at most half a batch.

        So a consumer holds at most about 1.5 batches of unacked messages: the rest stays with
        the server for other members of the durable, or for redelivery after a crash.
        """
        cfg = self.broker.config
        if reset:
            self._owed = 0
        if self._stopping or self._nc is None or self._owed + self._items.qsize() > cfg.pull_batch // 2:
            return
        request = {"batch": cfg.pull_batch, "expires": int(cfg.pull_expires * 1e9)}
        self._owed += cfg.pull_batch
        self._last_pull = time.monotonic()
        try:
            await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:  # the watchdog asks again once the connection is back
            self._owed -= cfg.pull_batch
            log.debug("nats broker: pull for %r failed: %r", self.durable, exc)

    async def _watch(self) -> None:
        # A pull request dies with a server restart and nothing says so: ask again when silent.
        expires = self.broker.config.pull_expires
        while not self._stopping:
            await asyncio.sleep(expires / 2)
            if time.monotonic() - self._last_pull > expires + 1.0 and self._items.empty():
                await self.pull(reset=True)

    async def _on_msg(self, msg: Msg) -> None:
        self._last_pull = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._owed -= 1
            await self._items.put(JetStreamDelivery(msg))
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

    async def _handled(self) -> None:
        await self.pull()

    async def _discard(self, items: list[_Item]) -> None:
        # Messages this subscription will not handle go back to the consumer now rather than
        # after ack_wait.
        for item in items:
            with contextlib.suppress(BusError):
                await item.nack()

    async def _stop_task(self, timeout: float | None) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await super()._stop_task(timeout)


# -- the broker ----------------------------------------------------------------------------------


class NatsBroker(Lifecycle):
    """A NATS (and JetStream) client. ``NatsBroker("nats://HOST:PORT", **NatsConfig fields)``."""

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
        self._subs: set[_Subscription] = set()
        self._stream_patterns: list[str] = list(self.config.stream_subjects)
        self._routes: dict[str, bool] = {}
        self._inbox = f"_INBOX.{os.urandom(12).hex()}"

    @property
    def connection(self) -> Client:
        if self._nc is None:
            raise StateError("nats broker is not connected: call connect() first")
        return self._nc

    async def connect(self) -> None:
        if self._state is LifecycleState.OPEN:
            return
        if self._state is not LifecycleState.UNOPENED:
            raise StateError(f"nats broker is {self._state.value}; create a new one")
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
                )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise BrokerUnavailable(f"cannot connect to NATS at {', '.join(self.servers)}: {exc!r}") from exc
        self._nc = nc
        self._jsm = nc.jsm()
        self.capabilities = dataclasses.replace(self.capabilities, max_payload=nc.max_payload)
        self._state = LifecycleState.OPEN

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
            if isinstance(sub, _DurableSubscription):
                await sub.pull(reset=True)

    async def close(self, timeout: float = 5.0) -> None:
        if self._state in (LifecycleState.CLOSING, LifecycleState.CLOSED):
            return
        if self._state is LifecycleState.UNOPENED:
            self._state = LifecycleState.CLOSED
            return
        self._state = LifecycleState.CLOSING
        deadline = time.monotonic() + timeout
        subs = list(self._subs)
        self._subs.clear()
        if subs:
            await asyncio.gather(*(sub.drain(timeout) for sub in subs), return_exceptions=True)
        nc = self.connection
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), max(1.0, deadline - time.monotonic()))
        self._state = LifecycleState.CLOSED

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        if self._state is not LifecycleState.OPEN:
            self._require_open()
        if self._stream_patterns and self._is_stream_subject(subject):
            await self._publish_confirmed(subject, data)
            return
        nc = self._nc
        assert nc is not None  # guaranteed by the OPEN state
        with _translated(f"publish to {subject!r}"):
            await nc.publish(subject, data)
            if self.config.confirm_publish:
                await self._confirm(nc)

    async def _confirm(self, nc: Client) -> None:
        # nats-py's flush() writes its PING straight to the socket, ahead of commands still in
        # the write buffer: have the buffer written first, so the PONG proves the server has
        # processed the message (and queued it to every subscriber) before publish() returns.
        write_pending = getattr(nc, "_flush_pending", None)
        if write_pending is not None:
            await write_pending(force_flush=True)
        else:
            await asyncio.sleep(0)
        await nc.flush(timeout=max(1, int(self.config.publish_timeout)))

    def _is_stream_subject(self, subject: str) -> bool:
        known = self._routes.get(subject)
        if known is None:
            known = any(_covers(p, subject) for p in self._stream_patterns)
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[subject] = known
        return known

    async def _publish_confirmed(self, subject: str, data: bytes) -> None:
        js = self.connection.jetstream()
        headers = {"Nats-Msg-Id": os.urandom(12).hex()}  # retries are the same message
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.publish_timeout
        delay = 0.05
        while True:
            try:
                with _translated(f"JetStream publish to {subject!r}"):
                    await js.publish(
                        subject, data, timeout=max(0.1, min(2.0, deadline - loop.time())), headers=headers
                    )
                return
            except TransportError as exc:
                if not _transient(exc.__cause__) or loop.time() + delay >= deadline:
                    raise
                log.debug("nats broker: retrying JetStream publish to %r: %r", subject, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
        max_pending: int | None = None,
    ) -> BrokerSubscription:
        self._require_open()
        validate_pattern(pattern)
        if queue is not None and not queue:
            raise ConfigError("queue group name must be non-empty")
        nc = self.connection
        bound = max_pending or self.config.max_pending
        sub: _CoreSubscription | _DurableSubscription
        if durable is None:
            sub = _CoreSubscription(self, pattern, handler, queue, bound)
        else:
            if not _NAME_OK.match(durable):
                raise ConfigError(f"durable name {durable!r} may only use letters, digits, '-' and '_'")
            stream = await self._stream_for(pattern)
            await self._ensure_consumer(stream, durable, pattern)
            sub = _DurableSubscription(
                self, pattern, handler, queue, max(bound, self.config.pull_batch), stream, durable
            )
        try:
            with _translated(f"subscribe to {pattern!r}"):
                await sub.start(nc)
        except BaseException:
            await sub.unsubscribe()
            raise
        self._subs.add(sub)
        return sub

    async def _stream_for(self, pattern: str) -> str:
        """The stream capturing ``pattern``: an existing one that covers it, or a new one."""
        import nats.js.api as api
        import nats.js.errors as je

        jsm = self._jsm
        assert jsm is not None  # guaranteed by the OPEN state
        for _ in range(3):
            with _translated(f"finding the stream for {pattern!r}"):
                try:
                    name: str | None = await jsm.find_stream_name_by_subject(pattern)
                except je.NotFoundError:
                    name = None
                if name is not None:
                    subjects = (await jsm.stream_info(name)).config.subjects or []
                    if not any(_covers(s, pattern) for s in subjects):
                        raise ConfigError(
                            f"stream {name!r} captures {subjects} which overlap {pattern!r} without "
                            "covering it: subscribe durably to a pattern inside one stream"
                        )
                    self._remember_stream(subjects)
                    return name
                name = _stream_name(pattern)
                config = api.StreamConfig(
                    name=name,
                    subjects=[pattern],
                    storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS,
                    max_age=self.config.stream_max_age,
                )
                try:
                    await jsm.add_stream(config)
                except je.BadRequestError as exc:
                    if exc.err_code == _ERR_SUBJECTS_OVERLAP:
                        continue  # another client created an overlapping stream meanwhile: look again
                    raise
                self._remember_stream([pattern])
                return name
        raise TransportError(f"no stream could be found or created for {pattern!r}")

    def _remember_stream(self, subjects: list[str]) -> None:
        new = [s for s in subjects if s not in self._stream_patterns]
        if new:
            self._stream_patterns.extend(new)
            self._routes.clear()

    async def _ensure_consumer(self, stream: str, durable: str, pattern: str) -> None:
        import nats.js.api as api
        import nats.js.errors as je

        jsm = self._jsm
        assert jsm is not None  # guaranteed by the OPEN state
        with _translated(f"creating durable consumer {durable!r}"):
            try:
                info = await jsm.consumer_info(stream, durable)
            except je.NotFoundError:
                info = None
            if info is not None:
                existing = info.config.filter_subject
                if existing and existing != pattern:
                    raise ConfigError(f"durable {durable!r} already consumes {existing!r}, not {pattern!r}")
                return
            await jsm.add_consumer(
                stream,
                api.ConsumerConfig(
                    durable_name=durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.NEW,
                    filter_subject=pattern,
                    max_deliver=self.config.max_deliver,
                    ack_wait=self.config.ack_wait,
                ),
            )

    def inbox_prefix(self) -> str:
        return self._inbox

    def _forget(self, sub: _Subscription) -> None:
        self._subs.discard(sub)
