"""The shipped Grafana dashboards and Prometheus rules, read without servers: well-formed,
provisioned from the Prometheus datasource, reading only documented metrics, and described in
``docs/observability.md``. (``tests/integration/test_dashboards.py`` evaluates every query
against a real Prometheus scraping the services.)"""

from __future__ import annotations

import re

import yaml

from tests.support.dashboards import (
    ROOT,
    dashboards,
    grafana,
    metric_names,
    panels,
    queries,
    rule_groups,
    variables,
)

PAGE = ROOT / "docs" / "observability.md"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "datasources.yml"


def documented() -> set[str]:
    return set(re.findall(r"`(agentos_[a-z_]+)", PAGE.read_text()))


def test_the_dashboards_are_well_formed_and_use_the_provisioned_prometheus() -> None:
    boards = dashboards()
    assert set(boards) == {"fleet.json", "trust.json", "memory-verification.json", "services.json"}
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids)
    provisioned = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    for name, board in boards.items():
        ids = [p["id"] for p in panels(board)]
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            where = f"{name} / {panel['title']}"
            assert panel["datasource"]["uid"] in provisioned, where
            assert panel["targets"], f"{where}: no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), f"{where}: refIds repeat"
            assert all(t["expr"].strip() for t in panel["targets"]), f"{where}: an empty query"
            assert panel.get("description"), f"{where}: no description"


def test_every_query_reads_documented_metrics_and_defined_variables() -> None:
    known = documented()
    found = queries()
    assert len(found) > 50
    for query in found:
        assert metric_names(query.expr) <= known, f"{query}: undocumented {metric_names(query.expr) - known}"
        assert "$" not in query.promql, f"{query}: a variable left"
    assert grafana('rate(x{agent=~"$agent"}[$__rate_interval])', {"agent": ".*"}) == (
        'rate(x{agent=~".*"}[1m])'
    )
    for board in dashboards().values():
        assert all(value for value in variables(board).values())


def test_every_dashboard_is_described_on_the_observability_page() -> None:
    page = PAGE.read_text()
    for name, board in dashboards().items():
        assert board["title"] in page, f"{name}: {board['title']!r} is not on docs/observability.md"


def test_every_alert_has_a_severity_and_reads_documented_metrics() -> None:
    known = documented()
    alerts = [rule for group in rule_groups() for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "AgentOSServiceDown",
        "AgentOSDeadLettersRising",
        "AgentOSFlightRecorderChainBroken",
    }
    page = PAGE.read_text()
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]
        assert metric_names(alert["expr"]) <= known, alert["alert"]
        assert alert["alert"] in page, f"{alert['alert']} is not on docs/observability.md"
