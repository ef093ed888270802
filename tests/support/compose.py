"""Runs the Agent OS services of a compose file natively, where no Docker daemon is: the same
commands, environments, health checks and start order that ``docker compose up`` would use,
read from the file itself (never a second list of commands).

A service is an Agent OS one when it is built here (``build:``) or runs an ``agent-os`` image;
the others (NATS, Redis, PostgreSQL, Jaeger, ...) are replaced by the local servers given as
``servers``: a compose host name -> ``host:port`` (its ``name:port`` references are rewritten
to that) or a full URL (a URL naming the host is replaced by it whole: a PostgreSQL DSN with the
local user and database). What is rewritten in each Agent OS service's command, environment and
health check, the way the containers would have seen it:

- ``${VAR:-default}``, ``${VAR-default}``, ``${VAR}``, ``$$``: from ``env`` only (the shell of
  ``docker compose``), never from this process's environment;
- ``other-service:PORT`` -> ``127.0.0.1:<a free port>`` (each service's ``expose``/``ports``
  get free local ports), and in a service's own command its ``--*port`` values and
  ``127.0.0.1:PORT`` in its health check; ``--*host=0.0.0.0`` -> 127.0.0.1;
- volume targets -> a directory per named volume under ``workdir``, bind mounts -> the files
  beside the compose file;
- ``agent-os`` and ``python`` -> this virtualenv's.

``python -m tests.support.compose FILE SERVICE`` runs SERVICE (a demo program) with its
dependencies against the local servers and prints its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.nats_private import free_port

BIN = Path(sys.executable).parent
STRIPPED_ENV = ("AGENTOS_", "OTEL_")
"""This process's variables a native service does not inherit (a container would not have them)."""
HEALTH_DEADLINE = 90.0
_VAR = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_ADDRESS = re.compile(
    r"(?:(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<userinfo>[^@/\s'\"]*@)?)?"
    r"(?P<host>[A-Za-z0-9_][A-Za-z0-9_.-]*):(?P<port>[0-9]{1,5})(?P<path>/[^\s'\"]*)?"
)
_PORT_OPTION = re.compile(r"^(--[a-z-]*port)(=)([0-9]+)$")
_PORT_NAME = re.compile(r"^--[a-z-]*port$")
_HOST_OPTION = re.compile(r"^(--[a-z-]*host)=0\.0\.0\.0$")


class ComposeError(Exception):
    """The compose file asks for something the native run cannot do, or a service failed."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` (a parsed compose tree) with every ``${...}`` of its strings replaced, as
    Compose does. Raises ComposeError for ``${VAR}`` with VAR unset and no default."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            if match[0] == "$$":
                return "$"
            name = match["name"] or match["bare"]
            got = env.get(name)
            if match["op"] == ":-":
                return got if got else match["default"]
            if match["op"] == "-":
                return got if got is not None else match["default"]
            if got is None:
                raise ComposeError(f"${{{name}}} is not set and has no default")
            return got

        return _VAR.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file at ``path``, parsed (anchors and ``<<`` merges resolved) and
    interpolated with ``env``."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ComposeError(f"{path} has no services")
    return dict(interpolate(data, env or {}))


def is_agent_os(service: Mapping[str, Any]) -> bool:
    """Whether a compose service runs the project's image (built here, or an agent-os image)."""
    return "build" in service or str(service.get("image", "")).startswith("agent-os")


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = {int(p) for p in service.get("expose") or []}
    for spec in service.get("ports") or []:
        ports.add(int(str(spec).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


@dataclass
class Completed:
    """A one-shot service that ran to its end: exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class _Running:
    proc: asyncio.subprocess.Process
    out: Path
    err: Path


@dataclass
class NativeStack:
    """The Agent OS services of ``compose_file`` as local processes (module docstring).
    ``servers``: the local server for each other service they reach; ``env``: the variables
    the compose file is interpolated with; ``workdir``: volumes, working directories, logs."""

    compose_file: Path
    servers: Mapping[str, str]
    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    running: dict[str, _Running] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    stopped: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.compose = load(self.compose_file, self.env)
        self.services: dict[str, dict[str, Any]] = self.compose["services"]
        for name, service in self.services.items():
            if is_agent_os(service):
                for port in sorted(_container_ports(service)):
                    self.ports[name, port] = free_port()

    # -- what a service sees -----------------------------------------------------------------

    def endpoint(self, service: str, port: int) -> str:
        """Where ``service``'s container port ``port`` is reached natively (``127.0.0.1:N``)."""
        try:
            return f"127.0.0.1:{self.ports[service, port]}"
        except KeyError:
            raise ComposeError(f"{service} exposes no port {port}") from None

    def _address(self, own: str, match: re.Match[str]) -> str:
        host, port = match["host"], int(match["port"])
        if host in ("127.0.0.1", "localhost"):
            if (own, port) not in self.ports:
                return match[0]
            netloc = self.endpoint(own, port)
        elif host in self.services and is_agent_os(self.services[host]):
            netloc = self.endpoint(host, port)
        elif host in self.services:
            local = self.servers.get(host)
            if local is None:
                raise ComposeError(f"{own} reaches {host}:{port}, and no local server stands for {host}")
            if "://" in local:
                if match["scheme"] is None:
                    raise ComposeError(f"{own}: {match[0]!r} is no URL to replace by {local}")
                return local
            netloc = local
        else:
            return match[0]
        scheme = f"{match['scheme']}://{match['userinfo'] or ''}" if match["scheme"] else ""
        return f"{scheme}{netloc}{match['path'] or ''}"

    def _mounts(self, name: str) -> list[tuple[str, Path]]:
        mounts = []
        for spec in self.services[name].get("volumes") or []:
            source, target = str(spec).split(":")[:2]
            if source.startswith((".", "/")):
                host = (self.compose_file.parent / source).resolve()
            else:
                host = self.workdir / "volumes" / source
                host.mkdir(mode=0o700, parents=True, exist_ok=True)
            mounts.append((target, host))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def rewrite(self, name: str, text: str) -> str:
        """``text`` of service ``name`` as the native process needs it (module docstring)."""
        text = _ADDRESS.sub(lambda m: self._address(name, m), text)
        for target, host in self._mounts(name):
            pattern = re.compile(rf"(?<![\w.-]){re.escape(target)}(?=/|$|[\s'\"])")
            text = pattern.sub(str(host).replace("\\", "\\\\"), text)
        return text

    def argv(self, name: str, command: list[str]) -> list[str]:
        """A command of service ``name`` as a native argv (its own ports and hosts too)."""
        args = [self.rewrite(name, str(a)) for a in command]
        if args and args[0] == "agent-os":
            args[0] = str(BIN / "agent-os")
        elif args and args[0] in ("python", "python3"):
            args[0] = sys.executable
        out: list[str] = []
        for arg in args:
            port = _PORT_OPTION.match(arg)
            if port and (name, int(port[3])) in self.ports:
                arg = f"{port[1]}={self.ports[name, int(port[3])]}"
            elif out and _PORT_NAME.match(out[-1]) and arg.isdigit() and (name, int(arg)) in self.ports:
                arg = str(self.ports[name, int(arg)])  # --port N
            host = _HOST_OPTION.match(arg)
            if host:
                arg = f"{host[1]}=127.0.0.1"
            out.append(arg)
        return out

    def environment(self, name: str) -> dict[str, str]:
        """The native process's environment: this one's, less :data:`STRIPPED_ENV`, and the
        service's (rewritten)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_ENV)}
        own = {k: self.rewrite(name, v) for k, v in _environment(self.services[name]).items()}
        return {**base, **own, "PYTHONUNBUFFERED": "1"}

    def health_check(self, name: str) -> list[str] | None:
        """The service's health check as an argv, or None when it has none."""
        test = (self.services[name].get("healthcheck") or {}).get("test")
        if not test or test == ["NONE"]:
            return None
        if isinstance(test, str):
            return ["sh", "-c", self.rewrite(name, test)]
        kind, *rest = test
        if kind == "CMD-SHELL":
            return ["sh", "-c", self.rewrite(name, rest[0])]
        return self.argv(name, rest)

    def host_path(self, name: str, path: str) -> Path:
        """Where ``path`` inside service ``name``'s container is natively, through its volumes.
        Raises ComposeError when no volume of the service holds it."""
        for target, host in self._mounts(name):
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return host / path[len(target) :].lstrip("/")
        raise ComposeError(f"{name}: no volume holds {path}")

    def prometheus_config(self, service: str = "prometheus", job: str = "agent-os") -> dict[str, Any]:
        """The configuration of the stack's Prometheus ``service`` (its ``--config.file``, read
        through its volumes) for a test's Prometheus: only the scrape job ``job``, its targets
        (the stack's Agent OS services, ``name:port``) pointed at where they listen natively,
        scraped and evaluated every second; its rule files where its volumes mount them from.
        The other jobs (Prometheus itself, Jaeger, Grafana) scrape what does not run natively
        and are left out. Raises ComposeError when there is no such job or a target is not an
        Agent OS service of the stack."""
        command = [str(a) for a in self.services[service].get("command") or []]
        option = next((a for a in command if a.startswith("--config.file=")), None)
        inside = option.split("=", 1)[1] if option else "/etc/prometheus/prometheus.yml"
        config: dict[str, Any] = yaml.safe_load(self.host_path(service, inside).read_text())
        jobs = [j for j in config.get("scrape_configs") or [] if j.get("job_name") == job]
        if len(jobs) != 1:
            raise ComposeError(f"{service}: {inside} has no scrape job {job!r}")
        static = []
        for entry in jobs[0].get("static_configs") or []:
            targets = []
            for target in entry["targets"]:
                host, _, port = str(target).rpartition(":")
                if host not in self.services or not is_agent_os(self.services[host]):
                    raise ComposeError(f"{service}: target {target} of job {job} is no Agent OS service")
                targets.append(self.endpoint(host, int(port)))
            static.append({**entry, "targets": targets})
        base = Path(inside).parent
        rules = [str(self.host_path(service, str(base / p))) for p in config.get("rule_files") or []]
        return {
            "global": {
                **(config.get("global") or {}),
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": rules,
            "scrape_configs": [{**jobs[0], "static_configs": static}],
        }

    # -- running -----------------------------------------------------------------------------

    async def _spawn(self, name: str) -> _Running:
        service = self.services[name]
        command = service.get("command")
        if not isinstance(command, list) or not command:
            raise ComposeError(f"{name}: give its command as a list (the image has no entry point)")
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cwd = self.workdir / "run" / name
        cwd.mkdir(parents=True, exist_ok=True)
        out, err = logs / f"{name}.out", logs / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(name, command),
                cwd=cwd,
                env=self.environment(name),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        return _Running(proc, out, err)

    async def _dependencies(self, name: str) -> None:
        for dep, condition in _depends_on(self.services[name]).items():
            if dep not in self.services:
                raise ComposeError(f"{name} depends on {dep}, which the file does not define")
            if not is_agent_os(self.services[dep]):
                if dep not in self.servers:
                    raise ComposeError(f"{name} depends on {dep}, and no local server stands for it")
                continue
            if condition == "service_completed_successfully":
                if dep not in self.done:
                    result = await self.run(dep)
                    if result.returncode != 0:
                        raise ComposeError(f"{dep} exited {result.returncode}: {result.stderr[-2000:]}")
            else:
                await self.start(dep, healthy=condition == "service_healthy")

    async def start(self, name: str, *, healthy: bool = True) -> None:
        """Start service ``name`` after its dependencies; with ``healthy``, return once its
        health check passes. Raises ComposeError when it exits or stays unhealthy."""
        if name not in self.running:
            await self._dependencies(name)
            if name in self.running:  # started meanwhile by another dependent
                return
            self.running[name] = await self._spawn(name)
        if healthy:
            await self.wait_healthy(name)

    async def wait_healthy(self, name: str) -> None:
        """Run the health check until it passes (none: the process is up). Raises ComposeError
        with the service's log when the process exits or :data:`HEALTH_DEADLINE` passes."""
        check, running = self.health_check(name), self.running[name]
        deadline = time.monotonic() + HEALTH_DEADLINE
        while True:
            if running.proc.returncode is not None:
                raise ComposeError(
                    f"{name} exited {running.proc.returncode}: {running.err.read_text()[-3000:]}"
                )
            if check is None:
                return
            probe = await asyncio.create_subprocess_exec(
                *check,
                env=self.environment(name),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await probe.wait() == 0:
                return
            if time.monotonic() > deadline:
                raise ComposeError(
                    f"{name} is not healthy after {HEALTH_DEADLINE:g}s: {running.err.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.2)

    async def run(self, name: str, timeout: float = 120.0) -> Completed:
        """Run one-shot service ``name`` (after its dependencies) to its end; return its exit
        code and output. Raises ComposeError when it does not end within ``timeout``."""
        await self._dependencies(name)
        running = await self._spawn(name)
        try:
            code = await asyncio.wait_for(running.proc.wait(), timeout)
        except TimeoutError:
            running.proc.kill()
            await running.proc.wait()
            raise ComposeError(
                f"{name} did not end within {timeout:g}s: {running.err.read_text()[-3000:]}"
            ) from None
        self.done.add(name)
        return Completed(code, running.out.read_text(), running.err.read_text())

    async def stop(self) -> dict[str, tuple[int, str]]:
        """SIGTERM every running service (the last started first), wait for each, kill one
        that does not stop within 20 s; return each one's exit code and log (stderr)."""
        for name in reversed(list(self.running)):
            running = self.running.pop(name)
            if running.proc.returncode is None:
                running.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(running.proc.wait(), 20)
                except TimeoutError:
                    running.proc.kill()
                    await running.proc.wait()
            assert running.proc.returncode is not None
            self.stopped[name] = (running.proc.returncode, running.err.read_text())
        return self.stopped


@contextlib.asynccontextmanager
async def native_stack(
    compose_file: Path, servers: Mapping[str, str], workdir: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[NativeStack]:
    """A :class:`NativeStack` whose services are stopped when the block ends."""
    stack = NativeStack(compose_file, servers, workdir, dict(env or {}))
    try:
        yield stack
    finally:
        await stack.stop()


async def _main(compose_file: Path, service: str) -> int:
    import tempfile

    from tests.support.servers import NATS_URL, PG_DSN, REDIS_URL

    def netloc(url: str) -> str:
        return url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]

    # A Jaeger of the developer's on 4318, if any: the services' OTLP exports go there.
    servers = {
        "nats": netloc(NATS_URL),
        "redis": netloc(REDIS_URL),
        "postgres": PG_DSN,
        "jaeger": "127.0.0.1:4318",
    }
    env = {"AGENTOS_DEMO_KEEP_RUNNING": "false"}
    with tempfile.TemporaryDirectory(prefix="compose-native-") as folder:
        async with native_stack(compose_file, servers, Path(folder), env) as stack:
            result = await stack.run(service)
        print(result.stdout, end="")
        print(result.stderr, end="", file=sys.stderr)
        return result.returncode


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.support.compose COMPOSE_FILE SERVICE")
    sys.exit(asyncio.run(_main(Path(sys.argv[1]), sys.argv[2])))
