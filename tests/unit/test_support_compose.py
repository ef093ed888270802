"""tests/support/compose.py reads a compose file as Compose would and rewrites each Agent OS
service's command, environment and health check for a native run (no process is started here;
the demos run natively in tests/integration/test_compose_demos.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.compose import BIN, ComposeError, NativeStack, interpolate

COMPOSE = """
name: t
x-env: &env
  TOKEN: ${TOKEN:-fallback}
services:
  keys:
    build: {context: .}
    restart: "no"
    command: ["python", "-m", "agent_os.demo.fleet", "keys", "/keys"]
    volumes: [keys:/keys]
  api:
    build: {context: .}
    command: ["agent-os", "serve", "control-plane", "--broker=nats://nats:4222",
              "--identities=/keys/cp", "--recorder=sqlite:////data/a.db", "--policy=/etc/p.yaml",
              "--admin-host=0.0.0.0", "--admin-port=8787", "--metrics-port", "9464"]
    environment:
      <<: *env
      AGENTOS_EMK_DSN: postgresql://postgres:secret@postgres:5432/agentos
      OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4318
      PRICE: "$$5"
    volumes: ["keys:/keys:ro", "data:/data", "./p.yaml:/etc/p.yaml:ro"]
    expose: ["8787", "9464"]
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9464/healthz')"]
  client:
    build: {context: .}
    command: ["python", "-m", "x", "--admin=http://api:8787"]
    depends_on: {api: {condition: service_healthy}}
  nats: {image: "nats:2.10-alpine"}
  postgres: {image: "pgvector/pgvector:pg16"}
  jaeger: {image: "jaegertracing/jaeger:2.5.0"}
"""
SERVERS = {
    "nats": "127.0.0.1:14000",
    "postgres": "postgresql://me@127.0.0.1:15000/db",
    "jaeger": "127.0.0.1:16000",
}


@pytest.fixture
def stack(tmp_path: Path) -> NativeStack:
    (tmp_path / "compose.yaml").write_text(COMPOSE)
    (tmp_path / "p.yaml").write_text("name: p\n")
    return NativeStack(tmp_path / "compose.yaml", SERVERS, tmp_path / "work", {"TOKEN": "given"})


def test_variables_are_filled_as_compose_fills_them() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env) == "x d  d x $SET"
    assert interpolate({"a": ["${SET}"]}, env) == {"a": ["x"]}
    with pytest.raises(ComposeError, match="UNSET"):
        interpolate("${UNSET}", env)


def test_a_command_reaches_the_local_servers_its_own_ports_and_its_volumes(
    stack: NativeStack, tmp_path: Path
) -> None:
    argv = stack.argv("api", stack.services["api"]["command"])
    admin, metrics = stack.ports["api", 8787], stack.ports["api", 9464]
    volumes = tmp_path / "work" / "volumes"
    assert argv == [
        str(BIN / "agent-os"),
        "serve",
        "control-plane",
        "--broker=nats://127.0.0.1:14000",
        f"--identities={volumes / 'keys'}/cp",
        f"--recorder=sqlite:///{volumes / 'data'}/a.db",
        f"--policy={tmp_path / 'p.yaml'}",
        "--admin-host=127.0.0.1",
        f"--admin-port={admin}",
        "--metrics-port",
        str(metrics),
    ]
    assert metrics != admin
    check = stack.health_check("api")
    assert check == [
        sys.executable,
        "-c",
        f"import urllib.request as u; u.urlopen('http://127.0.0.1:{metrics}/healthz')",
    ]
    client = stack.argv("client", stack.services["client"]["command"])
    assert client == [sys.executable, "-m", "x", f"--admin=http://127.0.0.1:{admin}"]


def test_the_environment_is_the_services_own_with_urls_replaced(stack: NativeStack) -> None:
    env = stack.environment("api")
    assert env["TOKEN"] == "given"
    assert env["AGENTOS_EMK_DSN"] == "postgresql://me@127.0.0.1:15000/db"  # the whole URL
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:16000"
    assert env["PRICE"] == "$5"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_a_server_without_a_local_stand_in_is_refused(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text(COMPOSE)
    stack = NativeStack(tmp_path / "compose.yaml", {"postgres": SERVERS["postgres"]}, tmp_path / "work")
    with pytest.raises(ComposeError, match="no local server stands for nats"):
        stack.argv("api", stack.services["api"]["command"])


def test_the_demos_prometheus_scrapes_the_native_services(tmp_path: Path) -> None:
    """The stack's Prometheus configuration, read through its volume: only the agent-os job,
    its targets where the services listen natively, its rules where the volume comes from."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 15s}\nrule_files: [rules/*.yml]\nscrape_configs:\n"
        "  - {job_name: grafana, static_configs: [{targets: ['grafana:3000']}]}\n"
        "  - job_name: agent-os\n"
        "    static_configs: [{targets: ['api:9464'], labels: {service: control-plane}}]\n"
    )
    prometheus = (
        "  prometheus:\n    image: prom/prometheus\n"
        '    command: ["--config.file=/etc/prometheus/prometheus.yml"]\n'
        "    volumes: [./prometheus.yml:/etc/prometheus/prometheus.yml:ro,\n"
        "              ./rules:/etc/prometheus/rules:ro]\n"
    )
    (tmp_path / "compose.yaml").write_text(COMPOSE + prometheus)
    stack = NativeStack(tmp_path / "compose.yaml", SERVERS, tmp_path / "work")
    config = stack.prometheus_config()
    assert config["scrape_configs"] == [
        {
            "job_name": "agent-os",
            "static_configs": [
                {"targets": [stack.endpoint("api", 9464)], "labels": {"service": "control-plane"}}
            ],
        }
    ]
    assert config["rule_files"] == [str(tmp_path / "rules" / "*.yml")]
    assert config["global"]["scrape_interval"] == "1s"
    with pytest.raises(ComposeError, match="no scrape job 'missing'"):
        stack.prometheus_config(job="missing")
    with pytest.raises(ComposeError, match="target grafana:3000 of job grafana is no Agent OS service"):
        stack.prometheus_config(job="grafana")
    with pytest.raises(ComposeError, match="api: no volume holds /etc/elsewhere"):
        stack.host_path("api", "/etc/elsewhere")
