"""The monitoring files agree with each other and with docs/monitoring.md: the dashboard picks its
datasource by variable and follows the namespace, pod and model variables, the chart ships it,
every alert routes and links its runbook, every metric and span the code emits is documented."""

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
    with_all_selected,
)

DOCS = (REPO / "docs" / "monitoring.md").read_text()
PROVISIONING = DEPLOY / "grafana" / "provisioning"


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


# Series that carry a model label; a query of one of them must follow the model variable.
MODEL_LABELLED = (
    "inferline_rpc_duration_seconds", "inferline_stage_call_duration_seconds", "inferline_batch_size",
    "inferline_queue_depth", "inferline_queue_capacity", "inferline_queue_wait_seconds", "inferline_model_load_seconds",
)
# Constant lines (thresholds recorded in the rules' first group, burn factors) follow no variable.
CONSTANTS = re.compile(r"^(inferline:(slo_[a-z0-9_]+|[a-z_]+_threshold):[a-z]+|vector\([0-9.]+\))$")
SELECTOR = re.compile(r"\b((?:inferline_|up\b)[a-z_]*)\s*(\{[^}]*\})?")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in _dashboard()["panels"] for target in panel["targets"]]


def test_the_dashboard_picks_its_prometheus_by_a_datasource_variable_not_a_uid():
    """Imported into any Grafana (or loaded by the chart's sidecar) it finds that Grafana's
    Prometheus, whatever its uid: every panel and query names ``${datasource}``."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "inferline"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"] and all(t["datasource"] == wanted and t["expr"] for t in panel["targets"])
    for name in ("namespace", "pod", "model"):
        assert variables[name]["datasource"] == wanted
    assert "inferline-prometheus" not in DASHBOARD.read_text()


def test_every_panel_query_follows_the_namespace_pod_and_model_variables():
    """Each selector of a scraped series filters by namespace and pod, and by model where the series
    has that label; with "All" the regex also matches series without the label (the local stack)."""
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"] if v["type"] == "query"}
    assert set(variables) == {"namespace", "pod", "model"}
    for variable in variables.values():
        assert variable["includeAll"] and variable["allValue"] == ".*" and variable["multi"]
    for title, target in _targets():
        expr = target["expr"]
        if CONSTANTS.match(expr):
            continue
        selectors = SELECTOR.findall(expr)
        recorded = [name for name in re.findall(r"inferline:[a-z0-9_:]+", expr) if not CONSTANTS.match(name)]
        assert selectors and not recorded, (title, expr)  # raw series only: the recording rules drop pod
        for metric, matchers in selectors:
            assert 'namespace=~"$namespace"' in matchers and 'pod=~"$pod"' in matchers, (title, metric)
            if metric.startswith(MODEL_LABELLED):
                assert 'model=~"$model"' in matchers, (title, metric)


def test_every_variable_a_panel_uses_is_defined_and_resolves_to_a_valid_query():
    """What Grafana does on import: each ``$name`` must be a dashboard variable or a built-in one;
    with every variable at "All" the query must still be well formed (balanced braces, quotes)."""
    dashboard = _dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    for title, target in _targets():
        used = set(re.findall(r"\$\{?(\w+)", json.dumps(target)))
        assert used <= defined | {"__rate_interval", "__interval", "__range"}, (title, used - defined)
        resolved = with_all_selected(target["expr"])
        assert "$" not in resolved and resolved.count("{") == resolved.count("}") and resolved.count('"') % 2 == 0


def test_the_dashboard_json_has_the_structure_grafana_requires():
    """The required parts of Grafana's dashboard schema (v1, the JSON model Grafana imports):
    unique panel ids and query refIds, grid positions inside the 24-column grid, field config with
    defaults and overrides, known variable types."""
    dashboard = _dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["annotations"]["list"] and "templating" in dashboard
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and grid["h"] > 0 and 0 < grid["w"] <= 24, panel["title"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert set(panel["fieldConfig"]) == {"defaults", "overrides"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
    kinds = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom"}
    assert all(v["type"] in kinds and v["name"] for v in dashboard["templating"]["list"])


def test_the_chart_ships_the_same_dashboard_as_deploy():
    """One source of truth: the chart's copy (helm packages only files inside the chart) is
    byte for byte deploy/'s."""
    assert (REPO / "helm" / "inferline" / "files" / "dashboards" / "inferline.json").read_bytes() == (
        DASHBOARD.read_bytes()
    )


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


def test_the_dashboard_validates_against_grafana_s_published_dashboard_schema():
    """Grafana's own JSON schema of the dashboard model (vendored: tests/support/grafana), for
    deploy/'s dashboard and the chart's copy: a wrong type or an unknown enum value fails here
    rather than in the user's Grafana."""
    import jsonschema  # noqa: PLC0415 - a dev dependency, for this test only

    schema = json.loads((REPO / "tests" / "support" / "grafana" / "dashboard.jsonschema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for path in (DASHBOARD, REPO / "helm" / "inferline" / "files" / "dashboards" / DASHBOARD.name):
        found = validator.iter_errors(json.loads(path.read_text()))
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]
        assert not errors, f"{path}:\n" + "\n".join(errors[:20])
    broken = {**_dashboard(), "panels": [{"type": 5}]}
    assert list(validator.iter_errors(broken)), "the schema refuses a panel of the wrong type"
