"""Tracing with OpenTelemetry: the switch, the W3C trace context in envelope headers, the bus's
spans, and small span helpers for the parts above the bus.

Off by default. Nothing here imports OpenTelemetry until :func:`enable` (or
:func:`configure_from_env`) runs; a client decides at connect whether it traces (then its
middleware chain gets a :class:`BusTracing` layer), and the other parts test :data:`active`
before they build a span, so with tracing off the message path is the plain one. Spans, their
attributes, the configuration and the cost: ``docs/observability.md``, "Tracing".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

from agent_os.amb.envelope import Envelope
from agent_os.amb.metadata import Metadata
from agent_os.amb.middleware import ConsumeNext, Middleware, PublishNext

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider

log = logging.getLogger("agent_os.amb.tracing")

INSTRUMENTATION: Final = "agent_os"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
MAX_TRACEPARENT: Final = 128
"""A longer ``traceparent`` is ignored (version 00 is 55 characters): the message starts a new trace."""
MAX_TRACESTATE: Final = 512
"""A longer ``tracestate`` is ignored (W3C's 512 characters); the ``traceparent`` still counts."""
MAX_ATTRIBUTE: Final = 256
"""Free-text attribute values (a policy's reason, a resource) are cut to this many characters."""
INSTALL_HINT: Final = "tracing needs OpenTelemetry: pip install 'agent-os[observability]'"
EXPORTERS: Final = ("otlp", "console", "none")

Kind = Literal["internal", "client", "server", "producer", "consumer"]

active: bool = False
"""True while tracing is enabled (read it as ``tracing.active``; change it with :func:`enable`)."""
_tracer: Any = None  # the opentelemetry Tracer while active
_otel: Any = None  # the opentelemetry.trace module, imported by enable()
_propagator: Any = None
_time_ns: Final = time.time_ns


def enable(tracer_provider: TracerProvider | None = None) -> None:
    """Turn tracing on: spans go to ``tracer_provider`` (default: OpenTelemetry's global one).

    Bus clients that connect from now on trace; clients connected before do not. Raises
    ImportError naming the ``observability`` extra when ``opentelemetry-api`` is missing."""
    global active, _tracer, _otel, _propagator
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    _otel = trace
    _propagator = TraceContextTextMapPropagator()
    _tracer = provider.get_tracer(INSTRUMENTATION)
    active = True


def disable() -> None:
    """Turn tracing off for clients connecting from now on and for every other part at once."""
    global active, _tracer
    active = False
    _tracer = None


@dataclasses.dataclass(slots=True)
class TracingSetup:
    """What :func:`configure_from_env` installed: ``shutdown()`` exports the spans still
    buffered, then turns tracing off."""

    provider: SdkTracerProvider

    def shutdown(self) -> None:
        disable()
        self.provider.shutdown()


def configure_from_env(service_name: str) -> TracingSetup | None:
    """Set up tracing for a process from the standard ``OTEL_*`` environment variables.

    Tracing is configured when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console``, or,
    with that variable unset, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` turns it off.
    Then an SDK tracer provider (``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES``, else
    ``service_name``; the sampler of ``OTEL_TRACES_SAMPLER``) exports through a batch
    processor (``OTEL_BSP_*``) with OTLP over HTTP (``OTEL_EXPORTER_OTLP_*``), becomes the
    global provider, and tracing is enabled. Returns None, doing nothing, when tracing is not
    configured, or when the ``observability`` extra is missing (logged). Raises ValueError
    for an exporter other than ``otlp``, ``console`` or ``none``, or an OTLP protocol other
    than ``http/protobuf``."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = _exporters()
    if not names:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        log.warning("tracing is configured (OTEL_*) but not installed: %s", INSTALL_HINT)
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    for name in names:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("tracing is configured (OTEL_*) but not installed: %s", INSTALL_HINT)
                return None
            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    enable(provider)
    return TracingSetup(provider)


def _exporters() -> list[str]:
    """The exporters the environment asks for (empty: tracing is not configured)."""
    raw = os.environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        names = ["otlp"] if any(os.environ.get(e) for e in endpoints) else []
    else:
        names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of {', '.join(EXPORTERS)}")
    names = [n for n in names if n != "none"]
    if "otlp" in names:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = os.environ.get(var)
            if protocol:
                if protocol.strip() != "http/protobuf":
                    raise ValueError(f"{var}: only http/protobuf is supported, not {protocol!r}")
                break
    return names


@contextlib.contextmanager
def configured(service_name: str) -> Iterator[TracingSetup | None]:
    """:func:`configure_from_env` for the block, then the setup's ``shutdown()`` (the spans
    still buffered are exported). For a process's main function."""
    setup = configure_from_env(service_name)
    try:
        yield setup
    finally:
        if setup is not None:
            setup.shutdown()


# -- spans ---------------------------------------------------------------------------------------


def _kind(kind: Kind) -> Any:
    return getattr(_otel.SpanKind, kind.upper())


def clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """``attributes`` as OpenTelemetry takes them: None left out, long text cut to
    :data:`MAX_ATTRIBUTE`, other values than str, bool, int and float as text."""
    if not attributes:
        return {}
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, str) and len(value) > MAX_ATTRIBUTE:
            value = value[:MAX_ATTRIBUTE]
        elif not isinstance(value, str | bool | int | float):
            value = str(value)[:MAX_ATTRIBUTE]
        out[key] = value
    return out


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: Kind = "internal",
    parent: Context | None = None,
) -> Iterator[Span | None]:
    """A span around the block, current inside it (None and nothing else while tracing is off).

    ``parent``: the context the span belongs to (default: the current one). An exception
    leaving the block is recorded on the span, which ends with status ERROR."""
    tracer = _tracer
    if not active or tracer is None:
        yield None
        return
    with tracer.start_as_current_span(
        name, context=parent, kind=_kind(kind), attributes=clean(attributes)
    ) as s:
        yield s


def record(
    name: str,
    started_ns: int,
    attributes: Mapping[str, Any] | None = None,
    *,
    error: str | None = None,
    events: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Record a span that ran from ``started_ns`` (``time.time_ns()``) until now, as a child
    of the current span: for a step whose outcome is known only at its end (a verification,
    a decision). ``error``: end with status ERROR and this description. ``events``: events
    (name -> attributes) added to it. Does nothing while tracing is off."""
    tracer = _tracer
    if not active or tracer is None:
        return
    s = tracer.start_span(name, attributes=clean(attributes), start_time=started_ns)
    for event, fields in (events or {}).items():
        s.add_event(event, clean(fields))
    if error is not None:
        set_error(s, error)
    s.end()


def set_error(span: Span, description: str) -> None:
    """Give ``span`` the status ERROR with ``description`` (cut to :data:`MAX_ATTRIBUTE`)."""
    span.set_status(_otel.Status(_otel.StatusCode.ERROR, description[:MAX_ATTRIBUTE]))


def now() -> int:
    """The clock spans use (``time.time_ns()``)."""
    return _time_ns()


def add_event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Add an event to the current span (nothing while tracing is off or outside a span)."""
    if active and _otel is not None:
        _otel.get_current_span().add_event(name, clean(attributes))


class Detached:
    """A span started now and ended later, possibly in another task (a held message): not
    current anywhere. ``parent`` is the context it was started in, for work that belongs
    beside it (:func:`span` with ``parent=``). Ending twice is harmless."""

    __slots__ = ("_ended", "parent", "span")

    def __init__(self, span: Span, parent: Context) -> None:
        self.span = span
        self.parent = parent
        self._ended = False

    def end(self, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if attributes:
            self.span.set_attributes(clean(attributes))
        if error is not None:
            set_error(self.span, error)
        self.span.end()


def detached(name: str, attributes: Mapping[str, Any] | None = None) -> Detached | None:
    """Start a :class:`Detached` span under the current context (None while tracing is off)."""
    tracer = _tracer
    if not active or tracer is None:
        return None
    from opentelemetry import context

    parent = context.get_current()
    return Detached(tracer.start_span(name, context=parent, attributes=clean(attributes)), parent)


# -- trace context in envelope headers -----------------------------------------------------------


class _BoundedGetter:
    """Reads trace headers from an envelope's headers, leaving out over-long ones."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if not isinstance(value, str):
            return None
        if len(value) > (MAX_TRACEPARENT if key == TRACEPARENT else MAX_TRACESTATE):
            return None
        return [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER: Final = _BoundedGetter()


def inject(headers: dict[str, str]) -> None:
    """Write the current span's trace context into ``headers`` (``traceparent``, and
    ``tracestate`` when it has one), replacing what was there. Nothing while tracing is off."""
    if not active or _propagator is None:
        return
    headers.pop(TRACESTATE, None)
    _propagator.inject(headers)


def extract(headers: Mapping[str, str]) -> Context | None:
    """The trace context in ``headers``, or None when there is none or it is malformed or
    over-long (the message then starts a new trace). None while tracing is off."""
    if not active or _propagator is None or TRACEPARENT not in headers:
        return None
    return _extract(headers)


def _extract(headers: Mapping[str, str]) -> Context | None:
    ctx = _propagator.extract(headers, getter=_GETTER)
    if not _otel.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx  # type: ignore[no-any-return]


def destination(subject: str) -> str:
    """A subject as a span name shows it: ``(temporary)`` for a reply inbox (a subject with
    an ``_INBOX`` token), which would make one name per request."""
    if subject.startswith("_INBOX") or "._INBOX" in subject:
        return "(temporary)"
    return subject


# -- the bus ---------------------------------------------------------------------------------------


def message_attributes(
    env: Envelope, subject: str, operation: str, client_id: str, system: str
) -> dict[str, Any]:
    """The messaging attributes (OpenTelemetry's semantic conventions) of a span about ``env``
    on ``subject``: ``operation`` is ``send``, ``process`` or ``request``."""
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.name": operation,
        "messaging.destination.name": subject,
        "messaging.message.id": env.id,
        "messaging.client.id": client_id,
        "agent_os.message.sender": env.sender,
    }
    if operation != "request":
        attributes["messaging.operation.type"] = operation
    if env.correlation_id is not None:
        attributes["messaging.message.conversation_id"] = env.correlation_id
    if env.recipient is not None:
        attributes["agent_os.message.recipient"] = env.recipient
    if destination(subject) != subject:
        attributes["messaging.destination.temporary"] = True
    return attributes


class BusTracing(Middleware):
    """The tracing layer of one bus client: a PRODUCER span ``send <subject>`` around each
    publish, its trace context written into the envelope's headers; a CONSUMER span
    ``process <pattern>`` around each delivery, the child of the context its headers carry
    (a new trace when they carry none, a malformed or an over-long one: counted in the client
    layer's ``ignored_headers``). Innermost on publish, outermost on delivery, so that every
    other layer's spans (signing, verification, policy) are inside.

    Built by the client at connect while tracing is active (:meth:`for_client`), one per
    subscription (:meth:`for_subscription`); messaging attributes follow OpenTelemetry's
    semantic conventions."""

    def __init__(
        self,
        tracer: Tracer,
        client_id: str,
        system: str,
        pattern: str | None = None,
        queue: str | None = None,
        client: BusTracing | None = None,
    ) -> None:
        self.tracer = tracer
        self.client_id = client_id
        self.system = system
        self.pattern = pattern
        self.queue = queue
        self.ignored_headers = 0
        self._client = client or self  # the client's layer, which counts for its subscriptions
        self._kinds = _otel.SpanKind
        self._name = "process " + destination(pattern) if pattern is not None else "process"
        from opentelemetry import context

        # The span is made current by hand, not with start_as_current_span, whose two nested
        # context managers cost about as much again as a non-recording span.
        self._attach = context.attach
        self._detach = context.detach
        self._in_context = _otel.set_span_in_context

    @classmethod
    def for_client(cls, client_id: str, system: str) -> BusTracing | None:
        """The layer of a client connecting now; None while tracing is off."""
        if not active or _tracer is None:
            return None
        return cls(_tracer, client_id, system)

    def for_subscription(self, pattern: str, queue: str | None) -> BusTracing:
        """The layer of one of the client's subscriptions (its spans name its pattern)."""
        return BusTracing(self.tracer, self.client_id, self.system, pattern, queue, self._client)

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        topic = envelope.topic
        attributes = message_attributes(envelope, topic, "send", self.client_id, self.system)
        span = self.tracer.start_span(
            "send " + destination(topic), kind=self._kinds.PRODUCER, attributes=attributes
        )
        ctx = self._in_context(span)
        token = self._attach(ctx)
        try:
            envelope.headers.pop(TRACESTATE, None)
            _propagator.inject(envelope.headers, context=ctx)
            await call_next(envelope)
        except Exception as exc:
            _failed(span, exc)
            raise
        finally:
            self._detach(token)
            span.end()

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        headers = envelope.headers
        parent = None
        if TRACEPARENT in headers:
            parent = _extract(headers)
            if parent is None:
                self._client.ignored_headers += 1
        elif len(headers.get(TRACESTATE, "")) > MAX_TRACESTATE:
            self._client.ignored_headers += 1
        attributes = message_attributes(envelope, metadata.subject, "process", self.client_id, self.system)
        if self.pattern is not None:
            attributes["messaging.destination.template"] = self.pattern
        if self.queue is not None:
            attributes["messaging.consumer.group.name"] = self.queue
        if metadata.attempt > 1:
            attributes["agent_os.message.attempt"] = metadata.attempt
        span = self.tracer.start_span(
            self._name, context=parent, kind=self._kinds.CONSUMER, attributes=attributes
        )
        token = self._attach(self._in_context(span))
        try:
            await call_next(envelope, metadata)
        except Exception as exc:
            _failed(span, exc)
            raise
        finally:
            self._detach(token)
            span.end()

    def begin_request(self, topic: str, recipient: str | None) -> RequestSpan:
        """Start the CLIENT span ``request <subject>`` of a request and make it current until
        :meth:`RequestSpan.end` (the request's publish and the wait for its reply are in it)."""
        attributes: dict[str, Any] = {
            "messaging.system": self.system,
            "messaging.operation.name": "request",
            "messaging.destination.name": topic,
            "messaging.client.id": self.client_id,
        }
        if recipient is not None:
            attributes["agent_os.message.recipient"] = recipient
        s = self.tracer.start_span(
            "request " + destination(topic), kind=self._kinds.CLIENT, attributes=attributes
        )
        from opentelemetry import context

        return RequestSpan(s, context.attach(_otel.set_span_in_context(s)))


def _failed(span: Span, error: Exception) -> None:
    """Record ``error`` on ``span`` and give it the status ERROR (as start_as_current_span does)."""
    if span.is_recording():
        span.record_exception(error)
        set_error(span, f"{type(error).__name__}: {error}")


class RequestSpan:
    """The span of one request in flight (:meth:`BusTracing.begin_request`)."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self.token = token

    def end(self, error: BaseException | None = None) -> None:
        """Stop being current and end; ``error`` (the request's exception; not a cancellation)
        is recorded."""
        from opentelemetry import context

        context.detach(self.token)  # type: ignore[arg-type]
        if isinstance(error, Exception):
            _failed(self.span, error)
        self.span.end()


@contextlib.contextmanager
def forwarding(envelope: Envelope, subject: str, client_id: str, system: str) -> Iterator[Envelope]:
    """A PRODUCER span ``send <subject>`` for an envelope sent past a client's publish chain
    (the control-plane service forwarding a message, or answering for itself); yields a copy
    of the envelope whose trace headers name this span (they are outside the signed bytes, so
    its signature still verifies). While tracing is off it yields the envelope itself."""
    tracer = _tracer
    if not active or tracer is None:
        yield envelope
        return
    attributes = message_attributes(envelope, subject, "send", client_id, system)
    with tracer.start_as_current_span(
        "send " + destination(subject), kind=_otel.SpanKind.PRODUCER, attributes=attributes
    ):
        headers = dict(envelope.headers)
        inject(headers)
        yield dataclasses.replace(envelope, headers=headers)
