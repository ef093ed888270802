"""The admin API of a control-plane kernel: HTTP with bearer-token authentication.

Agents and their status, signals, policy reload, flight-recorder records and verification; the
routes are listed in ``docs/control-plane.md`` (The admin API). Needs
``pip install 'agent-os[service]'`` (aiohttp, prometheus-client).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from agent_os.control_plane.errors import (
    AgentNotFound,
    HeadError,
    PolicyError,
    PolicyLoadError,
    SignalError,
)
from agent_os.control_plane.kernel.metrics import KernelMetrics
from agent_os.control_plane.policy.loader import MAX_POLICY_BYTES, load_policy_text
from agent_os.control_plane.recorder.heads import HEAD_FORMAT, Head

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from agent_os.control_plane.kernel.space import KernelSpace
    from agent_os.control_plane.process import AgentProcess

INSTALL_HINT = "the admin API needs aiohttp and prometheus-client: pip install 'agent-os[service]'"
_MAX_HEAD = 4096  # an exported head is ~400 bytes
MAX_RECORDS: Final = 1000
"""The most records one ``GET /records`` returns (``limit`` is 1 to this)."""
MAX_FIELD: Final = 256
"""The longest agent id, query value or signal name the admin API takes."""
MAX_BODY: Final = MAX_POLICY_BYTES + 4096
_COUNT: Final = re.compile(r"[0-9]{1,6}")
log = logging.getLogger("agent_os.control_plane.admin")


class BadRequest(ValueError):
    """An admin request refused with 400 and this reason."""


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


class AdminAPI:
    """Serves the admin routes for ``kernel`` (docs/control-plane.md, The admin API).

    ``token``: the bearer token (at least 16 characters, else ValueError); ``registry``: the
    prometheus_client registry ``/metrics`` serves (the API adds the kernel's
    :class:`~agent_os.control_plane.kernel.metrics.KernelMetrics` and its own to it), e.g. a
    service's, so that the admin API and the metrics port show the same; without it
    ``/metrics`` shows the kernel's metrics, the API's and ``extra_metrics`` (name -> value or
    callable, as gauges); ``require_verified_sender``: keep that
    policy option on across reloads; ``health``: what ``/healthz`` reports (True: 200, False:
    503; e.g. the bus client's ``healthy``, so a lost broker connection shows). Raises
    ImportError without aiohttp/prometheus-client.

    Every request a route cannot take gets a 4xx with ``{"error": <reason>}`` and is counted
    (``bad_requests``): bodies beyond ``MAX_BODY`` bytes, a ``limit`` outside 1 to
    ``MAX_RECORDS``, values over ``MAX_FIELD`` characters, policies beyond the loader's bounds.
    A policy is parsed in a worker thread, never on the event loop.
    """

    def __init__(
        self,
        kernel: KernelSpace,
        token: str,
        *,
        extra_metrics: dict[str, Any] | None = None,
        require_verified_sender: bool = False,
        health: Callable[[], bool] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if len(token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        try:
            import prometheus_client  # noqa: F401
            from aiohttp import web
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        self.kernel = kernel
        self._token = token.encode()
        self.extra_metrics = extra_metrics or {}
        self.require_verified_sender = require_verified_sender
        self.health = health
        self.unauthorized = 0
        self.bad_requests = 0
        self.errors = 0
        self.registry = registry
        if registry is not None:
            registry.register(KernelMetrics(kernel))
            registry.register(AdminMetrics(self))

        @web.middleware
        async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
            return await self._auth(request, handler)

        self.app = web.Application(middlewares=[auth], client_max_size=MAX_BODY)
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/agents", self.agents),
                web.get("/agents/{id}", self.agent),
                web.post("/agents/{id}/signal", self.signal),
                web.post("/policy/reload", self.reload),
                web.get("/records", self.records),
                web.get("/verify", self.verify),
                web.post("/verify", self.verify),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); return the port."""
        from aiohttp import web

        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- routes --------------------------------------------------------------------------------

    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            token = given[7:].encode() if given.startswith("Bearer ") else b""
            if not hmac.compare_digest(token, self._token):
                self.unauthorized += 1
                return _json({"error": "unauthorized"}, 401)
        from aiohttp import web

        try:
            response: web.StreamResponse = await handler(request)
        except BadRequest as exc:
            self.bad_requests += 1
            return _json({"error": str(exc)}, 400)
        except web.HTTPException as exc:  # aiohttp's own refusals (413, 404, 405, ...): with a reason
            if exc.status < 400:
                raise
            self.bad_requests += 1
            reason = exc.reason
            if exc.status == 413:
                reason = f"request body too large (at most {MAX_BODY} bytes)"
            return _json({"error": reason}, exc.status)
        except Exception as exc:  # a bug: answered, counted and logged, never a bare 500 page
            self.errors += 1
            log.exception("admin request %s %s failed", request.method, request.path)
            return _json({"error": f"internal error: {type(exc).__name__}"}, 500)
        if response.status >= 400:
            self.bad_requests += 1
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        if self.health is not None and not self.health():
            return _json({"ok": False, "broker": "disconnected"}, 503)
        return _json({"ok": True})

    async def agents(self, request: web.Request) -> web.Response:
        return _json([_status(p) for p in self.kernel.processes])

    async def agent(self, request: web.Request) -> web.Response:
        try:
            return _json(_status(self.kernel.get_agent(_field(request.match_info["id"], "agent id"))))
        except AgentNotFound:
            return _json({"error": "unknown agent"}, 404)

    async def signal(self, request: web.Request) -> web.Response:
        agent = _field(request.match_info["id"], "agent id")
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"bad signal request: the body is not JSON ({type(exc).__name__})") from None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("signal"), str | int)
            or isinstance(body.get("signal"), bool)
        ):
            raise BadRequest('bad signal request: the body must be {"signal": "SIGSTOP"} (a name or number)')
        name = body["signal"]
        if isinstance(name, str):
            _field(name, "signal")
        elif not -(1 << 31) <= name < (1 << 31):
            raise BadRequest(f"bad signal request: no signal number {name}")
        try:
            ok = await self.kernel.send_signal(agent, name)
        except (ValueError, KeyError, TypeError, SignalError) as exc:
            raise BadRequest(f"bad signal request: {exc}") from None
        return _json({"ok": ok})

    async def reload(self, request: web.Request) -> web.Response:
        which = request.query.get("policy")
        target: int | str | None = which
        if which is not None:
            _field(which, "policy")
            target = int(which) if _COUNT.fullmatch(which) else which
        if (request.content_length or 0) > MAX_POLICY_BYTES:
            raise BadRequest(f"a policy is at most {MAX_POLICY_BYTES} bytes")
        try:
            text = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            return _json({"error": "the policy must be UTF-8 text", "line": None, "field": None}, 400)
        try:
            # Text only: never a path the service would open. In a worker thread: a large
            # policy takes seconds to parse, and the loop goes on serving meanwhile.
            new = await asyncio.to_thread(load_policy_text, text)
        except PolicyLoadError as exc:
            return _json({"error": str(exc), "line": exc.line, "field": exc.field}, 400)
        if self.require_verified_sender:
            new.require_verified_sender = True
        try:
            self.kernel.reload_policy(new, policy=target)
        except PolicyError as exc:
            return _json({"error": str(exc), "line": None, "field": "policy"}, 400)
        return _json(
            {
                "ok": True,
                "version": new.version,
                "require_verified_sender": new.require_verified_sender,
            }
        )

    async def records(self, request: web.Request) -> web.Response:
        q = request.query
        limit = 100
        if "limit" in q:
            given = q["limit"]
            if _COUNT.fullmatch(given) is None or not 1 <= int(given) <= MAX_RECORDS:
                raise BadRequest(f"limit must be an integer from 1 to {MAX_RECORDS}, got {given[:32]!r}")
            limit = int(given)
        filters = {k: _field(q[k], k) if k in q else None for k in ("event_type", "agent_id", "severity")}
        found = await self.kernel.recorder.query(
            event_type=filters["event_type"],
            agent_id=filters["agent_id"],
            severity=filters["severity"],
            limit=limit,
            order="desc",
        )
        return _json([r.as_dict() for r in found])

    async def verify(self, request: web.Request) -> web.Response:
        """The chain's verification; against a head given as ``?seq=&hash=`` or as an exported
        head (JSON) in a POST body. The recorder's own signing key is the trusted key."""
        try:
            head = await _requested_head(request)
        except HeadError as exc:
            return _json({"error": f"bad head: {exc}"}, 400)
        return _json(asdict(await self.kernel.recorder.verify(head)))

    async def metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            registry.register(KernelMetrics(self.kernel))
            registry.register(AdminMetrics(self))
            for name, value in self.extra_metrics.items():
                Gauge(name, name, registry=registry).set(value() if callable(value) else value)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class AdminMetrics:
    """A prometheus_client collector over an admin API's own counters (``docs/observability.md``):
    admin requests refused for their token, answered 4xx, failed."""

    def __init__(self, admin: AdminAPI) -> None:
        self.admin = admin

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        admin = self.admin
        for name, text, value in (
            ("agentos_admin_unauthorized", "Admin requests refused for their token", admin.unauthorized),
            ("agentos_admin_bad_requests", "Admin requests answered 4xx", admin.bad_requests),
            ("agentos_admin_errors", "Admin requests that failed (500)", admin.errors),
        ):
            yield CounterMetricFamily(name, text, value=value)


async def _requested_head(request: web.Request) -> Head | None:
    """The head a verify request names, or None. Raises HeadError for a malformed one."""
    if request.method == "POST":
        if request.content_length is not None and request.content_length > _MAX_HEAD:
            raise HeadError(f"a head is at most {_MAX_HEAD} bytes")
        body = await request.content.read(_MAX_HEAD + 1)
        return Head.from_json(body)
    seq, digest = request.query.get("seq"), request.query.get("hash")
    if seq is None and digest is None:
        return None
    if seq is None or digest is None or not (seq.isascii() and seq.isdigit()) or len(seq) > 19:
        raise HeadError("give both seq (a non-negative integer) and hash")
    return Head.from_dict({"format": HEAD_FORMAT, "seq": int(seq), "hash": digest})


def _field(value: str, what: str) -> str:
    """``value`` of a request, when at most MAX_FIELD characters with no control character.
    Raises BadRequest otherwise."""
    if len(value) > MAX_FIELD or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadRequest(f"{what} must be at most {MAX_FIELD} printable characters")
    return value


def _status(process: AgentProcess) -> dict[str, Any]:
    """An agent as the admin API shows it: its status and ``held``, the messages in its hold
    queue."""
    data = asdict(process.status())
    data["permissions"] = sorted(data["permissions"]) if data["permissions"] is not None else None
    data["held"] = process.held
    return data
