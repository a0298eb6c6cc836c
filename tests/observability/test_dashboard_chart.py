"""The chart ships the Grafana dashboard where Grafana's sidecar finds it: a ConfigMap labelled
``grafana_dashboard: "1"`` whose JSON is deploy/grafana/dashboards/inferline.json; off with
``dashboards.enabled=false``. Rendered by a real ``helm template``."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.deploy.tools import REPO, install, run
from tests.observability.harness import DASHBOARD

pytestmark = pytest.mark.slow

CHART = REPO / "helm" / "inferline"


@pytest.fixture(scope="module")
def helm() -> str:
    return install("install-helm.sh")


def _config_maps(helm: str, *args: str) -> dict[str, dict]:
    out = run([helm, "template", "t", str(CHART), *args]).stdout
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"}


def test_the_chart_renders_the_dashboard_as_a_configmap_for_grafanas_sidecar(helm):
    dashboards = _config_maps(helm)["t-inferline-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards["data"]["inferline.json"]) == json.loads(DASHBOARD.read_text())


def test_the_sidecar_label_and_folder_annotation_are_values_and_the_configmap_can_be_left_out(helm):
    custom = _config_maps(
        helm, "--set", "dashboards.labels.grafana_dashboard=null", "--set-string", "dashboards.labels.dash=yes",
        "--set-string", "dashboards.annotations.grafana_folder=ML",
    )["t-inferline-dashboards"]["metadata"]
    assert custom["labels"]["dash"] == "yes" and "grafana_dashboard" not in custom["labels"]
    assert custom["annotations"] == {"grafana_folder": "ML"}
    assert "t-inferline-dashboards" not in _config_maps(helm, "--set", "dashboards.enabled=false")
