"""The shipped Grafana dashboards as tests read them: every panel's PromQL expressions, with
Grafana's variables replaced as Grafana replaces them when "All" is chosen, and the metrics
their variables list; the shipped Prometheus configuration pointed at a test's services; and
the queries a running Prometheus has no series for."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.prometheus import query

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules"

# Grafana's own variables, as it sets them for a one-hour range on a 15-second scrape.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"label_values\((?:(?P<metric>[^,()]+),\s*)?(?P<label>\w+)\)")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard: where it is (``dashboard``, ``panel``, ``ref``) and
    the expression as shipped (``expr``) and as Grafana sends it (``promql``)."""

    dashboard: str
    panel: str
    ref: str
    expr: str
    promql: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref}]: {self.promql}"


def dashboards() -> dict[str, dict[str, Any]]:
    """Every shipped dashboard by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included (rows themselves too)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variables(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """The dashboard's variables with the value "All" gives them (their ``allValue``)."""
    return {v["name"]: v.get("allValue") or ".*" for v in dashboard.get("templating", {}).get("list", [])}


def grafana(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with ``$name`` and ``${name}`` replaced by ``values`` and Grafana's builtins.
    Raises KeyError naming a variable neither defines."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return {**BUILTINS, **values}[name]

    return _VARIABLE.sub(value, expr)


def queries() -> list[Query]:
    """Every panel expression of every shipped dashboard."""
    found = []
    for name, dashboard in dashboards().items():
        values = variables(dashboard)
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                if "expr" in target:
                    expr = target["expr"]
                    found.append(Query(name, panel["title"], target["refId"], expr, grafana(expr, values)))
    return found


def variable_queries() -> list[Query]:
    """The series query behind each dashboard variable (``label_values(metric, label)``:
    ``metric``), so that a test can check the variable has values."""
    found = []
    for name, dashboard in dashboards().items():
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query)
            match = _LABEL_VALUES.fullmatch(text.strip())
            if match is None:
                raise AssertionError(f"{name}: variable {variable['name']}: not label_values(...): {text!r}")
            metric = match.group("metric") or "up"
            found.append(
                Query(
                    name, f"variable {variable['name']}", "-", text, f"count by ({match['label']}) ({metric})"
                )
            )
    return found


def metric_names(expr: str) -> set[str]:
    """The ``agentos_`` metric families ``expr`` reads (histogram suffixes removed)."""
    names = set(re.findall(r"\bagentos_[a-z_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def shipped_config(targets: Mapping[str, str]) -> dict[str, Any]:
    """The shipped Prometheus configuration with the ``agent-os`` job's targets replaced by the
    test's (``service`` label -> ``host:port``; a service not given is left out) and scraped
    every second; the other jobs (Prometheus, Jaeger, Grafana of the compose stack) left out;
    its rule files read from the repository. Raises AssertionError when the shipped file has
    no ``agent-os`` job or a given service is not in it."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "agent-os"]
    assert len(jobs) == 1, "the shipped prometheus.yml must have one job agent-os"
    job = jobs[0]
    static = []
    for entry in job["static_configs"]:
        service = entry.get("labels", {}).get("service")
        if service in targets:
            static.append({**entry, "targets": [targets[service]]})
    missing = set(targets) - {entry["labels"]["service"] for entry in static}
    assert not missing, f"services not in the shipped agent-os job: {sorted(missing)}"
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "scrape_timeout": "1s"}
    config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"] = [{**job, "static_configs": static}]
    base = PROMETHEUS_CONFIG.parent
    config["rule_files"] = [str(base / pattern) for pattern in config.get("rule_files", [])]
    return config


def rule_groups() -> Sequence[dict[str, Any]]:
    """The groups of every shipped rule file."""
    groups: list[dict[str, Any]] = []
    for path in sorted(RULES.glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


async def without_data(url: str, wanted: Sequence[Query], timeout: float = 30) -> list[Query]:
    """The queries of ``wanted`` that the Prometheus at ``url`` still has no series for after
    ``timeout`` seconds of scrapes (asked again every half second until all have some)."""
    deadline = time.monotonic() + timeout
    left = list(wanted)
    while True:
        left = [q for q in left if not await query(url, q.promql)]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)
