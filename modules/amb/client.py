"""The AMB client: the API agents use to talk over the bus (publish, request/reply, subscribe,
stream) and its receive path. The guarantees it adds on top of any broker are in ``docs/bus.md``.

Over 400 lines: one class, whose publish and receive hot paths share its state in its methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, overload

from agent_os.amb.broker import (
    Broker,
    Capabilities,
    Delivery,
    Lifecycle,
    LifecycleState,
    load_broker,
)
from agent_os.amb.deadletter import DLQ_ROOM, dead_letter_envelope
from agent_os.amb.dispatch import Dispatcher, InstantHandler, LocalDelivery, stop_together
from agent_os.amb.durations import LATENCY_BUCKETS, Durations
from agent_os.amb.envelope import Envelope, new_envelope, new_id_at
from agent_os.amb.errors import (
    BusError,
    ConfigError,
    EnvelopeError,
    InvalidSubject,
    MessageRejected,
    OversizedEnvelope,
    RemoteError,
    RequestTimeout,
    StateError,
)
from agent_os.amb.filters import FilterSpec, compile_filter
from agent_os.amb.metadata import Metadata, metadata_from_wire
from agent_os.amb.middleware import (
    Middleware,
    PublishNext,
    build_consume_chain,
    build_publish_chain,
)
from agent_os.amb.numbers import MOST_SECONDS, seconds, shown, whole
from agent_os.amb.replies import ERROR_HEADER, PendingRequests
from agent_os.amb.serializers import Serializer, get_serializer
from agent_os.amb.serializers.decoder import Decoder
from agent_os.amb.serializers.schema import (
    DEFAULT_MAX_BYTES,
    WIRE_INT_MAX,
    WIRE_INT_MIN,
    WireFields,
    check_subjects,
    envelope_from_wire,
    typed_unpack,
)
from agent_os.amb.stats import PATTERNS_MAX, BusStats, LabelCounts
from agent_os.amb.subjects import (
    INBOX_ROOT,
    MAX_SUBJECT_BYTES,
    plain_text,
    subject_ok,
    valid_subjects,
    validate_pattern,
    validate_subject,
)
from agent_os.amb.subscription import Handler, MessageStream, Subscription, SubscriptionOptions
from agent_os.amb.tracing import BusTracing, RequestSpan

log = logging.getLogger("agent_os.amb")

DeadLetterHook = Callable[[Envelope, Metadata | None], Awaitable[None]]
"""What :attr:`AMB.dead_letter_hook` is: called with a dead letter just published and the
metadata of the refused delivery (None when it could not be decoded)."""

PARTITION_KEY_HEADER: Final = "partition-key"

_OPEN: Final = LifecycleState.OPEN  # an enum member read from the class costs ~70 ns per access
_time_ns: Final = time.time_ns
_perf: Final = time.perf_counter
_current_task: Final = asyncio.current_task
LATENCY_SAMPLE: Final = 16
"""A handler call under :data:`SAMPLE_BELOW` seconds is followed by ``LATENCY_SAMPLE - 1``
untimed ones; the next timed call counts for all of them (see :meth:`AMB.keep_latency`)."""
SAMPLE_BELOW: Final = LATENCY_BUCKETS[0]
_TOPICS_MAX: Final = 4096
_NO_HEADERS: Final[dict[str, str]] = {}  # the headers of publishes without any (see publish)
_NO_SUBJECT: Final = object()  # what AMB._checked holds before any subject: no str is it
_NO_PRIORITY: Final = 0  # the one object every int 0 is (CPython's small ints)


def _refuse_reply_to(reply_to: str) -> None:
    """Raise InvalidSubject for a ``reply_to`` that :func:`subject_ok` refused, naming why."""
    try:
        validate_subject(reply_to)
    except InvalidSubject as exc:
        raise InvalidSubject(f"reply_to: {exc}", reason=exc.reason, subject=exc.subject) from None


def _reply_subject(reply_to: object) -> str:
    """A ``reply_to`` the publish fast path did not take, as a plain str: empty (no reply wanted)
    or a valid subject. Raises InvalidSubject naming why."""
    plain = plain_text(reply_to, "reply_to")
    if plain and not subject_ok(plain):
        _refuse_reply_to(plain)
    return plain


def _plain_fields(
    sender_id: object, recipient: object, correlation_id: object, priority: object
) -> tuple[str | None, str | None, str | None, int]:
    """The publish arguments the fast path did not take, as receivers accept them: a sender,
    recipient or correlation id as a plain str (a str subclass gives its text), a priority as a
    plain int in the wire's 64-bit range. Raises ConfigError for anything else."""
    named = (("sender_id", sender_id), ("recipient", recipient), ("correlation_id", correlation_id))
    texts: list[str | None] = []
    for name, value in named:
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
        texts.append(None if value is None else str.__str__(value))
    number = whole(priority, "priority", WIRE_INT_MIN)
    if number > WIRE_INT_MAX:
        raise ConfigError(f"priority must be within the 64-bit range, got {shown(number)}")
    return texts[0], texts[1], texts[2], number


def _ttl_ns(ttl: object, name: str) -> int:
    """``ttl`` (seconds: a positive, finite number of at most MOST_SECONDS) in nanoseconds.
    Raises ConfigError."""
    return int(seconds(ttl, name) * 1e9)


def _headers(headers: Mapping[str, str] | None, key: str | None) -> dict[str, str]:
    """A publish's own copy of ``headers`` with the partition ``key`` added, every name and
    value a plain str (a str subclass gives its text). Raises ConfigError for anything but
    strings mapped to strings (every receiver would refuse it)."""
    try:
        hdrs = {} if headers is None else dict(headers)
    except Exception as exc:  # not a mapping (or pairs), or one that fails while read
        raise ConfigError(
            f"headers must map strings to strings, got {type(headers).__name__} ({type(exc).__name__})"
        ) from None
    for name, value in hdrs.items():
        if type(name) is not str or type(value) is not str:
            hdrs = _plain_headers(hdrs)
            break
    if key is not None:
        if not isinstance(key, str):
            raise ConfigError(f"key must be a string, got {type(key).__name__}")
        hdrs[PARTITION_KEY_HEADER] = str.__str__(key)
    return hdrs


def _plain_headers(hdrs: dict[Any, Any]) -> dict[str, str]:
    """``hdrs`` with str subclasses replaced by their text; ConfigError for a name or value
    that is not a string."""
    plain: dict[str, str] = {}
    for name, value in hdrs.items():
        if not (isinstance(name, str) and isinstance(value, str)):
            raise ConfigError(f"headers must map strings to strings: {name!r:.60} -> {type(value).__name__}")
        plain[str.__str__(name)] = str.__str__(value)
    return plain


def _stray_cancellation(exc: asyncio.CancelledError) -> RuntimeError | None:
    """None when the current task is being cancelled (the CancelledError must go on); else the
    handler let out the CancelledError of something it awaited (a cancelled future or task):
    a handler error like any other, returned as a RuntimeError caused by it."""
    task = asyncio.current_task()
    if task is None or task.cancelling():
        return None
    error = RuntimeError("the handler raised CancelledError without being cancelled")
    error.__cause__ = exc
    return error


class AMB(Lifecycle):
    """A client of the Agent Message Bus.

    Args:
        backend: broker adapter name (``"memory"``, ``"nats"``, ``"redis"``, ``"kafka"``); ignored
            when ``broker`` is given.
        connection_string: the broker's URL (``memory://NAME``, ``nats://127.0.0.1:4222``, ...).
        serializer: ``"msgpack"`` (default) or ``"json"``, used to encode what this client sends.
            Received messages are decoded in either format.
        agent_id: the default sender of this client's messages.
        broker: a ready broker object instead of ``backend`` (the client then owns and closes it).
        middleware: the middleware chain, wire side first (see :mod:`agent_os.amb.middleware`).
        dead_letter_prefix: dead letters go to ``<prefix>.<original subject>``.
        max_message_bytes: the largest encoded envelope sent or accepted. A dead letter
            carries the message it records, so it may be larger: up to this or 8 MiB,
            whichever is more (a message refused for its size is dead-lettered whole).
        broker_options: extra keyword arguments for the adapter.
        inbox_prefix: put this client's reply inbox under this subject (for brokers whose
            permissions let a client read only some inboxes; see ``docs/bus.md``, "Request
            and reply"). Default None: the adapter's inbox.

    The client connects on first use, or explicitly with ``await amb.connect()`` /
    ``async with AMB(...) as amb``. Raises :class:`ConfigError` for an unknown backend or
    serializer, or an ``inbox_prefix`` that is not a subject (empty tokens, whitespace or
    wildcards).
    """

    _what = "AMB client"

    def __init__(
        self,
        backend: str = "memory",
        connection_string: str | None = None,
        serializer: Literal["msgpack", "json"] | str = "msgpack",
        *,
        agent_id: str | None = None,
        broker: Broker | None = None,
        middleware: Sequence[Middleware] = (),
        dead_letter_prefix: str = "_DLQ",
        max_message_bytes: int = DEFAULT_MAX_BYTES,
        broker_options: Mapping[str, Any] | None = None,
        inbox_prefix: str | None = None,
    ) -> None:
        own_inbox = None
        if inbox_prefix is not None:
            own_inbox = f"{inbox_prefix}.{os.urandom(8).hex()}"
            try:
                validate_subject(inbox_prefix)
                # Its reply subjects (<prefix>.<token>.<request number>) must be subjects too,
                # up to a 16-digit request number (10**16 requests).
                validate_subject(f"{own_inbox}.{'9' * 16}")
            except ConfigError as exc:
                raise ConfigError(f"inbox_prefix: {exc}") from None
        try:
            validate_subject(dead_letter_prefix)
            if len(dead_letter_prefix.encode()) > MAX_SUBJECT_BYTES - DLQ_ROOM:
                raise ConfigError(f"is longer than {MAX_SUBJECT_BYTES - DLQ_ROOM} bytes")
        except ConfigError as exc:
            raise ConfigError(f"dead_letter_prefix: {exc}") from None
        self._serializer = get_serializer(serializer, max_message_bytes)
        self._dead_letter_serializer = get_serializer(serializer, max(max_message_bytes, DEFAULT_MAX_BYTES))
        self._decoder = Decoder(max_message_bytes)
        self.broker: Broker = broker or load_broker(backend, connection_string, **dict(broker_options or {}))
        if agent_id is not None and type(agent_id) is not str:
            raise ConfigError(f"agent_id must be a string, got {type(agent_id).__name__}")
        self.agent_id = agent_id or f"amb-{os.urandom(4).hex()}"
        self.dead_letter_prefix = dead_letter_prefix
        self.stats = BusStats()
        self._middleware: list[Middleware] = list(middleware)
        self._publish_chain: PublishNext | None = None  # set on connect when there is middleware
        self._tracing: BusTracing | None = None  # set on connect while tracing is active
        self._subs: list[Subscription] = []
        self._pending_starts: list[asyncio.Task[None]] = []
        self._connect_lock: asyncio.Lock | None = None
        self._own_inbox = own_inbox  # from the inbox_prefix option; None: the broker's
        self._inbox: str | None = None
        self._inbox_sub: Subscription | None = None
        self._inbox_lock: asyncio.Lock | None = None
        self._requests = PendingRequests(self.stats)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop connect() ran in
        self._topics: set[str] = set()  # topics validated already (bounded by _TOPICS_MAX)
        # A subject this client knows is valid without checking it again: the reply subject of
        # its latest request, or the reply_to of the wire message it latest replied to. Only
        # ever a valid subject, so publish may take it by identity whatever ran in between.
        self._checked: object = _NO_SUBJECT
        self._reply_room = -1  # the longest reply subject known valid (set with the inbox)
        self._request_ids = itertools.count(1)
        self.handler_latency: Durations | None = None
        """Handler call times (label tuple ``()``) once :meth:`keep_latency` was called, else None."""
        self.request_latency: Durations | None = None
        """Request times by outcome (``("ok",)``, ``("timeout",)``, ``("error",)``) once
        :meth:`keep_latency` was called, else None."""
        self.published_by_pattern: LabelCounts | None = None
        """Messages published by subject pattern (the subject's first token, as ``("tasks",)``
        for ``tasks.>``; at most :data:`PATTERNS_MAX` of them, later ones count as ``other``)
        once :meth:`keep_latency` was called, else None."""
        self._handler_times: list[float] | None = None  # handler_latency's one series, updated in place
        self._untimed = 0  # handler calls left to skip before the next timed one
        self._time_weight = 1  # how many calls the next timed one counts for
        self.dead_letter_hook: DeadLetterHook | None = None
        """Called after each dead letter this client published, with the dead letter and the
        metadata of the refused delivery (None when it could not be decoded); its errors are
        logged, never raised. The control-plane service copies dead letters to their agents."""

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self.broker.capabilities

    @property
    def healthy(self) -> bool:
        """True while the client is open and its broker connection is up (the adapter's
        ``connected``, where it has one). False before connect, after close, and while the
        connection is lost: what a service's health check reports."""
        if self._state is not _OPEN:
            return False
        connected = getattr(self.broker, "connected", True)
        return connected is True

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware chain, wire side first."""
        return tuple(self._middleware)

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The client's live subscriptions, in the order made (not its reply inbox's)."""
        return tuple(s for s in self._subs if s is not self._inbox_sub)

    def keep_latency(self) -> None:
        """Time handler calls (with their middleware) and requests from now on, in
        :attr:`handler_latency` and :attr:`request_latency`. A
        :class:`~agent_os.amb.metrics.BusCollector` calls it for the clients it collects.
        Idempotent.

        Published messages are counted by subject pattern too (:attr:`published_by_pattern`).
        Every request and every handler call of 100 µs or more is timed (two clock reads and
        a bucket increment). After a faster call, the next :data:`LATENCY_SAMPLE` - 1 calls go
        untimed and the one after counts for all of them: the histogram's count stays the
        number of calls, its sum and quantiles become estimates, and timing costs the fast
        path a counter decrement per delivery."""
        if self.handler_latency is None:
            self.request_latency = Durations()
            self.handler_latency = Durations()
            self._handler_times = self.handler_latency.series(())
            self.published_by_pattern = LabelCounts(1, PATTERNS_MAX)

    def add_middleware(self, middleware: Middleware) -> None:
        """Append a middleware (innermost so far). Raises StateError once connected."""
        if self._state is not LifecycleState.UNOPENED:
            raise StateError("the middleware chain is frozen once the client has connected")
        self._middleware.append(middleware)

    async def connect(self) -> None:
        """Connect the broker and start the subscriptions registered so far. Idempotent."""
        if self._state is LifecycleState.OPEN:
            return
        if self._state is not LifecycleState.UNOPENED:
            raise StateError(f"AMB client is {self._state.value}")
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self.state is LifecycleState.OPEN:  # another task connected while this one waited
                return
            await self.broker.connect()
            self._loop = asyncio.get_running_loop()
            # Tracing (docs/observability.md, "Tracing"): decided once here, so a client that
            # does not trace has no layer and the plain message path.
            self._tracing = BusTracing.for_client(self.agent_id, self.broker.name)
            if self._tracing is not None:  # innermost on publish: its span holds the others
                self._publish_chain = build_publish_chain([*self._middleware, self._tracing], self._wire_send)
            elif self._middleware:
                self._publish_chain = build_publish_chain(self._middleware, self._wire_send)
            self._state = LifecycleState.OPEN
            for sub in list(self._subs):
                if not sub.active:
                    await self._start(sub)

    async def close(self, timeout: float = 5.0) -> None:
        """Drain subscriptions (in-flight and queued messages finish, up to ``timeout``), fail
        pending requests with StateError, then close the broker. Idempotent. A subscription's
        drain that fails does not stop the rest: the client and its broker are closed all the
        same, then the first such error is raised."""
        timeout = seconds(timeout, "timeout", zero=True)
        if not self._begin_close():
            return
        deadline = time.monotonic() + timeout
        if self._pending_starts:
            await asyncio.gather(*self._pending_starts, return_exceptions=True)
        user_subs = [s for s in self._subs if s is not self._inbox_sub]
        failed: BaseException | None = None
        try:
            # In tasks acting for this one: from inside a handler, its subscription's drain does
            # not wait for it.
            drains = await stop_together(s.drain(max(0.0, deadline - time.monotonic())) for s in user_subs)
            failed = next((error for error in drains if error is not None), None)
        finally:
            # Closed whatever a drain raised (or the caller's cancellation): never half-closed.
            self._requests.fail_all("AMB client closed while the request was pending")
            self._requests.close()
            try:
                if self._inbox_sub is not None:
                    await self._inbox_sub.unsubscribe()
            finally:
                await self.broker.close(max(0.0, deadline - time.monotonic()))
                self._state = LifecycleState.CLOSED
        if failed is not None:
            raise failed

    async def __aenter__(self) -> AMB:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _ready(self) -> None:
        """Connect if needed and wait for subscriptions registered by decorator to be active."""
        if self._state is not LifecycleState.OPEN:
            if self._state is LifecycleState.UNOPENED:
                await self.connect()
            else:
                self._require_open()
        if self._pending_starts:
            starts, self._pending_starts = self._pending_starts, []
            await asyncio.gather(*starts)

    # -- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: Any = None,
        *,
        sender_id: str | None = None,
        recipient: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        ttl: float | None = None,
        priority: int = 0,
        key: str | None = None,
    ) -> str:
        """Publish ``message`` on ``topic`` and return the new envelope's id.

        ``ttl`` (seconds) makes the message expire: receivers drop it after that time. ``key``
        orders messages on brokers with ``ordered_per_key`` (default key: the sender). Returns
        once the broker has accepted the message; waits while a subscriber's queue is full.

        Raises ConfigError (a bad topic, ttl, or any argument receivers would refuse: see
        ``docs/bus.md``), UnserializablePayload, OversizedEnvelope,
        MessageRejected (from a middleware), StateError (closed) or TransportError.
        """
        if self._state is not _OPEN or self._pending_starts:
            await self._ready()
        if (type(topic) is not str or topic not in self._topics) and topic is not self._checked:
            topic = self._check_topic(topic)
        if not (
            reply_to is None
            or reply_to is self._checked
            or (type(reply_to) is str and (not reply_to or subject_ok(reply_to)))
        ):
            reply_to = _reply_subject(reply_to)
        if not (
            (sender_id is None or type(sender_id) is str)
            and (recipient is None or type(recipient) is str)
            and (correlation_id is None or type(correlation_id) is str)
            and (
                priority is _NO_PRIORITY
                or (type(priority) is int and WIRE_INT_MIN <= priority <= WIRE_INT_MAX)
            )
        ):  # the common case costs four comparisons; anything else is checked in full
            sender_id, recipient, correlation_id, priority = _plain_fields(
                sender_id, recipient, correlation_id, priority
            )
        now = _time_ns()
        expires_at = None
        if ttl is not None:
            # NaN fails the comparison and goes to the full check, which refuses it
            if (type(ttl) is float or type(ttl) is int) and 0 < ttl <= MOST_SECONDS:
                expires_at = now + int(ttl * 1e9)
            else:
                expires_at = now + _ttl_ns(ttl, "ttl")
        sender = sender_id or self.agent_id
        chain = self._publish_chain
        if headers is not None or key is not None:
            hdrs = _headers(headers, key)
            partition = hdrs.get(PARTITION_KEY_HEADER) or sender
        else:
            # Without middleware nothing sees the headers before they are encoded: one shared
            # empty dict, never written to. The middleware may add headers: a dict of its own.
            hdrs = _NO_HEADERS if chain is None else {}
            partition = sender
        id_ = new_id_at(now)
        if chain is not None:
            env = new_envelope(
                id_,
                topic,
                sender,
                message,
                recipient,
                reply_to,
                correlation_id,
                now,
                expires_at,
                priority,
                hdrs,
                None,
            )
            await chain(env)
            return id_
        # No middleware: nothing sees the envelope, so it is encoded from its fields and sent
        # here (_wire_send inline, without an Envelope object or a coroutine per layer).
        data = self._serializer.encode_new(
            id_, topic, sender, message, recipient, reply_to, correlation_id, now, expires_at, priority, hdrs
        )
        await self.broker.publish(topic, data, key=partition)
        self.stats.published += 1
        if self.published_by_pattern is not None:
            self.published_by_pattern.add((topic.partition(".")[0],))
        return id_

    def _check_topic(self, topic: object) -> str:
        """Validate a topic this client has not published to yet (InvalidSubject, a
        ConfigError), remember it and return it as a plain str."""
        plain = validate_subject(plain_text(topic, "topic"))
        if plain.startswith(INBOX_ROOT):
            return plain  # a reply subject, new for each request: not remembered
        if len(self._topics) >= _TOPICS_MAX:
            self._topics.clear()
        self._topics.add(plain)
        return plain

    async def _wire_send(self, env: Envelope, serializer: Serializer | None = None) -> None:
        """Encode ``env`` (with ``serializer``, default the client's) and hand it to the broker:
        the end of the publish chain."""
        data = (serializer or self._serializer).encode(env)
        await self.broker.publish(env.topic, data, key=env.headers.get(PARTITION_KEY_HEADER) or env.sender)
        self.stats.published += 1
        if self.published_by_pattern is not None:
            self.published_by_pattern.add((env.topic.partition(".")[0],))

    async def reply(
        self,
        reply_to: str | Metadata,
        message: Any = None,
        *,
        sender_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Answer a request. ``reply_to`` is ``metadata.reply_to`` or the metadata itself (which
        also sets the correlation id to the request's id). Raises ConfigError without a reply
        subject."""
        correlation_id = None
        from_wire = False
        if isinstance(reply_to, Metadata):
            env = reply_to._envelope
            if env is None:  # metadata over wire fields, whose decode checked the reply_to
                wire = reply_to._wire
                correlation_id, subject, from_wire = wire[1], wire[5], True
            else:
                correlation_id, subject = env.id, env.reply_to
        else:
            subject = reply_to
        if not subject:
            raise ConfigError("the message has no reply_to subject to answer on")
        if from_wire:
            self._checked = subject
        return await self.publish(
            subject, message, sender_id=sender_id, correlation_id=correlation_id, headers=headers
        )

    async def request(
        self,
        topic: str,
        message: Any = None,
        *,
        timeout: float = 5.0,
        sender_id: str | None = None,
        recipient: str | None = None,
        headers: Mapping[str, str] | None = None,
        with_metadata: bool = False,
    ) -> Any:
        """Publish a request and wait for the first reply; return its payload.

        With ``with_metadata=True`` returns ``(payload, metadata)``. The request expires with its
        timeout, so a late responder drops it. Raises :class:`RequestTimeout` when no reply
        arrives in ``timeout`` seconds from the call (a publish still waiting for room then is
        given up), :class:`RemoteError` when the responder's handler failed, and StateError
        when the client closes first.

        The reply is the first message on this request's own reply subject whose correlation id
        is the request's id (``reply(metadata, ...)`` sets it) or absent (``reply(reply_to,
        ...)``) and, for a request addressed to ``recipient``, whose sender is that agent; any
        other is dropped, logged and counted in ``stats.mismatched_replies``. (The sender is
        what the envelope says; with IATP on the bus it is the verified signer, so a request to
        an agent is answered by that agent or not at all.)
        """
        if not ((type(timeout) is float or type(timeout) is int) and 0 < timeout <= MOST_SECONDS):
            timeout = seconds(timeout, "timeout")  # the request's ttl too; a float from here on
        if self._state is not _OPEN or self._pending_starts:
            await self._ready()
        inbox = self._inbox or await self._open_inbox()
        # A decimal token: str() of an int, where a format spec (hex) is parsed on every call.
        reply_subject = f"{inbox}.{next(self._request_ids)}"
        if len(reply_subject) <= self._reply_room:  # the inbox and a decimal token: valid
            self._checked = reply_subject
        if recipient is not None and type(recipient) is not str:
            # Its text, as publish sends it: the reply's sender is compared with a plain str.
            _, recipient, _, _ = _plain_fields(None, recipient, None, 0)
        loop = self._loop
        assert loop is not None  # set by connect()
        fut: asyncio.Future[tuple[Any, Metadata] | None] = loop.create_future()
        trace: RequestSpan | None = None
        if self._tracing is not None:
            trace = self._tracing.begin_request(topic, recipient)
        # From here the deadline resolves the future with None (one shared timer, see
        # PendingRequests) and interrupts a publish still waiting (a subscriber's full queue).
        requests = self._requests
        pending = requests.add(reply_subject, fut, recipient, loop.time() + timeout, loop, _current_task())
        self.stats.requests += 1
        started = _perf()
        try:
            try:
                try:
                    request_id = await self.publish(
                        topic,
                        message,
                        sender_id=sender_id,
                        recipient=recipient,
                        reply_to=reply_subject,
                        headers=headers,
                        ttl=timeout,
                    )
                except asyncio.CancelledError:
                    if not pending.interrupted():
                        raise
                    reply = fut.result()  # None (the deadline), or raises StateError (closed)
                else:
                    requests.published(pending, request_id)
                    reply = await fut
            finally:
                self._requests.remove(reply_subject)
            latency = self.request_latency
            if reply is None:
                self.stats.request_timeouts += 1
                if latency is not None:
                    latency.observe(("timeout",), _perf() - started)
                raise RequestTimeout(topic, timeout)
            payload, meta = reply
            error = meta.headers.get(ERROR_HEADER)
            if latency is not None:
                latency.observe(("ok",) if error is None else ("error",), _perf() - started)
            if error is not None:
                raise RemoteError(topic, error)
        except BaseException as exc:
            if trace is not None:
                trace.end(exc)
            raise
        if trace is not None:
            trace.end()
        if with_metadata:
            return payload, meta
        return payload

    async def _open_inbox(self) -> str:
        if self._inbox_lock is None:
            self._inbox_lock = asyncio.Lock()
        async with self._inbox_lock:
            if self._inbox is None:
                prefix = self._own_inbox or self.broker.inbox_prefix()
                self._inbox_sub = await self._subscribe(
                    prefix + ".>", self._requests.on_reply, SubscriptionOptions()
                )
                self._inbox = prefix
                # A prefix that is a subject (a pattern's may hold "*") and a decimal token make a
                # valid subject while the whole is short enough; counted in characters, ASCII only.
                self._reply_room = MAX_SUBJECT_BYTES if prefix.isascii() and subject_ok(prefix) else -1
        return self._inbox

    # -- subscribing -------------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: None = None,
        *,
        queue: str | None = None,
        durable: str | None = None,
        filter: FilterSpec | None = None,
        concurrency: int = 1,
        max_attempts: int = 1,
        retry_delay: float = 0.1,
        context: Mapping[str, Any] | None = None,
    ) -> Callable[[Handler], Handler]: ...

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        queue: str | None = None,
        durable: str | None = None,
        filter: FilterSpec | None = None,
        concurrency: int = 1,
        max_attempts: int = 1,
        retry_delay: float = 0.1,
        context: Mapping[str, Any] | None = None,
    ) -> Awaitable[Subscription]: ...

    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        *,
        queue: str | None = None,
        durable: str | None = None,
        filter: FilterSpec | None = None,
        concurrency: int = 1,
        max_attempts: int = 1,
        retry_delay: float = 0.1,
        context: Mapping[str, Any] | None = None,
    ) -> Callable[[Handler], Handler] | Awaitable[Subscription]:
        """Subscribe ``handler(message, metadata)`` to ``pattern`` (``*`` one token, ``>`` the rest).

        Two forms: ``sub = await amb.subscribe(pattern, handler, ...)`` returns the active
        :class:`Subscription`; ``@amb.subscribe(pattern, ...)`` registers the decorated handler,
        active from connect (or, when already connected, before this client's next publish or
        request).

        Options: ``queue`` joins a queue group (each message to one member); ``durable`` names
        a durable subscription (brokers with ``durable``); ``filter`` selects by payload (see
        :mod:`agent_os.amb.filters`); ``concurrency`` handlers may run at once (1 keeps delivery order);
        a handler that raises is retried through broker redelivery until ``max_attempts``
        deliveries, waiting ``retry_delay`` seconds doubled per attempt, then dead-lettered;
        ``context`` seeds each delivery's ``metadata.context`` (settings for middleware, e.g.
        IATP's per-subscription policy), which also holds ``"subscription"``, this subscription.

        Raises ConfigError for an invalid pattern or option, CapabilityNotSupported for an
        option the broker lacks.
        """
        options = SubscriptionOptions(
            queue=queue,
            durable=durable,
            filter=compile_filter(filter),
            concurrency=concurrency,
            max_attempts=max_attempts,
            retry_delay=retry_delay,
            context=context,
        )
        if handler is not None:
            return self._subscribe(pattern, handler, options)

        def decorator(fn: Handler) -> Handler:
            sub = self._make_subscription(pattern, fn, options)
            if self._state is LifecycleState.OPEN:
                self._pending_starts.append(asyncio.get_running_loop().create_task(self._start(sub)))
            elif self._state is LifecycleState.UNOPENED:
                self._subs.append(sub)  # started by connect()
            else:
                self._require_open()
            return fn

        return decorator

    def _make_subscription(
        self, pattern: str, handler: Handler, options: SubscriptionOptions
    ) -> Subscription:
        pattern = validate_pattern(plain_text(pattern, "pattern"))
        if not (inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)):
            raise ConfigError("a handler must be an async function: async def handler(message, metadata)")
        return Subscription(self, pattern, handler, options)

    async def _subscribe(self, pattern: str, handler: Handler, options: SubscriptionOptions) -> Subscription:
        sub = self._make_subscription(pattern, handler, options)
        await self._ready()
        await self._start(sub)
        return sub

    async def _start(self, sub: Subscription) -> None:
        def invoke(env: Envelope, meta: Metadata) -> Awaitable[None]:
            # The handler's own coroutine: no frame of ours between the chain and the handler.
            return sub.handler(env.payload, meta)

        # Without middleware the handler is called directly (one coroutine less per message).
        trace = self._tracing
        layers: list[Middleware] = list(self._middleware)
        if trace is not None:  # outermost on delivery: its span holds verification and policy
            layers.insert(0, trace.for_subscription(sub.pattern, sub.options.queue))
        sub._chain = build_consume_chain(layers, invoke) if layers else None
        ahead, asked = 0, []
        for layer in layers:
            wanted = layer.lookahead(sub) if isinstance(layer, Middleware) else 0
            if wanted > 0:
                ahead = max(ahead, wanted)
                asked.append(layer)
        if ahead > sub.options.concurrency:
            sub.lookahead = ahead
            sub._prepares = tuple(layer.prepare for layer in asked)
            sub._abandons = tuple(layer.abandon for layer in asked)
            sub._refill_every = max(1, ahead // 2)
            # ahead - 1 queued and one prepared while it waits for room: ``ahead`` in all.
            sub._ahead = Dispatcher(
                functools.partial(self._take_turn, sub),
                max_pending=ahead - 1,
                name=f"look-ahead {sub.pattern!r}",
            )

        handler: Callable[[Delivery], Awaitable[None]] = functools.partial(self._on_delivery, sub)
        if sub.handler == self._requests.on_reply and sub._chain is None and sub._ahead is None:
            # The reply inbox without middleware: a reply resolves its request at once.
            handler = InstantHandler(handler, functools.partial(self._reply_now, sub))
        try:
            sub._broker_sub = await self.broker.subscribe(
                sub.pattern,
                handler,
                queue=sub.options.queue,
                durable=sub.options.durable,
            )
        except BaseException:
            if sub._broker_sub is None and sub not in self._subs:
                # Its first start, and nothing will start it again: over for the middleware,
                # which may have set something up for it (lookahead).
                self._tell_unsubscribed(sub)
            raise
        sub._active = True
        if sub not in self._subs:
            self._subs.append(sub)

    def _forget(self, sub: Subscription) -> None:
        """``sub`` has stopped for good: out of the client's list, and the middleware told
        (once: a second call does nothing)."""
        try:
            self._subs.remove(sub)
        except ValueError:
            return
        self._tell_unsubscribed(sub)

    def _tell_unsubscribed(self, sub: Subscription) -> None:
        """Call each middleware's ``unsubscribed`` for ``sub``; one that raises is logged."""
        for layer in self._middleware:
            if isinstance(layer, Middleware):
                try:
                    layer.unsubscribed(sub)
                except Exception:  # the subscription has stopped either way; the others are told
                    log.exception("middleware %r: unsubscribed() raised", layer)

    def stream(
        self,
        pattern: str,
        *,
        queue: str | None = None,
        filter: FilterSpec | None = None,
        buffer: int = 256,
        with_metadata: bool = False,
    ) -> MessageStream:
        """Iterate over messages on ``pattern``: ``async for message in amb.stream("events.>")``.

        See :class:`MessageStream` for buffering and closing.
        """
        pattern = validate_pattern(plain_text(pattern, "pattern"))
        return MessageStream(
            self, pattern, queue=queue, filter=filter, buffer=buffer, with_metadata=with_metadata
        )

    # -- the delivery path -------------------------------------------------------------------

    async def _on_delivery(self, sub: Subscription, delivery: Delivery) -> None:
        # The receive hot path. With concurrency 1 the handler runs here (the body of _process,
        # inlined to save a coroutine per message); keep the two in step. The envelope stays
        # wire fields until someone (middleware, a failure, metadata.envelope) needs the object.
        stats = self.stats
        stats.delivered += 1
        data = delivery.data
        try:
            # Decoder.decode_fields, inlined (a call less per message): the size limit,
            # msgspec's one-pass decode, the decoder's slow path for what msgspec refuses
            # (JSON, starting with "{", goes there directly).
            # test_the_inline_receive_decode_agrees_with_the_decoder feeds both one corpus.
            decoder = self._decoder
            if len(data) > decoder.max_bytes:
                raise OversizedEnvelope(len(data), decoder.max_bytes)
            if data[:1] == b"{":
                fields: WireFields = decoder.refused(data)
            else:
                try:
                    fields = typed_unpack(data)
                except Exception:
                    fields = decoder.refused(data)
                else:
                    if fields[5] or fields[2] not in valid_subjects:  # else: a known valid topic
                        check_subjects(fields[2], fields[5])
        except EnvelopeError as exc:
            stats.malformed += 1
            await self._dead_letter(sub, delivery, None, "malformed", exc)
            return
        expires_at = fields[8]
        if expires_at is not None and _time_ns() >= expires_at:
            stats.expired += 1
            await delivery.ack()
            return
        payload = fields[11]
        wanted = sub._filter
        if wanted is not None:
            try:
                keep = wanted(payload)
            except Exception as exc:
                await self._dead_letter(sub, delivery, envelope_from_wire(fields), "filter_error", exc)
                return
            if not keep:
                stats.filtered += 1
                await delivery.ack()
                return
        meta = metadata_from_wire(fields, delivery.subject, delivery.attempt, delivery.extra, sub.context)
        if sub._ahead is not None:
            sub._call_hooks(sub._prepares, meta, "prepare")
            item = (delivery, payload, meta, expires_at)
            if not await sub._ahead.put(item):  # stopping: dropped
                sub._abandon([item])
            return
        if sub._slots is not None:
            if await sub._slots.take():
                self._spawn(sub, delivery, payload, meta)
            return  # else unsubscribed while it waited for a slot: dropped, like what was queued
        chain = sub._chain
        started = 0.0
        if self._handler_times is not None:  # _start_timing, inlined
            if self._untimed:
                self._untimed -= 1
            else:
                started = _perf()
        try:
            if chain is None:
                await sub.handler(payload, meta)
            else:
                await chain(meta.envelope, meta)
        except Exception as exc:
            if started:
                self._time_handler(started)
            await self._failed(sub, delivery, meta, exc)
            return
        except asyncio.CancelledError as exc:
            error = _stray_cancellation(exc)
            if error is None:
                raise  # this delivery is being cancelled (drain timeout, close)
            await self._failed(sub, delivery, meta, error)
            return
        if started:
            self._time_handler(started)
        sub.handled += 1
        stats.handled += 1
        if type(delivery) is not LocalDelivery:  # a LocalDelivery's ack does nothing
            await delivery.ack()

    def _reply_now(self, sub: Subscription, delivery: Delivery) -> bool:
        """The reply inbox's synchronous path (see :class:`InstantHandler`): a well-formed,
        unexpired reply is given to its request here; anything else (False) goes the queued
        way, :meth:`_on_delivery`, which dead-letters or counts it."""
        if type(delivery) is not LocalDelivery or sub._chain is not None:
            return False  # a broker's delivery may want an ack, which awaits
        subject = delivery.subject
        # A reply subject this client made for a request still waiting is valid (see request):
        # a topic equal to it needs no second check.
        known = subject if len(subject) <= self._reply_room and subject in self._requests.waiting else None
        try:
            fields = self._decoder.decode_fields(delivery.data, known)
        except EnvelopeError:
            return False
        expires_at = fields[8]
        if expires_at is not None and _time_ns() >= expires_at:
            return False
        stats = self.stats
        stats.delivered += 1
        meta = metadata_from_wire(fields, delivery.subject, delivery.attempt, delivery.extra, sub.context)
        started = self._start_timing()
        self._requests.take(fields[11], meta)
        if started:
            self._time_handler(started)
        sub.handled += 1
        stats.handled += 1
        return True

    async def _take_turn(self, sub: Subscription, item: tuple[Delivery, Any, Metadata, int | None]) -> None:
        """The look-ahead queue's handler: a prepared delivery's turn. With ``concurrency=1`` it
        is processed here, in arrival order; otherwise it waits for a handler slot. A message
        whose ``ttl`` ran out while it waited is not handled (counted as expired)."""
        delivery, payload, meta, expires_at = item
        if expires_at is not None and _time_ns() >= expires_at:
            self.stats.expired += 1
            await delivery.ack()
            return
        sub._turns += 1
        if sub._turns % sub._refill_every == 0:
            # Let arrivals refill the queue (and send their work ahead) before going on:
            # otherwise this task takes every queued turn without yielding and then meets
            # messages prepared a moment ago, their work still under way.
            await asyncio.sleep(0)
        if sub._slots is None:
            await self._process(sub, delivery, payload, meta)
            return
        if not await sub._slots.take():  # unsubscribed while it waited for a slot: dropped
            sub._abandon([item])
            return
        self._spawn(sub, delivery, payload, meta)

    def _spawn(self, sub: Subscription, delivery: Delivery, payload: Any, meta: Metadata) -> None:
        """Process a delivery in a task of its own (``concurrency>1``; a slot already taken)."""
        task = asyncio.get_running_loop().create_task(self._process_released(sub, delivery, payload, meta))
        sub._tasks.add(task)
        task.add_done_callback(sub._tasks.discard)

    async def _process_released(
        self, sub: Subscription, delivery: Delivery, payload: Any, meta: Metadata
    ) -> None:
        try:
            await self._process(sub, delivery, payload, meta)
        finally:
            assert sub._slots is not None
            sub._slots.release()

    async def _process(self, sub: Subscription, delivery: Delivery, payload: Any, meta: Metadata) -> None:
        """Run the handler (through the middleware chain) on one delivery and settle it."""
        chain = sub._chain
        started = self._start_timing()
        try:
            if chain is None:
                await sub.handler(payload, meta)
            else:
                await chain(meta.envelope, meta)
        except Exception as exc:
            if started:
                self._time_handler(started)
            await self._failed(sub, delivery, meta, exc)
            return
        except asyncio.CancelledError as exc:
            error = _stray_cancellation(exc)
            if error is None:
                raise  # this delivery is being cancelled (drain timeout, close)
            await self._failed(sub, delivery, meta, error)
            return
        if started:
            self._time_handler(started)
        sub.handled += 1
        self.stats.handled += 1
        if type(delivery) is not LocalDelivery:
            await delivery.ack()

    def _start_timing(self) -> float:
        """The clock (perf_counter) when the handler call about to start is to be timed, else
        0.0 (latency off, or a call skipped: see :meth:`keep_latency`)."""
        if self._handler_times is None:
            return 0.0
        if self._untimed:
            self._untimed -= 1
            return 0.0
        return _perf()

    def _time_handler(self, started: float) -> None:
        """Count a timed handler call begun at ``started`` for itself and the calls skipped
        before it, and choose how many to skip next (see :meth:`keep_latency`)."""
        times = self._handler_times
        if times is None:
            return
        elapsed = _perf() - started
        weight = self._time_weight
        times[bisect_left(LATENCY_BUCKETS, elapsed)] += weight
        times[-1] += elapsed * weight
        skip = LATENCY_SAMPLE - 1 if elapsed < SAMPLE_BELOW else 0
        self._untimed = skip
        self._time_weight = skip + 1

    async def _failed(self, sub: Subscription, delivery: Delivery, meta: Metadata, exc: Exception) -> None:
        """Settle a delivery whose middleware refused it or whose handler raised: retry through
        the broker while attempts remain, else dead-letter it (and answer a request with an
        error reply)."""
        env = meta.envelope
        if isinstance(exc, MessageRejected):
            self.stats.rejected += 1
            await self._dead_letter(sub, delivery, env, exc.reason, exc, meta)
            return
        if isinstance(exc, InvalidSubject):
            # The handler built or was given a subject no broker takes (a forward, a reply):
            # sending again cannot help.
            self.stats.invalid_subjects += 1
            sub.errors += 1
            await self._dead_letter(sub, delivery, env, "invalid_subject", exc, meta)
            if env.reply_to:
                await self._send_error_reply(env, "invalid_subject")
            return
        self.stats.handler_errors += 1
        sub.errors += 1
        options = sub.options
        if delivery.attempt < options.max_attempts and self.broker.capabilities.redelivery:
            self.stats.retried += 1
            await delivery.nack(min(options.retry_delay * 2.0 ** min(delivery.attempt - 1, 64), MOST_SECONDS))
            return
        log.warning("handler for %r failed on %s: %r", sub.pattern, env.id, exc)
        await self._dead_letter(sub, delivery, env, "handler_error", exc, meta)
        if env.reply_to:
            await self._send_error_reply(env, f"handler_error: {type(exc).__name__}")

    async def _send_error_reply(self, request: Envelope, reason: str) -> None:
        assert request.reply_to is not None
        with contextlib.suppress(BusError):
            await self.publish(
                request.reply_to, None, correlation_id=request.id, headers={ERROR_HEADER: reason}
            )

    async def _dead_letter(
        self,
        sub: Subscription,
        delivery: Delivery,
        env: Envelope | None,
        reason: str,
        error: BaseException,
        meta: Metadata | None = None,
    ) -> None:
        """Publish the raw message to the dead-letter subject with why, then ack it (and
        call :attr:`dead_letter_hook` with the dead letter and ``meta``).

        Dead letters bypass the middleware chain: they are the bus's own record of a failure and
        must not be refused by the policy that caused it. If the dead letter cannot be published
        the message is nacked so a durable broker delivers it again.
        """
        subject = delivery.subject
        if subject.startswith(self.dead_letter_prefix + "."):
            # A failure while handling a dead letter: do not nest dead letters without bound.
            self.stats.dead_letter_failures += 1
            log.error("dead letter on %r could not be handled (%s): %r", subject, reason, error)
            await delivery.ack()
            return
        dead = dead_letter_envelope(self.dead_letter_prefix, self.agent_id, delivery, env, reason, error)
        try:
            await self._wire_send(dead, self._dead_letter_serializer)
        except BusError as exc:
            self.stats.dead_letter_failures += 1
            log.error("could not dead-letter a message from %r (%s): %r", subject, reason, exc)
            await delivery.nack(sub.options.retry_delay)
            return
        self.stats.count_dead_letter(reason)
        hook = self.dead_letter_hook
        if hook is not None:
            try:
                await hook(dead, meta)
            except Exception as exc:  # a hook's failure must not undo the dead letter
                log.error("dead-letter hook failed on %s from %r: %r", dead.id, subject, exc)
        await delivery.ack()
