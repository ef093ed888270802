"""The admin API under hostile requests: every input it cannot take gets a 4xx with a reason,
is counted, and leaves the API answering; a large policy is parsed off the event loop.

(The ``/verify`` route is another test's.)
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_os.control_plane import FlightRecorder, KernelSpace, Policy
from agent_os.control_plane.admin import MAX_RECORDS, AdminAPI
from agent_os.control_plane.policy.loader import MAX_POLICY_BYTES, MAX_RULES

TOKEN = "hostile-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[AdminAPI, str]]:
    kernel = KernelSpace(
        policy=Policy("before", version="1"), flight_recorder=FlightRecorder("sqlite", str(tmp_path / "r.db"))
    )
    await kernel.recorder.open()
    admin = AdminAPI(kernel, TOKEN)
    port = await admin.start()
    try:
        yield admin, f"http://127.0.0.1:{port}"
    finally:
        await admin.stop()
        await kernel.close()


async def call(base: str, method: str, path: str, body: str | bytes | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        # A large body as a stream: the client warns about (and blocks on) large raw bytes.
        http.request(
            method,
            base + path,
            headers=AUTH,
            data=io.BytesIO(body.encode()) if isinstance(body, str) else body,
        ) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def rules(count: int) -> str:
    return "name: big\nrules:\n" + "".join(
        f"  - {{action: allow, operation: publish, resource: 'tasks.t{i}.*'}}\n" for i in range(count)
    )


NESTED_YAML = "name: p\nrules: " + "[" * 20_000 + "]" * 20_000
NESTED_MAPS = "name: p\nrules:\n  - {action: allow, conditions: " + "{a: " * 5_000 + "1" + "}" * 5_001 + "\n"
LAUGHS = "name: p\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
HOSTILE: list[tuple[str, str, str | bytes | None, str]] = [
    ("POST", "/policy/reload", NESTED_YAML, "nested deeper"),
    ("POST", "/policy/reload", NESTED_MAPS, "nested deeper"),
    ("POST", "/policy/reload", "name: p\nversion: " + "1" * 5_000 + "\n", "integer"),
    (
        "POST",
        "/policy/reload",
        "name: p\nrules:\n  - {action: allow, rate_limit: " + "9" * 30 + "}\n",
        "integer",
    ),
    ("POST", "/policy/reload", "name: p\nversion: .inf\n", "finite"),
    ("POST", "/policy/reload", LAUGHS, "aliases"),
    ("POST", "/policy/reload", rules(MAX_RULES + 1), f"at most {MAX_RULES}"),
    ("POST", "/policy/reload", "name: p\nreason: '" + "x" * (MAX_POLICY_BYTES + 10) + "'\n", "at most"),
    ("POST", "/policy/reload?policy=" + "9" * 5_000, "name: p\n", "policy must be"),
    ("POST", "/policy/reload?policy=\u00b2", "name: p\n", "policy"),
    ("GET", "/records?limit=" + "1" + "0" * 20, None, "limit"),
    ("GET", "/records?limit=-1", None, "limit"),
    ("GET", "/records?limit=0", None, "limit"),
    ("GET", f"/records?limit={MAX_RECORDS + 1}", None, "limit"),
    ("GET", "/records?limit=1e3", None, "limit"),
    ("GET", "/records?limit=%EF%BC%95", None, "limit"),  # a fullwidth 5: int() takes it
    ("GET", "/records?limit=%205", None, "limit"),
    ("GET", "/records?event_type=" + "x" * 4_000, None, "event_type"),  # (8 KB lines: the server's own 400)
    ("GET", "/records?agent_id=a%00b", None, "agent_id"),
    ("POST", "/agents/worker/signal", "[" * 100_000, "not JSON"),
    ("POST", "/agents/worker/signal", "[]", "must be"),
    ("POST", "/agents/worker/signal", '{"signal": true}', "must be"),
    ("POST", "/agents/worker/signal", '{"signal": 1' + "0" * 30 + "}", "signal"),
    ("POST", "/agents/worker/signal", '{"signal": "' + "S" * 10_000 + '"}', "signal"),
    ("POST", "/agents/" + "w" * 300 + "/signal", '{"signal": "SIGSTOP"}', "agent id"),
    ("GET", "/agents/" + "w" * 300, None, "agent id"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "reason"), HOSTILE, ids=[f"{m} {p[:40]}" for m, p, _, _ in HOSTILE]
)
async def test_every_hostile_request_gets_a_4xx_with_a_reason(
    api: tuple[AdminAPI, str], method: str, path: str, body: str | None, reason: str
) -> None:
    admin, base = api
    status, answer = await call(base, method, path, body)
    assert 400 <= status < 500, (status, answer)
    assert isinstance(answer, dict), answer
    assert reason.lower() in str(answer["error"]).lower(), answer
    assert admin.bad_requests == 1
    assert admin.errors == 0
    assert isinstance(admin.kernel.policy, Policy)
    assert admin.kernel.policy.version == "1"  # nothing half-applied
    # The API still answers.
    assert (await call(base, "GET", "/healthz"))[0] == 200
    status, records = await call(base, "GET", f"/records?limit={MAX_RECORDS}")
    assert status == 200
    assert isinstance(records, list)
    _, metrics = await call(base, "GET", "/metrics")
    assert "agentos_admin_bad_requests_total 1.0" in metrics


async def test_a_large_policy_is_parsed_off_the_event_loop(api: tuple[AdminAPI, str]) -> None:
    """A 4,000-rule policy takes a second or more to parse here; meanwhile the loop goes on
    (a ticker never waits long) and the API answers other requests."""
    admin, base = api
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    # The objects earlier tests left behind are frozen out of the collector for the measure: a
    # full collection of a whole test session's heap, triggered by the parse's allocations,
    # held the GIL for half a second on a slow machine, a pause that is not the loader's.
    gc.freeze()
    tick = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        status, answer = await call(base, "POST", "/policy/reload", rules(4_000))
        took = time.monotonic() - started
    finally:
        done.set()
        await tick
        gc.unfreeze()
    assert (status, answer["ok"]) == (200, True), answer
    assert isinstance(admin.kernel.policy, Policy)
    assert len(admin.kernel.policy.rules) == 4_000
    assert max(gaps) < min(0.5, took / 2), (max(gaps), took)
