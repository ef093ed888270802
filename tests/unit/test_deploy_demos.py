"""The Dockerfile, the compose demos (deploy/demos) and the Kubernetes manifests, read and
checked without a container runtime: the compose files against the Compose specification's
schema, the manifests against the Kubernetes API schemas (strict), and each against the code
that will run it: every command names a command and options the CLI has, every mounted file
exists, every dependency is a service, every long-running service has a health check on
``/healthz``. Running the demos is tests/integration/test_compose_demos.py.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

from agent_os import cli
from agent_os.control_plane.policy.loader import load_policy_text
from tests.support.compose import is_agent_os

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DEMOS = sorted((DEPLOY / "demos").glob("*/compose.yaml"))
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", *DEMOS]
K8S_VERSION = "1.33.0"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def check_command(argv: list[str]) -> None:
    """``argv`` (a container's command) names an ``agent-os`` command or a ``python -m`` module
    of the package, with options that command has. Raises AssertionError naming what is not."""
    if argv[:2] == ["agent-os", "serve"]:
        module, _ = cli.SERVICES[argv[2]]
        command, args = importlib.import_module(module).main, argv[3:]
    elif argv[:2] == ["python", "-m"]:
        group = importlib.import_module(argv[2]).main
        assert isinstance(group, click.Group), f"{argv[2]} has no command group"
        command = group.commands[argv[3]]
        args = argv[4:]
    else:
        raise AssertionError(f"unknown command {argv}")
    known = _options(command)
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"{argv[:4]}: no option {arg.split('=', 1)[0]}"


def compose_schema() -> dict[str, Any]:
    """The Compose specification's JSON schema, as check-jsonschema ships it."""
    text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return dict(json.loads(text))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)  # the draft the schema names
    errors = sorted(validator.iter_errors(_load(path)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_there_are_two_demos() -> None:
    assert [p.parent.name for p in DEMOS] == ["auditor", "fleet"]


@pytest.mark.parametrize("path", DEMOS, ids=lambda p: p.parent.name)
def test_a_demo_runs_commands_the_package_has_with_files_that_exist(path: Path) -> None:
    compose = _load(path)
    services: dict[str, dict[str, Any]] = compose["services"]
    assert {"prometheus", "grafana", "jaeger", "nats"} <= set(services)
    ours = {name: s for name, s in services.items() if is_agent_os(s)}
    for name, service in ours.items():
        assert (path.parent / service["build"]["context"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
        check_command(service["command"])
        env = service.get("environment", {})
        one_shot = service.get("restart") == "no"
        if not one_shot:
            test = " ".join(service["healthcheck"]["test"])
            assert "/healthz" in test or "/v1/models" in test, f"{name}: its health check"
        if service["command"][0] == "agent-os" or service["command"][3] == "run":
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
            assert env.get("OTEL_SERVICE_NAME"), f"{name} names itself in its traces"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    prometheus = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prometheus == {"./prometheus.yml", "../../prometheus/rules"}  # its own targets, shared rules
    grafana = {v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert {"../../grafana/provisioning", "../../grafana/dashboards"} == grafana


def test_the_fleet_demo_runs_a_queue_group_and_a_policy_that_loads() -> None:
    services = _load(DEPLOY / "demos" / "fleet" / "compose.yaml")["services"]
    instances = [
        s for s in services.values() if s.get("command", [None])[:3] == ["agent-os", "serve", "control-plane"]
    ]
    assert len(instances) == 2
    recorders = {arg for s in instances for arg in s["command"] if arg.startswith("--recorder=")}
    assert len(recorders) == 2, "each instance has its own flight recorder"
    assert all("--nonce-store=redis://redis:6379/0" in s["command"] for s in instances)
    policy = load_policy_text((DEPLOY / "demos" / "fleet" / "policy.yaml").read_text())
    assert [r.name for r in policy.rules][:2] == ["no-secrets", "no-shutdown"]
    admins = [a for a in services["fleet"]["command"] if a.startswith("--admin=")]
    assert admins == ["--admin=http://control-plane-1:8787", "--admin=http://control-plane-2:8787"]


@pytest.mark.parametrize("path", DEMOS, ids=lambda p: p.parent.name)
def test_a_demos_prometheus_scrapes_each_of_its_services_metrics_ports(path: Path) -> None:
    """The Prometheus of a demo stack loads the shared rules and scrapes, as job ``agent-os``,
    exactly the stack's services that serve metrics, on their ``--metrics-port``."""
    services = _load(path)["services"]
    volumes = services["prometheus"]["volumes"]
    mount = next(v for v in volumes if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = _load(path.parent / mount.split(":")[0])
    assert config["rule_files"] == ["rules/*.yml"]
    assert any(v.endswith(":/etc/prometheus/rules:ro") for v in volumes)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    scraped = {t for static in jobs["agent-os"]["static_configs"] for t in static["targets"]}
    serving = {
        f"{name}:{arg.split('=', 1)[1]}"
        for name, service in services.items()
        for arg in service.get("command") or []
        if isinstance(arg, str) and arg.startswith("--metrics-port=")
    }
    assert serving
    assert scraped == serving
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host == "127.0.0.1" or host in services, f"unknown scrape target {target}"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, glob + "/*"):
            ignored = not negate
    return ignored


def test_the_dockerfile_builds_from_the_lock_in_two_stages_and_runs_unprivileged() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert stages == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in lines
    final = lines[lines.index("FROM ${PYTHON_IMAGE}") :]
    assert [line for line in final if line.startswith("USER ")] == ["USER agentos"]
    assert any("--no-index" in line and "-c /tmp/requirements.lock" in line for line in final)
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [p for p in ignore if p and not p.startswith("#")]
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            source = line.split()[1]
            assert (ROOT / source).exists(), f"COPY of missing {source}"
            assert not _dockerignored(source, ignore), f".dockerignore leaves out {source}"
    extras = _pyproject_extras()
    for line in lines:
        if line.startswith("ARG EXTRAS="):
            assert set(line.removeprefix("ARG EXTRAS=").split(",")) <= set(extras)
    # Every folder agent_os/ links to is in the build context.
    for link in (ROOT / "agent_os").iterdir():
        if link.is_symlink():
            top = link.resolve().relative_to(ROOT).parts[0]
            assert any(line == f"COPY {top} ./{top}" for line in lines), f"the image lacks {top}/"


def _pyproject_extras() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^([a-z-]+) = ", section, re.M)


def _manifests(folder: Path) -> list[dict[str, Any]]:
    kustomization = _load(folder / "kustomization.yaml")
    return [d for f in kustomization["resources"] for d in yaml.safe_load_all((folder / f).read_text()) if d]


@pytest.mark.parametrize("folder", ["k8s", "k8s/services"])
def test_kubernetes_manifests_follow_the_api_schemas(folder: str) -> None:
    import kubernetes_validate

    for doc in _manifests(DEPLOY / folder):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder} {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_kubernetes_deployments_run_the_services_with_probes_config_and_secrets() -> None:
    docs = _manifests(DEPLOY / "k8s" / "services")
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert set(by_kind["Deployment"]) == {"control-plane", "memory", "verifier"}
    secrets = {k: set(s["stringData"]) for k, s in by_kind["Secret"].items()}
    for name, deployment in by_kind["Deployment"].items():
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        check_command(container["args"])
        ports = {p["name"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz", f"{name} {probe}"
            assert get["port"] in ports, f"{name} {probe} on an unknown port"
        for env in container["env"]:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]], f"{name}: {ref}"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind["ConfigMap"]
            if "secret" in volume:  # the key stores: made by the operator, see kustomization.yaml
                assert volume["secret"]["secretName"] == "agent-os-keystores"
        (init,) = pod["initContainers"]
        assert init["command"][:2] == ["tar", "-xpf"], "the key store is unpacked with its modes"
        assert any(m["mountPath"] == "/keys" for m in container["volumeMounts"])
        service = by_kind["Service"][name]
        assert service["spec"]["selector"].items() <= labels.items()
    assert by_kind["Deployment"]["control-plane"]["spec"]["replicas"] == 2, "a queue group"
    policy = by_kind["ConfigMap"]["agent-os-policy"]["data"]["policy.yaml"]
    assert load_policy_text(policy).default_action == "deny"
