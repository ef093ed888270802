"""The ``net.http`` provider: HTTP requests to an allow-list of hosts (:class:`Http`).

The URL is normalized before anything is judged (scheme, IDNA and case of the host, a trailing
dot, the port), so the policy and the allow-list see the host the request goes to; what is
refused (userinfo, IP-literal hosts, percent-encoded hosts, other schemes and ports) is refused
before the decision. Addresses are checked again where the connection is made, on every
redirect hop, so a name that resolves to a private address is not reached unless allowed.
Guarantees and limits: ``docs/control-plane.md`` (Actions). Needs aiohttp (``service`` extra),
imported on the first request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urljoin, urlsplit

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.errors import KernelError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.registry import ActionRegistry
    from agent_os.control_plane.actions.request import ActionRequest

INSTALL_HINT: Final = "the net.http action needs aiohttp: pip install 'agent-os[service]'"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_RESPONSE: Final = 10 * 2**20
MAX_BODY: Final = 10 * 2**20
MAX_URL: Final = 8_192
MAX_HEADERS: Final = 100
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_LABEL: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL: Final = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_UNSAFE: Final = re.compile(r"[\x00-\x20\x7f\\]")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE: Final = _PATH_SAFE + "?"
# Headers the provider sets itself, or that would change where or how the request goes.
_FORBIDDEN_HEADERS: Final = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "proxy-authorization", "proxy-connection", "keep-alive",
})  # fmt: skip
_CREDENTIALS: Final = frozenset({"authorization", "cookie"})


class HttpError(Exception):
    """A request failed or was cut: a timeout, a response over the limit, a refused redirect
    or address; the message names the URL."""


@dataclass(frozen=True, slots=True)
class Target:
    """A URL as judged and fetched: ``url`` (normalized), ``scheme``, ``host`` (lower-case
    ASCII, IDNA-encoded, no trailing dot; an IPv6 address without brackets) and ``port``."""

    url: str
    scheme: str
    host: str
    port: int


class Http:
    """The ``net.http`` action (permission ``network``): requests to the hosts of ``allow``.

    ``allow``: host names (``api.example.com``) and wildcards (``*.example.com``: any name
    below, not the name itself); empty allows nothing. ``ports``: the ports a URL may name
    (None: any). ``methods``: the methods allowed (None: :data:`METHODS`). ``max_response``: the most
    body bytes read (past it the request fails); ``max_body``: the largest request body;
    ``timeout``: seconds for the whole request, redirects included; ``max_redirects``: how
    many redirects to follow (0: none, the 3xx response is the output), each target checked
    like the first URL. ``allow_private``: allow IP-literal hosts (they must still be on
    ``allow``) and names resolving to loopback, private, link-local or other non-public
    addresses (off by default: SSRF). Raises KernelError for a bad entry or limit."""

    ACTION: Final = "net.http"
    PERMISSION: Final = "network"

    def __init__(
        self,
        allow: Iterable[str],
        *,
        ports: Collection[int] | None = (80, 443),
        methods: Collection[str] | None = None,
        max_response: int = MAX_RESPONSE,
        max_body: int = MAX_BODY,
        timeout: float = 30.0,
        max_redirects: int = 0,
        allow_private: bool = False,
    ) -> None:
        if isinstance(allow, str):
            raise KernelError("allow is a list of host names, not one string")
        exact: set[str] = set()
        suffixes: set[str] = set()
        for entry in allow:
            wild = isinstance(entry, str) and entry.startswith("*.")
            host = _host(entry[2:] if wild else entry, allow_ip=not wild) if isinstance(entry, str) else None
            if host is None:
                raise KernelError(f"allow: {entry!r} is not a host name or '*.' and a host name")
            (suffixes if wild else exact).add("." + host if wild else host)
        whole(max_response, "max_response", 0, error=KernelError)
        whole(max_body, "max_body", 0, error=KernelError)
        whole(max_redirects, "max_redirects", 0, error=KernelError)
        seconds(timeout, "timeout", error=KernelError)
        if ports is not None and any(isinstance(p, bool) or not isinstance(p, int) for p in ports):
            raise KernelError(f"ports must be integers, got {ports!r}")
        self.allow = frozenset(exact)
        self.allow_suffixes = frozenset(suffixes)
        self.ports = None if ports is None else frozenset(ports)
        self.methods = METHODS if methods is None else frozenset(m.upper() for m in methods)
        self.max_response = max_response
        self.max_body = max_body
        self.timeout = float(timeout)
        self.max_redirects = max_redirects
        self.allow_private = allow_private

    def __repr__(self) -> str:
        hosts = sorted(self.allow) + sorted("*" + s for s in self.allow_suffixes)
        return f"Http({hosts!r})"

    def register(self, registry: ActionRegistry, *, replace: bool = False) -> None:
        """Register ``net.http`` (permission ``network``) in ``registry``."""
        registry.register(self.ACTION, self, self.PERMISSION, replace=replace)

    # -- the provider ---------------------------------------------------------------------------

    def target(self, url: object) -> Target:
        """``url`` normalized and checked against the scheme, port and host rules and the
        allow-list. Raises ActionRefused saying why it is refused."""
        target = parse_url(url)
        if self.ports is not None and target.port not in self.ports:
            raise ActionRefused(f"port {target.port} is not allowed (ports: {sorted(self.ports)})")
        literal = _ip(target.host)
        if literal is not None and not self.allow_private:
            raise ActionRefused(f"an IP address as host ({target.host}) is refused (allow_private)")
        if not self.allows_host(target.host):
            raise ActionRefused(f"host {target.host!r} is not on the allow-list")
        return target

    def allows_host(self, host: str) -> bool:
        """Whether the (normalized) ``host`` is on the allow-list."""
        if host in self.allow:
            return True
        return any(host.endswith(s) for s in self.allow_suffixes)

    def resource(self, request: ActionRequest) -> str:
        """The normalized URL; refuses a URL the rules refuse, a method not allowed, and
        headers or a body that are malformed or over ``max_body``."""
        target = self.target(request.target)
        _method(request, self.methods)
        _headers(request)
        _body(request, self.max_body)
        return target.url

    def context(self, request: ActionRequest) -> dict[str, Any]:
        """``host``, ``port``, ``scheme``, ``url`` and ``method`` for the policy's conditions."""
        target = self.target(request.target)
        method = _method(request, self.methods)
        return {
            "host": target.host,
            "port": target.port,
            "scheme": target.scheme,
            "url": target.url,
            "method": method,
        }

    async def run(self, request: ActionRequest) -> dict[str, Any]:
        """Do the request. Output: ``status``, ``url`` (the last one, after redirects),
        ``headers`` (the first :data:`MAX_HEADERS`), ``body`` (text decoded by the response's
        charset, UTF-8 by default; bytes with ``params['binary']``). Raises HttpError."""
        aiohttp = _aiohttp()
        target = self.target(request.target)
        method = _method(request, self.methods)
        headers = _headers(request)
        body, content_type = _body(request, self.max_body)
        if content_type is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = content_type
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = aiohttp.TCPConnector(
            resolver=_CheckedResolver(aiohttp, self.allow_private), force_close=True
        )
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, trust_env=False, auto_decompress=True
            ) as session:
                return await asyncio.wait_for(
                    self._fetch(aiohttp, session, target, method, headers, body, request),
                    self.timeout,
                )
        except TimeoutError:
            raise HttpError(f"{target.url}: no complete response within {self.timeout}s") from None
        except aiohttp.ClientError as exc:
            cause = getattr(exc, "os_error", None)
            detail = str(cause) if isinstance(cause, _AddressRefused) else f"{type(exc).__name__}: {exc}"
            raise HttpError(f"{target.url}: {detail}") from None

    async def _fetch(
        self,
        aiohttp: Any,
        session: Any,
        target: Target,
        method: str,
        headers: dict[str, str],
        body: bytes | None,
        request: ActionRequest,
    ) -> dict[str, Any]:
        from yarl import URL

        hops = 0
        while True:
            async with session.request(
                method, URL(target.url, encoded=True), headers=headers, data=body, allow_redirects=False
            ) as response:
                location = response.headers.get("Location")
                if response.status in _REDIRECTS and location and hops < self.max_redirects:
                    hops += 1
                    try:
                        following = self.target(urljoin(target.url, location))
                    except ActionRefused as exc:
                        raise HttpError(f"{target.url}: redirect refused: {exc}") from None
                    if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                        method, body = ("HEAD" if method == "HEAD" else "GET"), None
                        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                    if following.host != target.host:
                        headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIALS}
                    target = following
                    continue
                data = await self._read(response, target)
                out_headers = dict(list(response.headers.items())[:MAX_HEADERS])
                if request.params.get("binary", False) is True:
                    content: str | bytes = data
                else:
                    content = _decode(data, response.charset)
                return {"status": response.status, "url": target.url, "headers": out_headers, "body": content}

    async def _read(self, response: Any, target: Target) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_response:
                raise HttpError(f"{target.url}: response body over {self.max_response} bytes (max_response)")
            chunks.append(chunk)
        return b"".join(chunks)


def parse_url(url: object) -> Target:
    """``url`` normalized: scheme http or https, no userinfo, a host name (IDNA-encoded,
    lower-case, without a trailing dot) or IP address, the port (default by scheme), the path
    and query percent-encoded, no fragment. Raises ActionRefused for anything else."""
    if not isinstance(url, str):
        raise ActionRefused(f"a URL must be a string, got {type(url).__name__}")
    if len(url) > MAX_URL:
        raise ActionRefused(f"URL longer than {MAX_URL} characters")
    if _UNSAFE.search(url):
        raise ActionRefused("URL with whitespace, a control character or a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ActionRefused(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ActionRefused(f"scheme {parts.scheme!r} is not allowed (http, https)")
    if "@" in parts.netloc:
        raise ActionRefused("a URL with userinfo (user@host) is refused")
    raw = parts.hostname
    host = _host(raw, allow_ip=True) if raw else None
    if host is None:
        raise ActionRefused(f"not a valid host: {raw!r}")
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ActionRefused(f"port {port} out of range")
    shown = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        shown = f"{shown}:{port}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_QUERY_SAFE)
    normal = f"{scheme}://{shown}{path}" + (f"?{query}" if query else "")
    return Target(normal, scheme, host, port)


def _host(raw: str, *, allow_ip: bool) -> str | None:
    """The normalized host, or None when it is not a host name (or, with ``allow_ip``, an
    IP address in its canonical form)."""
    if not raw or "%" in raw:
        return None
    if allow_ip:
        try:
            return str(ipaddress.ip_address(raw.strip("[]")))
        except ValueError:
            pass
    name = raw[:-1] if raw.endswith(".") else raw
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None  # 127.1, 0x7f.1, 2130706433: IPv4 in a form resolvers accept
    return name


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def public(address: str) -> bool:
    """Whether ``address`` is a public (global unicast) IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _method(request: ActionRequest, allowed: frozenset[str]) -> str:
    method = request.params.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in allowed:
        raise ActionRefused(f"method {method!r} is not allowed ({', '.join(sorted(allowed))})")
    return method.upper()


def _headers(request: ActionRequest) -> dict[str, str]:
    given = request.params.get("headers") or {}
    if not isinstance(given, Mapping):
        raise ActionRefused("params['headers'] must be a mapping of str to str")
    if len(given) > MAX_HEADERS:
        raise ActionRefused(f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for name, value in given.items():
        if not isinstance(name, str) or not isinstance(value, str) or _TOKEN.fullmatch(name) is None:
            raise ActionRefused(f"malformed header {name!r}")
        if any(ch in value for ch in "\r\n\0"):
            raise ActionRefused(f"header {name!r}: a line break or NUL in the value")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise ActionRefused(f"header {name!r} is set by the provider, not by a request")
        headers[name] = value
    return headers


def _body(request: ActionRequest, limit: int) -> tuple[bytes | None, str | None]:
    params = request.params
    if "body" in params and "json" in params:
        raise ActionRefused("pass params['body'] or params['json'], not both")
    content_type: str | None = None
    if "json" in params:
        try:
            data = json.dumps(params["json"], allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ActionRefused(f"params['json'] is not JSON: {exc}") from None
        content_type = "application/json"
    elif params.get("body") is None:
        return None, None
    elif isinstance(params["body"], str):
        data = params["body"].encode("utf-8")
    elif isinstance(params["body"], bytes | bytearray | memoryview):
        data = bytes(params["body"])
    else:
        raise ActionRefused("params['body'] must be str or bytes")
    if len(data) > limit:
        raise ActionRefused(f"request body of {len(data)} bytes is over the limit of {limit} (max_body)")
    return data, content_type


def _decode(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(INSTALL_HINT) from exc
    return aiohttp


class _AddressRefused(OSError):
    """A name resolved to an address the provider does not connect to."""


class _CheckedResolver:
    """aiohttp's default resolver, refusing names that resolve to a non-public address
    (unless ``allow_private``): checked where the connection is made, so a name cannot
    resolve to one address for a check and another for the connection."""

    def __init__(self, aiohttp: Any, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for entry in found:
                if not public(str(entry["host"])):
                    raise _AddressRefused(
                        f"{host} resolves to {entry['host']}, not a public address (allow_private)"
                    )
        return found

    async def close(self) -> None:
        await self._inner.close()
