"""A small client of a control-plane service's admin API (``docs/control-plane.md``, The admin
API), for ``agent-os top`` and the fleet demo's operator: agents, records, signals. The standard
library's HTTP client only, so it needs no extra; blocking (run it in a thread from async code).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Final, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

ADMIN_TOKEN_ENV: Final = "AGENTOS_ADMIN_TOKEN"
_MAX_REPLY: Final = 16 * 1024 * 1024


class AdminError(Exception):
    """An admin request that failed: the instance did not answer, or answered an error
    (``status`` then holds the HTTP status, else None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    """The admin API at ``url`` (``http://host:port``) with the bearer ``token``; each call
    waits at most ``timeout`` seconds. Raises ValueError for a URL that is not http(s)."""

    def __init__(self, url: str, token: str, *, timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"an admin API URL starts with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r})"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """``method path`` with ``body`` as JSON; returns the decoded JSON answer. Raises
        AdminError when the instance does not answer, answers an error status or no JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(_MAX_REPLY + 1)
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{self.url}{path}: {exc.code} {_reason(exc)}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"{self.url}: no answer ({reason})") from None
        if len(raw) > _MAX_REPLY:
            raise AdminError(f"{self.url}{path}: the answer is over {_MAX_REPLY} bytes")
        try:
            return json.loads(raw)
        except ValueError:
            raise AdminError(f"{self.url}{path}: the answer is not JSON") from None

    def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200 (the instance runs and reaches its broker)."""
        try:
            self.request("GET", "/healthz")
        except AdminError:
            return False
        return True

    def agents(self) -> list[dict[str, Any]]:
        """``GET /agents``: every agent the instance knows, with its state and counts."""
        return list(self.request("GET", "/agents"))

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        """``GET /agents/{id}``, or None when the instance does not know the agent."""
        try:
            return dict(self.request("GET", f"/agents/{urllib.parse.quote(agent_id, safe='')}"))
        except AdminError as exc:
            if exc.status == 404:
                return None
            raise

    def records(self, limit: int = 20) -> list[dict[str, Any]]:
        """``GET /records``: the newest ``limit`` flight-recorder records, newest first."""
        return list(self.request("GET", f"/records?limit={int(limit)}"))

    def signal(self, agent_id: str, signal: str) -> bool:
        """``POST /agents/{id}/signal``: send ``signal`` (a name such as SIGSTOP); True when it
        took effect there."""
        path = f"/agents/{urllib.parse.quote(agent_id, safe='')}/signal"
        return bool(self.request("POST", path, {"signal": signal}).get("ok"))


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read(64 * 1024))
    except (ValueError, OSError):
        return str(exc.reason)
    return str(body.get("error", exc.reason)) if isinstance(body, dict) else str(exc.reason)


def admin_options(command: F) -> F:
    """Add ``--admin URL`` (repeatable: one per control-plane instance; the callback gets
    ``admins``) and ``--admin-token`` (or :data:`ADMIN_TOKEN_ENV`) to a command."""
    command = click.option(
        "--admin-token", envvar=ADMIN_TOKEN_ENV, required=True, help=f"Or {ADMIN_TOKEN_ENV}."
    )(command)
    return click.option(
        "--admin",
        "admins",
        multiple=True,
        required=True,
        help="A control-plane instance's admin API, http://host:8787; once per instance of a queue group.",
    )(command)
