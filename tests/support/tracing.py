"""Tracing in tests: spans kept in memory by the OpenTelemetry SDK (:func:`traced`), and an
OTLP/HTTP receiver that decodes what exporters send (:class:`OtlpReceiver`), both with the same
small view of a span (:class:`SpanView`) so that assertions read alike."""

from __future__ import annotations

import contextlib
import gzip
import socket
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent_os.amb import tracing


@dataclass(frozen=True)
class SpanView:
    """What the tests look at in a span: ids as hex, the kind's name in lower case
    (``producer``), the status (``unset``, ``ok``, ``error``), the attributes, the events' names
    and the resource's ``service.name``."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str
    status: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()
    service: str = ""


class Spans:
    """A list of spans with look-ups by name and by parent."""

    def __init__(self, spans: Iterable[SpanView]) -> None:
        self.all = list(spans)

    def named(self, name: str) -> list[SpanView]:
        return [s for s in self.all if s.name == name]

    def one(self, name: str) -> SpanView:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r} in {self.names()}"
        return found[0]

    def children(self, parent: SpanView) -> list[SpanView]:
        return [s for s in self.all if s.parent_id == parent.span_id]

    def parent(self, span: SpanView) -> SpanView | None:
        return next((s for s in self.all if s.span_id == span.parent_id), None)

    def names(self) -> list[str]:
        return sorted(s.name for s in self.all)

    def trace(self, trace_id: str) -> Spans:
        return Spans(s for s in self.all if s.trace_id == trace_id)


def _view(span: Any) -> SpanView:
    """A SpanView of an SDK ``ReadableSpan``."""
    parent = span.parent
    return SpanView(
        name=span.name,
        trace_id=f"{span.context.trace_id:032x}",
        span_id=f"{span.context.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else None,
        kind=span.kind.name.lower(),
        status=span.status.status_code.name.lower(),
        attributes=dict(span.attributes or {}),
        events=tuple(e.name for e in span.events),
        service=str(span.resource.attributes.get("service.name", "")),
    )


class MemorySpans:
    """The spans an in-memory exporter holds (:func:`traced`)."""

    def __init__(self, exporter: Any) -> None:
        self._exporter = exporter

    def finished(self) -> Spans:
        return Spans(_view(s) for s in self._exporter.get_finished_spans())

    def clear(self) -> None:
        self._exporter.clear()


@contextlib.contextmanager
def traced() -> Iterator[MemorySpans]:
    """Tracing on for the block with an SDK provider whose spans stay in memory (exported as
    each ends); off again afterwards. Clients must connect inside the block to trace."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield MemorySpans(exporter)
    finally:
        tracing.disable()
        provider.shutdown()


# -- OTLP over HTTP ------------------------------------------------------------------------------

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_STATUS = {0: "unset", 1: "ok", 2: "error"}


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which is not None else None


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on 127.0.0.1 (any free port): ``POST /v1/traces`` with an
    ``ExportTraceServiceRequest`` (protobuf, plain or gzip) is decoded with the
    ``opentelemetry-proto`` messages and its spans kept in ``spans``; ``requests`` counts the
    exports. Use ``async with OtlpReceiver() as receiver`` and give exporters
    ``receiver.endpoint`` (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""

    def __init__(self) -> None:
        self.received: list[SpanView] = []
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> Spans:
        return Spans(self.received)

    async def _export(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.requests += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.received.append(
                        SpanView(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex() or None,
                            kind=_KINDS.get(s.kind, str(s.kind)),
                            status=_STATUS.get(s.status.code, str(s.status.code)),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            events=tuple(e.name for e in s.events),
                            service=str(resource.get("service.name", "")),
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
