"""The metrics port every service process opens: ``/metrics`` (Prometheus) and ``/healthz``
(its broker connection), and the ``--metrics-*`` options. Metric names and the options:
``docs/observability.md``; the services time requests with
:class:`~agent_os.amb.durations.Durations`.

A service's ``serve`` coroutine builds a registry with :func:`service_registry` (its bus
clients and its own collectors) and wraps its wait in :func:`metrics_endpoint`, whose URL goes
into the ready line (:func:`ready_line`). Counters stay plain integers on the services and
clients; prometheus_client reads them at scrape time only.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from agent_os.amb import AMB
from agent_os.amb.metrics import BusCollector
from agent_os.iatp.metrics import TrustCollector

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

log = logging.getLogger("agent_os.services.metrics")

METRICS_HOST: Final = "127.0.0.1"
"""The default ``--metrics-host``: local only; a container gives ``0.0.0.0`` to be scraped."""
METRICS_TOKEN_ENV: Final = "AGENTOS_METRICS_TOKEN"
"""The environment variable that may hold ``--metrics-token``."""
METRICS_PORTS: Final = {"control-plane": 9464, "memory": 9465, "verifier": 9466, "tool": 9467, "mcp": 9468}
"""Each service's default ``--metrics-port``: distinct, so that all run side by side on one host."""
MIN_TOKEN: Final = 16
INSTALL_HINT: Final = "the metrics port needs aiohttp and prometheus-client: pip install 'agent-os[service]'"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    """Where a service serves ``/metrics`` and ``/healthz``: ``host``, ``port`` (0: any free
    port) and an optional bearer ``token`` for ``/metrics`` (kept out of the repr; None: open)."""

    host: str = METRICS_HOST
    port: int = METRICS_PORTS["control-plane"]
    token: str | None = field(default=None, repr=False)


def metrics_options(default_port: int) -> Callable[[F], F]:
    """Add ``--metrics-host``, ``--metrics-port``, ``--metrics-token`` and ``--no-metrics`` to a
    service command (its callback gets ``metrics_host``, ``metrics_port``, ``metrics_token`` and
    ``no_metrics``; turn them into options with :func:`metrics_from_options`)."""

    def add(command: F) -> F:
        command = click.option(
            "--no-metrics", is_flag=True, help="Open no metrics port (no /metrics, no /healthz)."
        )(command)
        command = click.option(
            "--metrics-token",
            envvar=METRICS_TOKEN_ENV,
            help=f"A bearer token (at least {MIN_TOKEN} characters) /metrics requires; none: open "
            f"(/healthz is always open). Or {METRICS_TOKEN_ENV}.",
        )(command)
        command = click.option(
            "--metrics-port",
            type=click.IntRange(0, 65535),
            default=default_port,
            show_default=True,
            help="The port of /metrics and /healthz; 0: any free port (the ready line names it).",
        )(command)
        return click.option(
            "--metrics-host",
            default=METRICS_HOST,
            show_default=True,
            help="The address of the metrics port; 0.0.0.0 to be scraped from other hosts or containers.",
        )(command)

    return add


def metrics_from_options(
    no_metrics: bool, metrics_host: str, metrics_port: int, metrics_token: str | None
) -> MetricsOptions | None:
    """The metrics options (None with ``--no-metrics``). Raises click.UsageError for a token
    shorter than :data:`MIN_TOKEN` characters."""
    if no_metrics:
        return None
    if metrics_token is not None and len(metrics_token) < MIN_TOKEN:
        raise click.UsageError(f"--metrics-token must be at least {MIN_TOKEN} characters")
    return MetricsOptions(metrics_host, metrics_port, metrics_token)


def require_metrics() -> None:
    """Raise ImportError naming the extra to install when aiohttp or prometheus_client is missing."""
    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def service_registry(clients: Iterable[AMB], *collectors: Any) -> CollectorRegistry:
    """A registry with the process's metrics (CPU, memory, file descriptors, GC), a
    :class:`~agent_os.amb.metrics.BusCollector` and a :class:`~agent_os.iatp.metrics.TrustCollector`
    over ``clients``, and ``collectors`` (objects with a prometheus_client ``collect()``)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    clients = list(clients)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BusCollector(clients))
    registry.register(TrustCollector(clients))
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsServer:
    """Serves ``GET /metrics`` (``registry``, behind ``token`` when given: a bearer token
    compared in constant time; a wrong one gets 401 and is counted in ``unauthorized``) and
    ``GET /healthz`` (200 ``ok`` while ``health()`` is true, else 503; never behind the token,
    for probes). Raises ImportError naming the extra without aiohttp or prometheus_client."""

    def __init__(
        self, registry: CollectorRegistry, health: Callable[[], bool], *, token: str | None = None
    ) -> None:
        require_metrics()
        from aiohttp import web

        self.registry = registry
        self.health = health
        self._token = token.encode() if token is not None else None
        self.unauthorized = 0
        self.app = web.Application()
        self.app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz)])
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    async def start(self, host: str = METRICS_HOST, port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the URL (``http://host:port``).
        Raises OSError when the address is taken."""
        from aiohttp import web

        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self._token is not None:
            given = request.headers.get("Authorization", "")
            token = given[7:].encode() if given.startswith("Bearer ") else b""
            if not hmac.compare_digest(token, self._token):
                self.unauthorized += 1
                return web.Response(status=401, text="unauthorized\n")
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if self.health():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="the broker connection is down\n")


@asynccontextmanager
async def metrics_endpoint(
    options: MetricsOptions | None, registry: CollectorRegistry | None, health: Callable[[], bool]
) -> AsyncIterator[str | None]:
    """Serve ``registry`` and ``health`` on ``options`` inside the block; yield the URL (None,
    serving nothing, when ``options`` or ``registry`` is None). Raises OSError when the port is taken."""
    if options is None or registry is None:
        yield None
        return
    server = MetricsServer(registry, health, token=options.token)
    url = await server.start(options.host, options.port)
    log.info("metrics on %s/metrics%s", url, " (bearer token)" if options.token else "")
    try:
        yield url
    finally:
        await server.stop()


def ready_line(line: str, metrics_url: str | None) -> str:
    """``line`` followed by `` metrics=<url>`` when the service serves metrics."""
    return f"{line} metrics={metrics_url}" if metrics_url else line
