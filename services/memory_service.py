"""The memory service: an :class:`~agent_os.emk.EMK` answering ``emk.store``, ``emk.search``,
``emk.query``, ``emk.get`` and ``emk.history`` requests over the bus, for each request's
verified sender. Subjects, payloads, errors and options: ``docs/services.md``, "The memory
service". Run it with ``agent-os serve memory`` or ``python -m agent_os.services.memory_service``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Final

import click

from agent_os.amb import AMB, Metadata, Subscription
from agent_os.amb.durations import Durations
from agent_os.amb.replies import ERROR_HEADER
from agent_os.emk import EMK, EMKError, MemoryRecord
from agent_os.iatp import ACCEPT_UNSIGNED, BIND_TOPIC, IATP, REPLAY_SCOPE
from agent_os.services._identity import Unauthenticated, require_verification, sender_identity
from agent_os.services._metrics import (
    METRICS_PORTS,
    MetricsOptions,
    metrics_endpoint,
    metrics_from_options,
    metrics_options,
    ready_line,
    require_metrics,
    service_registry,
)
from agent_os.services._process import (
    log_level_option,
    run,
    service_client,
    serving,
    stop_signals,
    verification_from_options,
    verification_options,
)

log = logging.getLogger("agent_os.services.memory")

OPERATIONS: Final = ("store", "search", "query", "get", "history")


class RequestError(Exception):
    """A request the service refuses before EMK sees it; ``code`` goes into the error reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MemoryService:
    """Serves one :class:`~agent_os.emk.EMK` on the bus (``docs/services.md``, "The memory service").

    ``amb`` should carry the IATP middleware (``iatp.middleware()``): a request is answered
    for its verified sender, and one without a valid IATP result is refused
    (``Unauthenticated``). ``trust_bus=True`` takes the envelope's claimed sender instead when
    there is no IATP result: only for a broker whose ACLs already authenticate senders. The
    operation is the signed topic's: a request delivered on another subject is refused
    (``wrong_subject`` by IATP, ``WrongSubject`` without it), and every subject shares one
    replay scope, ``replay_scope`` (the queue group). Start with ``await service.start()`` (or
    ``async with``); ``stop()`` unsubscribes, letting in-flight requests finish; neither the bus
    client nor the EMK is closed by the service.

    Counters: ``stats`` (``requests.<op>``, ``ok``, ``errors.<code>``), ``outcomes`` (by
    operation and outcome: ``ok`` or the error code) and ``durations`` (seconds per request, by
    operation); :class:`MemoryMetrics` exposes them to Prometheus.
    """

    def __init__(
        self,
        amb: AMB,
        emk: EMK,
        *,
        prefix: str = "emk",
        concurrency: int = 8,
        trust_bus: bool = False,
    ) -> None:
        self.amb = amb
        self.emk = emk
        self.prefix = prefix
        self.concurrency = concurrency
        self.trust_bus = trust_bus
        self.replay_scope = prefix
        self.stats: Counter[str] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.durations = Durations()
        self._subs: list[Subscription] = []
        self._ops: dict[str, Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "store": self._store,
            "search": self._search,
            "query": self._query,
            "get": self._get,
            "history": self._history,
        }

    async def start(self) -> None:
        """Open the EMK, embed one probe text, then subscribe to the request subjects.
        Idempotent. The probe makes a service whose embedder cannot work (its extra missing,
        its model or provider unreachable) fail here, not on every request: it raises EMK's
        ConfigError naming the extra to install, or EmbeddingError."""
        if self._subs:
            return
        await self.emk.open()
        await self.emk.embedder.embed(["agent-os memory service start"])
        for op in OPERATIONS:
            handler = self._handler(op)
            sub = await self.amb.subscribe(
                f"{self.prefix}.{op}",
                handler,
                queue=self.prefix,
                concurrency=self.concurrency,
                context=self._context,
            )
            self._subs.append(sub)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; those in flight are answered first (up to ``timeout``)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.drain(timeout)

    async def __aenter__(self) -> MemoryService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def _context(self) -> dict[str, Any]:
        # IATP's options for every subject: bound to the signed topic, one replay scope, and
        # unsigned requests let through to be answered "Unauthenticated" (not left to time out).
        return {BIND_TOPIC: True, REPLAY_SCOPE: self.replay_scope, ACCEPT_UNSIGNED: True}

    def _handler(self, op: str) -> Callable[[Any, Metadata], Awaitable[None]]:
        async def handle(message: Any, metadata: Metadata) -> None:
            await self._handle(op, message, metadata)

        return handle

    async def _handle(self, op: str, message: Any, metadata: Metadata) -> None:
        self.stats[f"requests.{op}"] += 1
        started = time.perf_counter()
        try:
            if metadata.topic != metadata.subject:
                raise RequestError(
                    "WrongSubject", f"the request was signed for {str(metadata.topic)[:200]!r}, not {op}"
                )
            try:
                agent_id = sender_identity(metadata, trust_bus=self.trust_bus)
            except Unauthenticated as exc:
                raise RequestError("Unauthenticated", str(exc)) from None
            if not isinstance(message, dict):
                raise RequestError("BadRequest", f"the {op} request must be a dict")
            claimed = message.get("agent_id")
            if claimed is not None and claimed != agent_id:
                raise RequestError("Forbidden", "agent_id must be the caller's own")
            answer = await self._ops[op](agent_id, message)
        except RequestError as exc:
            await self._fail(op, metadata, exc.code, str(exc), started)
        except EMKError as exc:
            await self._fail(op, metadata, type(exc).__name__, str(exc), started)
        except Exception as exc:
            log.exception("memory service: %s request %s failed", op, metadata.id)
            await self._fail(op, metadata, "Internal", type(exc).__name__, started)
        else:
            self.durations.observe((op,), time.perf_counter() - started)
            self.stats["ok"] += 1
            self.outcomes[op, "ok"] += 1
            if metadata.reply_to:
                await self.amb.reply(metadata, {"ok": True, **answer})

    async def _fail(self, op: str, metadata: Metadata, code: str, message: str, started: float) -> None:
        self.durations.observe((op,), time.perf_counter() - started)
        self.stats[f"errors.{code}"] += 1
        self.outcomes[op, code] += 1
        if metadata.reply_to:
            reason = f"{code}: {message}"[:1024]
            await self.amb.reply(
                metadata, {"ok": False, "error": code, "message": message}, headers={ERROR_HEADER: reason}
            )

    # -- operations --------------------------------------------------------------------------

    async def _store(self, agent_id: str, m: dict[str, Any]) -> dict[str, Any]:
        record = await self.emk.store(
            agent_id,
            _get(m, "content", str),
            metadata=_get(m, "metadata", dict, None),
            tags=_get(m, "tags", list, None),
            supersedes=_get(m, "supersedes", str, None),
            session_id=_get(m, "session_id", str, None),
        )
        return {"record": record.to_dict()}

    async def _search(self, agent_id: str, m: dict[str, Any]) -> dict[str, Any]:
        records = await self.emk.search(
            agent_id,
            _get(m, "query", str),
            limit=_get(m, "limit", int, 10),
            min_relevance=float(_get(m, "min_relevance", (int, float), 0.0)),
            tags=_get(m, "tags", list, None),
            metadata=_get(m, "metadata", dict, None),
            since=_time(m, "since"),
            until=_time(m, "until"),
            include_superseded=_get(m, "include_superseded", bool, False),
            session_id=_get(m, "session_id", str, None),
        )
        return {"records": _dicts(records)}

    async def _query(self, agent_id: str, m: dict[str, Any]) -> dict[str, Any]:
        records = await self.emk.query(
            agent_id,
            since=_time(m, "since"),
            until=_time(m, "until"),
            tags=_get(m, "tags", list, None),
            metadata=_get(m, "metadata", dict, None),
            limit=_get(m, "limit", int, 100),
            include_superseded=_get(m, "include_superseded", bool, False),
            session_id=_get(m, "session_id", str, None),
            newest_first=_get(m, "newest_first", bool, True),
        )
        return {"records": _dicts(records)}

    async def _get(self, agent_id: str, m: dict[str, Any]) -> dict[str, Any]:
        record = await self.emk.get(
            _get(m, "id", str), agent_id=agent_id, session_id=_get(m, "session_id", str, None)
        )
        return {"record": record.to_dict()}

    async def _history(self, agent_id: str, m: dict[str, Any]) -> dict[str, Any]:
        records = await self.emk.history(
            _get(m, "id", str), agent_id=agent_id, session_id=_get(m, "session_id", str, None)
        )
        return {"records": _dicts(records)}


class MemoryMetrics:
    """A prometheus_client collector over a :class:`MemoryService`'s counters
    (``docs/observability.md``): ``agentos_emk_requests_total{operation,outcome}`` and
    ``agentos_emk_request_duration_seconds{operation}``."""

    def __init__(self, service: MemoryService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        requests = CounterMetricFamily(
            "agentos_emk_requests",
            "Memory-service requests answered, by operation and outcome (ok or the error code)",
            labels=["operation", "outcome"],
        )
        for (op, outcome), count in list(self.service.outcomes.items()):
            requests.add_metric([op, outcome], count)
        yield requests
        yield self.service.durations.family(
            "agentos_emk_request_duration_seconds",
            "Time to answer a memory-service request (EMK store, search, ... with embedding), by operation",
            ["operation"],
        )


_REQUIRED = object()


def _get(m: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    value = m.get(key)
    if value is None:
        if default is _REQUIRED:
            raise RequestError("BadRequest", f"{key!r} is required")
        return default
    if isinstance(value, bool) and kind is not bool:
        raise RequestError("BadRequest", f"{key!r} has the wrong type")
    if not isinstance(value, kind):
        raise RequestError("BadRequest", f"{key!r} has the wrong type")
    return value


def _time(m: dict[str, Any], key: str) -> datetime | None:
    text = _get(m, key, str, None)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError("BadRequest", f"{key!r} is not an ISO-8601 time") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _dicts(records: list[MemoryRecord]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in records]


# -- the process -------------------------------------------------------------------------------


async def serve(
    *,
    broker: str,
    emk: EMK,
    iatp: IATP | None = None,
    trust_bus: bool = False,
    prefix: str = "emk",
    agent_id: str = "memory-service",
    concurrency: int = 8,
    stop: asyncio.Event | None = None,
    metrics: MetricsOptions | None = None,
) -> MemoryService:
    """Serve ``emk`` on the broker at ``broker`` until ``stop`` is set (or SIGINT/SIGTERM), then answer
    the requests in flight, close the bus client and the EMK. With ``iatp`` (holding the service's
    signing key ``agent_id`` and the agents' public identities) every request is verified and
    answered for its verified sender; without it ``trust_bus`` must be true. With ``metrics``,
    serves ``/metrics`` and ``/healthz`` there (``docs/observability.md``). Prints ``ready memory
    subjects=<prefix>.* broker=<url>`` (then `` metrics=<url>``) once it takes requests; returns the
    service (its ``stats``). Raises VerificationRequired (neither or both of ``iatp`` and
    ``trust_bus``), ValueError for an unsupported broker URL, EMKError (ConfigError naming the extra
    to install, EmbeddingError when the embedder's probe fails) or a bus error when it cannot start
    (what was opened is closed)."""
    try:
        require_verification(iatp is not None, trust_bus, "memory service")
        if metrics is not None:
            require_metrics()
        client = service_client(broker, agent_id, iatp)
    except BaseException:
        await emk.close()
        raise
    service = MemoryService(client, emk, prefix=prefix, concurrency=concurrency, trust_bus=trust_bus)
    async with stop_signals(stop) as stopping:
        try:
            await client.connect()
            await service.start()
            log.info(
                "memory service %s on %s (%s storage, %s; senders %s)",
                agent_id,
                broker,
                emk.storage,
                emk.embedder.model,
                "taken from the trusted bus" if trust_bus else "verified by IATP",
            )
            registry = service_registry([client], MemoryMetrics(service)) if metrics is not None else None
            async with metrics_endpoint(metrics, registry, lambda: client.healthy) as url:
                await serving(
                    stopping,
                    ready_line(f"ready memory subjects={prefix}.* broker={broker}", url),
                    log,
                    "answering the requests in flight",
                    client=client,
                )
        finally:
            try:
                await service.stop()
                await client.close()
            finally:
                await emk.close()
    return service


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", required=True, help="Broker URL: nats://host:4222, redis://, kafka://, memory://name."
)
@verification_options
@click.option(
    "--storage",
    type=click.Choice(["embedded", "postgresql", "memory"]),
    default="embedded",
    show_default=True,
    help="embedded PostgreSQL (pgserver), a PostgreSQL server with pgvector, or in-process.",
)
@click.option(
    "--dsn",
    envvar="AGENTOS_EMK_DSN",
    help="postgresql:// DSN (postgresql storage), or the data directory (embedded). Or AGENTOS_EMK_DSN.",
)
@click.option(
    "--embedding-model",
    default="all-MiniLM-L6-v2",
    show_default=True,
    help="local, hashing[-<dim>] or any litellm embedding model.",
)
@click.option(
    "--isolation", type=click.Choice(["agent", "session", "global"]), default="agent", show_default=True
)
@click.option("--namespace", default="emk", show_default=True, help="The PostgreSQL schema.")
@click.option(
    "--prefix", default="emk", show_default=True, help="Subjects <prefix>.store ...; also the queue group."
)
@click.option("--agent-id", default="memory-service", show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@metrics_options(METRICS_PORTS["memory"])
@log_level_option
def main(
    broker: str,
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None,
    nonce_prefix: str,
    storage: str,
    dsn: str | None,
    embedding_model: str,
    isolation: str,
    namespace: str,
    prefix: str,
    agent_id: str,
    concurrency: int,
    log_level: str,
    key_refresh: float,
    verify_workers: int,
    metrics_host: str,
    metrics_port: int,
    metrics_token: str | None,
    no_metrics: bool,
) -> None:
    """Run the memory service (EMK over the bus) until SIGINT/SIGTERM."""
    verification = verification_from_options(
        identities, trust_bus, nonce_store, nonce_prefix, key_refresh, verify_workers
    )
    metrics = metrics_from_options(no_metrics, metrics_host, metrics_port, metrics_token)

    async def serve_process() -> None:
        emk = EMK(storage, dsn, embedding_model, isolation, namespace=namespace)
        try:
            async with verification.opened(agent_id) as iatp:
                await serve(
                    broker=broker,
                    emk=emk,
                    iatp=iatp,
                    trust_bus=verification.trust_bus,
                    prefix=prefix,
                    agent_id=agent_id,
                    concurrency=concurrency,
                    metrics=metrics,
                )
        finally:
            await emk.close()  # serve closed it already, unless the identities could not be opened

    run(serve_process, log_level=log_level, errors=(EMKError,), name="memory")


if __name__ == "__main__":
    main()
