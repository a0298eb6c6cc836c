"""The monitoring files agree with each other and with docs/monitoring.md: the dashboard uses
the provisioned datasource, every alert routes and has a runbook section, every metric and
span the code emits is documented."""

from __future__ import annotations

import json
import re

import yaml

from inferline.common.telemetry import metrics
from tests.observability.harness import (
    ALERTMANAGER_CONFIG,
    DASHBOARD,
    DEPLOY,
    REPO,
    RULE_TESTS,
    RULES,
    RUNBOOK_BASE_URL,
)

DOCS = (REPO / "docs" / "monitoring.md").read_text()
PROVISIONING = DEPLOY / "grafana" / "provisioning"


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_every_panel_queries_the_provisioned_prometheus_datasource():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "inferline.yaml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "inferline"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] in uids and t["expr"] for t in panel["targets"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_provisioning_loads_the_folder_compose_and_helm_mount():
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "inferline.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]


def test_the_dashboard_has_the_panels_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for wanted in ("request rate", "p50 / p95 / p99 per stage", "error rate", "batch size", "queue depth",
                   "gpu utilisation", "slo burn"):
        assert wanted in titles, wanted


def test_the_stage_down_alert_is_the_agreed_one():
    down = next(a for a in _alerts() if a["alert"] == "InferlineStageDown")
    assert down["expr"] == 'up{job=~"inferline-.*"} == 0'
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert [j["job_name"] for j in config["scrape_configs"]] == [
        "inferline-controller", "inferline-preprocess", "inferline-inference", "inferline-postprocess"
    ]


def test_alert_thresholds_are_only_in_the_thresholds_group():
    for alert in _alerts():
        numbers = re.findall(r"(?<![\w.\[])\d+(?:\.\d+)?(?![\w\]])", alert["expr"])
        assert set(numbers) <= {"0", "6", "14.4"}, (alert["alert"], numbers)  # burn factors are the workbook's


def test_every_alert_has_a_severity_alertmanager_routes_and_a_runbook_url_to_its_docs_section():
    """``runbook_url`` (the annotation Alertmanager templates and Grafana link) is absolute, on
    the docs site, and its anchor is a section of docs/monitoring.md."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert [r["matchers"] for r in config["route"]["routes"]] == [['severity="page"']]
    assert config["route"]["receiver"] == "inferline-tickets"
    for alert in _alerts():
        assert alert["labels"]["severity"] in {"page", "warning"}
        assert "runbook" not in alert["annotations"], alert["alert"]
        assert alert["annotations"]["runbook_url"] == f"{RUNBOOK_BASE_URL}#{alert['alert'].lower()}"
        assert f"### {alert['alert']}\n" in DOCS


def test_rule_unit_tests_show_every_alert_both_firing_and_not_firing():
    alerts = {a["alert"] for a in _alerts()}
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])
    ]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts


def test_every_metric_the_stages_emit_is_documented():
    collectors = [m for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")]
    names = [m._name + ("_total" if m._type == "counter" else "") for m in collectors]
    names += ["inferline_gpu_utilization_ratio", "inferline_gpu_memory_used_bytes", "inferline_gpu_memory_total_bytes"]
    assert len(names) >= 12
    for name in names:
        assert f"`{name}`" in DOCS, name


def test_every_span_name_is_documented():
    for step in ("decode", "letterbox", "queue_wait", "batch_run", "nms", "render"):
        assert f"─ {step} " in DOCS, step
