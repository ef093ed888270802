"""deploy/: the docker-compose stack and the Kubernetes manifests stay consistent.

No container runs here (no Docker daemon on the test machines); these tests read the files and
check what would otherwise only fail at ``docker compose up``: the KRaft settings of Kafka agree
with each other, every service has a healthcheck, ports are published on loopback only, mounted
files exist, and Prometheus and Grafana point at services that exist.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

import pytest
import yaml

from tests.support.kafka import TEST_GROUP_OPTIONS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SERVICES = {"kafka", "nats", "redis", "postgres", "prometheus", "grafana", "jaeger"}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load(COMPOSE)
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}; an empty host means all interfaces."""
    out = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        assert name, f"malformed listener {item!r}"
        assert port.isdigit(), f"malformed listener {item!r}"
        out[name] = (host, int(port))
    return out


def check_kraft(env: dict[str, str], *, controller_host: str) -> dict[str, tuple[str, int]]:
    """The KRaft settings of one combined broker+controller node agree with each other.
    Returns the advertised listeners."""
    node_id = int(env["KAFKA_NODE_ID"])
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}

    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller_names = env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    assert set(listeners) | set(advertised) <= set(protocols), "every listener has a security protocol"
    assert set(advertised) <= set(listeners), "only listeners that exist are advertised"
    assert set(controller_names) <= set(listeners), "the controller listener is listened on"
    assert not set(controller_names) & set(advertised), "the controller listener is not for clients"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    ports = [port for _, port in listeners.values()]
    assert len(ports) == len(set(ports)), "each listener has its own port"

    voters = [v.strip() for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")]
    assert len(voters) == 1, "a single node is the only voter"
    voter_id, _, voter_address = voters[0].partition("@")
    voter_host, _, voter_port = voter_address.rpartition(":")
    assert int(voter_id) == node_id, "the node votes for itself"
    assert voter_host == controller_host, "the voter address resolves to this node"
    assert int(voter_port) == listeners[controller_names[0]][1], "voters use the controller port"

    cluster_id = env["CLUSTER_ID"]
    raw = base64.urlsafe_b64decode(cluster_id + "=" * (-len(cluster_id) % 4))
    assert len(cluster_id) == 22, "CLUSTER_ID is a base64 UUID without padding (kafka-storage format)"
    assert len(raw) == 16, "CLUSTER_ID is a base64 UUID (kafka-storage format)"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", f"{key} must be 1 on a single node"
    return advertised


def test_the_stack_has_every_service_with_a_healthcheck(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert set(services) >= SERVICES
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check.get("test"), f"{name} has an empty healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must be CMD/CMD-SHELL"
        assert ":" in service["image"], f"{name}: pin an image tag"
        assert not service["image"].endswith(":latest"), f"{name}: pin an image tag"


def test_kafka_kraft_settings_are_consistent_and_reachable_from_the_host(compose: dict[str, Any]) -> None:
    kafka = _services(compose)["kafka"]
    env = _env(kafka)
    advertised = check_kraft(env, controller_host=kafka["hostname"])
    # Host clients bootstrap on 127.0.0.1:9092 and are told that same address.
    host_listeners = [name for name, address in advertised.items() if address == ("127.0.0.1", 9092)]
    assert len(host_listeners) == 1, "one listener is advertised as 127.0.0.1:9092"
    container_port = _listeners(env["KAFKA_LISTENERS"])[host_listeners[0]][1]
    assert f"127.0.0.1:9092:{container_port}" in kafka["ports"], "that listener's port is published"
    # Containers of the stack are told an address they can resolve: the service's hostname.
    others = {name: host for name, (host, _) in advertised.items() if name != host_listeners[0]}
    assert set(others.values()) == {kafka["hostname"]}
    # The conformance fixture's session timeout must be allowed by the broker.
    options = dict(parse_qsl(TEST_GROUP_OPTIONS))
    assert int(env["KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS"]) <= int(options["session_timeout_ms"])
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    defaults = {"kafka": 9092, "nats": 4222, "redis": 6379, "postgres": 5432}
    for name, service in _services(compose).items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if name in defaults:
            assert f"127.0.0.1:{defaults[name]}:{defaults[name]}" in service["ports"], name


def test_postgres_matches_what_the_tests_expect(compose: dict[str, Any]) -> None:
    postgres = _services(compose)["postgres"]
    env = _env(postgres)
    assert postgres["image"].startswith("pgvector/pgvector:pg16")
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("postgres", "test")
    init = [v for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init, "an init script mounted"
    assert "CREATE EXTENSION IF NOT EXISTS vector" in (DEPLOY / init[0].split(":")[0]).read_text()


def test_mounted_files_exist_and_dependencies_are_healthchecked(compose: dict[str, Any]) -> None:
    services = _services(compose)
    named = set(compose.get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services
            assert rule["condition"] == "service_healthy"


def test_prometheus_and_grafana_point_at_services_of_the_stack(compose: dict[str, Any]) -> None:
    services = _services(compose)
    scrape = _load(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert {"prometheus", "agent-os"} <= set(jobs)
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                if host == "host.docker.internal":
                    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
                else:
                    assert host == "127.0.0.1" or host in services, f"unknown scrape target {target}"

    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = {d["type"]: d for d in _load(provisioning / "datasources" / "datasources.yml")["datasources"]}
    assert {"prometheus", "jaeger"} <= set(sources)
    for source in sources.values():
        url = urlparse(source["url"])
        assert url.hostname in services, f"datasource {source['name']} points at {url.hostname}"
    dashboards = _load(provisioning / "dashboards" / "dashboards.yml")["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert dashboards in mounts, "the dashboards folder is mounted where the provider reads"
    assert list((DEPLOY / mounts[dashboards]).glob("*.json")), "dashboards to load"


def test_kubernetes_manifests_are_consistent() -> None:
    k8s = DEPLOY / "k8s"
    kustomization = _load(k8s / "kustomization.yaml")
    docs = [d for f in kustomization["resources"] for d in yaml.safe_load_all((k8s / f).read_text()) if d]
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert {"kafka", "nats", "redis", "postgres"} <= set(by_kind["StatefulSet"])
    for name, sts in by_kind["StatefulSet"].items():
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert sts["spec"]["serviceName"] in by_kind["Service"], f"{name}: governing service missing"
        for container in sts["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in container, f"{name} has no readiness probe"
    for name, service in by_kind["Service"].items():
        selected = service["spec"]["selector"].items()
        assert any(
            selected <= s["spec"]["template"]["metadata"]["labels"].items()
            for s in by_kind["StatefulSet"].values()
        ), f"service {name} selects no pods"

    kafka = by_kind["StatefulSet"]["kafka"]
    assert kafka["spec"]["replicas"] == 1, "one voter: one replica"
    (container,) = kafka["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    headless = f"kafka-0.{kafka['spec']['serviceName']}"
    advertised = check_kraft(env, controller_host=headless)
    assert all(host == "$(POD_NAME)." + kafka["spec"]["serviceName"] for host, _ in advertised.values())
    assert [e["name"] for e in container["env"]].index("POD_NAME") == 0, "defined before it is used"
    assert by_kind["Service"][kafka["spec"]["serviceName"]]["spec"]["publishNotReadyAddresses"] is True


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(_compose_cli() is None, reason="neither `docker compose` nor docker-compose installed")
def test_docker_compose_accepts_the_file() -> None:
    cli = _compose_cli()
    assert cli is not None
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
