"""net.http against a local aiohttp server on 127.0.0.1: the allow-list and every way around it
(userinfo, IP forms, IDNA and case tricks, other schemes and ports), SSRF to private
addresses, redirects off the allow-list, huge and slow responses, hostile headers, and the
host as a policy condition."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import VIOLATION_EVENTS, KernelSpace, Pattern, Policy
from agent_os.control_plane.actions import ActionRefused, Http
from agent_os.control_plane.errors import KernelError


@dataclass
class Server:
    base: str
    port: int
    release: asyncio.Event


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    release = asyncio.Event()

    async def odd(request: web.Request) -> web.Response:
        return web.Response(body=b"caf\xc3\xa9", headers={"Content-Type": "text/plain; charset=x-no-such"})

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello", headers={"X-Seen-Host": request.host})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "body": body.decode(),
                "type": request.content_type,
                "auth": request.headers.get("Authorization"),
            }
        )

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 65536)
        return response

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.add_routes([
        web.get("/hello", hello), web.get("/odd", odd), web.route("*", "/echo", echo), web.get("/big", big),
        web.get("/slow", slow), web.route("*", "/redirect", redirect),
    ])  # fmt: skip
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield Server(f"http://127.0.0.1:{port}", port, release)
    finally:
        release.set()
        await runner.cleanup()


async def _submit(
    kernel: KernelSpace, *requests: ActionRequest, permissions: list[str] | None = None
) -> list[ActionResult]:
    @kernel.register(name="fetcher", permissions=permissions or ["network"])
    async def agent() -> list[ActionResult]:
        return [await kernel.submit(r) for r in requests]

    results: list[ActionResult] = await kernel.execute(agent)
    return results


def _local(**options: Any) -> Http:
    return Http(["127.0.0.1"], ports=None, allow_private=True, **options)


async def test_get_and_post_to_an_allowed_host(server: Server) -> None:
    async with KernelSpace("permissive") as kernel:
        _local().register(kernel.actions)
        get, post, raw, odd = await _submit(
            kernel,
            ActionRequest("net.http", f"{server.base}/hello"),
            ActionRequest("net.http", f"{server.base}/echo", {"method": "post", "json": {"a": 1}}),
            ActionRequest("net.http", f"{server.base}/hello", {"binary": True}),
            ActionRequest("net.http", f"{server.base}/odd"),
        )
        assert get.ok, get.error
        assert get.output["status"] == 200
        assert get.output["body"] == "hello"
        assert get.output["headers"]["X-Seen-Host"] == f"127.0.0.1:{server.port}"
        assert (
            post.output["body"]
            == '{"method": "POST", "body": "{\\"a\\": 1}", "type": "application/json", "auth": null}'
        )
        assert raw.output["body"] == b"hello"
        assert odd.output["body"] == "café"  # an unknown charset: read as UTF-8
        decision = (await kernel.recorder.query(event_type="policy_decision"))[0]
        assert decision.data["operation"] == "network"
        assert decision.data["resource"] == f"{server.base}/hello"


async def test_an_agent_without_network_is_denied(server: Server) -> None:
    async with KernelSpace("permissive") as kernel:
        _local().register(kernel.actions)
        [result] = await _submit(
            kernel, ActionRequest("net.http", f"{server.base}/hello"), permissions=["read"]
        )
        assert not result.allowed
        assert result.error == "agent fetcher lacks permission for network"


def _bypasses(port: int) -> list[str]:
    return [
        f"http://localhost:{port}/hello",
        f"http://127.0.0.1.evil.test:{port}/",
        f"http://evil.test:{port}#@127.0.0.1/",
        f"http://127.0.0.1:{port}@evil.test/",
        f"http://user:pw@127.0.0.1:{port}/hello",
        f"http://evil.test\\@127.0.0.1:{port}/",
        f"http://2130706433:{port}/",
        f"http://0x7f.1:{port}/",
        f"http://127.1:{port}/",
        f"http://0177.0.0.1:{port}/",
        f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
        f"http://%31%32%37.0.0.1:{port}/",
        f"ftp://127.0.0.1:{port}/",
        "file:///etc/passwd",
        f"gopher://127.0.0.1:{port}/",
        f"http:///127.0.0.1:{port}/",
        f"http://127.0.0.1:{port}/a b",
        f"http://127.0.0.1:{port}/\r\nX: y",
        "http://127.0.0.1:99999/",
        " http://127.0.0.1/",
        "http://" + "a" * 9000,
    ]


async def test_every_way_around_the_allow_list_is_denied_before_the_request(server: Server) -> None:
    async with KernelSpace("permissive") as kernel:
        _local().register(kernel.actions)
        targets = _bypasses(server.port)
        results = await _submit(kernel, *(ActionRequest("net.http", t) for t in targets))
        for target, result in zip(targets, results, strict=True):
            assert not result.allowed, target
            assert result.error, target
        assert len(await kernel.recorder.query(event_type=VIOLATION_EVENTS)) == len(targets)
        assert await kernel.recorder.query(event_type="action_outcome") == []


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTP://EXAMPLE.COM/a", "http://example.com/a"),
        ("http://example.com./a?b=c#frag", "http://example.com/a?b=c"),
        ("https://example.com:443", "https://example.com/"),
        ("http://ＥＸＡＭＰＬＥ.com/", "http://example.com/"),
        ("http://Bücher.example.org/ä", "http://xn--bcher-kva.example.org/%C3%A4"),
        ("http://api.example.org/x%2Fy", "http://api.example.org/x%2Fy"),
    ],
)
def test_urls_are_normalized_before_the_allow_list(url: str, normal: str) -> None:
    http = Http(["example.com", "*.example.org"])
    assert http.target(url).url == normal


@pytest.mark.parametrize(
    "url",
    [
        "http://example.org/",  # '*.example.org' is the names below it
        "http://evilexample.com/",
        "http://example.com.evil.test/",
        "http://example.com:8080/",  # ports: 80 and 443 by default
        "http://93.184.215.14/",  # IP literals: refused unless allow_private
        "http://exa\u00admple.com.evil.test/",
        "http://example.com%2eevil.test/",
    ],
)
def test_urls_off_the_allow_list_are_refused(url: str) -> None:
    with pytest.raises(ActionRefused):
        Http(["example.com", "*.example.org"]).target(url)


def test_bad_configuration_is_refused() -> None:
    for allow in ("example.com", ["*"], ["*.*.example.com"], ["exa mple.com"], ["http://x.com"]):
        with pytest.raises(KernelError):
            Http(allow)
    with pytest.raises(KernelError):
        Http([], timeout=0)
    assert not Http([]).allows_host("example.com")  # empty: nothing allowed


async def test_names_resolving_to_private_addresses_are_refused_by_default(server: Server) -> None:
    async with KernelSpace("permissive") as kernel:
        Http(["localhost"], ports=None).register(kernel.actions)
        [result] = await _submit(kernel, ActionRequest("net.http", f"http://localhost:{server.port}/hello"))
        assert result.allowed  # the decision allowed it; the connection was refused
        assert result.error is not None
        assert "not a public address" in result.error
        [outcome] = await kernel.recorder.query(event_type="action_outcome")
        assert outcome.data["status"] == "error"
    with pytest.raises(ActionRefused, match="allow_private"):
        Http(["127.0.0.1"], ports=None).target(f"http://127.0.0.1:{server.port}/")


async def test_redirects_are_not_followed_by_default_and_checked_when_they_are(server: Server) -> None:
    async with KernelSpace("permissive") as kernel:
        _local().register(kernel.actions)
        [kept] = await _submit(kernel, ActionRequest("net.http", f"{server.base}/redirect?to=/hello"))
        assert kept.output["status"] == 302
        assert kept.output["headers"]["Location"] == "/hello"
    async with KernelSpace("permissive") as kernel:
        _local(max_redirects=3).register(kernel.actions)
        followed, off_list, credentials = await _submit(
            kernel,
            ActionRequest("net.http", f"{server.base}/redirect?to=/hello"),
            ActionRequest("net.http", f"{server.base}/redirect?to=http://localhost:{server.port}/hello"),
            ActionRequest(
                "net.http",
                f"{server.base}/redirect?to=/echo",
                {"method": "POST", "body": "x", "headers": {"Authorization": "Bearer t"}},
            ),
        )
        assert followed.output["body"] == "hello"
        assert followed.output["url"] == f"{server.base}/hello"
        assert off_list.allowed
        assert off_list.error is not None
        assert "redirect refused" in off_list.error
        assert '"method": "GET"' in credentials.output["body"]  # 302 after POST: GET, no body
        assert '"auth": "Bearer t"' in credentials.output["body"]  # same host: kept


async def test_a_huge_response_is_cut_and_a_slow_one_times_out(server: Server) -> None:
    async with KernelSpace("permissive") as kernel:
        _local(max_response=100_000, timeout=0.5).register(kernel.actions)
        big, slow = await _submit(
            kernel,
            ActionRequest("net.http", f"{server.base}/big"),
            ActionRequest("net.http", f"{server.base}/slow"),
        )
        assert big.allowed
        assert big.error is not None
        assert "max_response" in big.error
        assert slow.allowed
        assert slow.error is not None
        assert "within 0.5s" in slow.error
        outcomes = await kernel.recorder.query(event_type="action_outcome")
        assert [o.data["status"] for o in outcomes] == ["error", "error"]


@pytest.mark.parametrize(
    "params",
    [
        {"method": "TRACE"},
        {"method": "CONNECT"},
        {"headers": {"Host": "evil.test"}},
        {"headers": {"X-A": "a\r\nInjected: b"}},
        {"headers": {"Bad Name": "x"}},
        {"headers": {"Transfer-Encoding": "chunked"}},
        {"body": "x", "json": {}},
        {"body": 5},
        {"json": float("nan")},
        {"body": "x" * 2000},
    ],
)
async def test_hostile_params_are_refused(server: Server, params: dict[str, Any]) -> None:
    async with KernelSpace("permissive") as kernel:
        _local(max_body=1000).register(kernel.actions)
        [result] = await _submit(kernel, ActionRequest("net.http", f"{server.base}/echo", params))
        assert not result.allowed
        assert await kernel.recorder.query(event_type="action_outcome") == []


async def test_the_host_is_a_policy_condition(server: Server) -> None:
    policy = Policy("no-local", default_action="allow")
    policy.add_rule("deny", Pattern("network", "*", conditions={"host": "127.0.0.1"}), "no local calls")
    async with KernelSpace(policy) as kernel:
        _local().register(kernel.actions)
        [result] = await _submit(kernel, ActionRequest("net.http", f"{server.base}/hello"))
        assert not result.allowed
        assert result.error == "no local calls"
