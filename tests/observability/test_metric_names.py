"""Every metric that the HPAs (through the prometheus-adapter rules), the alert rules (Compose's
and the chart's) and the Grafana dashboard name is one a live stack exports: the four stages as
processes, a few requests (good, a broken image, an unknown model), then each /metrics scraped.
A renamed metric breaks autoscaling, alerts and panels silently; this finds it."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.common.settings import STAGES
from tests.observability.harness import DASHBOARD, REPO, RULES, Stages, stage_env

pytestmark = pytest.mark.slow

CHART = REPO / "helm" / "inferline"
ADAPTER_RULES = CHART / "files" / "prometheus-adapter-rules.yaml"
CHART_RULES = CHART / "files" / "prometheus-rules.yaml"
# A metric name in PromQL: inferline's own (recorded series use colons, inferline:..., and are
# defined by the rules themselves).
METRIC = re.compile(r"\binferline_[a-z0-9_]+")
# NVML's GPU metrics: exported only where a GPU is (common/telemetry/metrics.py).
GPU_ONLY = {"inferline_gpu_utilization_ratio", "inferline_gpu_memory_used_bytes", "inferline_gpu_memory_total_bytes"}


def _rule_exprs(path: Path) -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    queries = [t["expr"] for panel in panels for t in panel.get("targets", []) if t.get("expr")]
    variables = dashboard.get("templating", {}).get("list", [])
    return queries + [str(v["query"]) for v in variables if v.get("type") == "query" and v.get("query")]


def _adapter_sources() -> list[str]:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    return [text for rule in rules for text in (rule["seriesQuery"], rule["metricsQuery"])]


def named_metrics() -> dict[str, set[str]]:
    """Metric names each file's queries use, by file."""
    sources = {
        "adapter rules": _adapter_sources(),
        "alert rules": _rule_exprs(RULES),
        "chart alert rules": _rule_exprs(CHART_RULES),
        "dashboard": _dashboard_exprs(),
    }
    return {where: {name for text in texts for name in METRIC.findall(text)} for where, texts in sources.items()}


def test_the_files_name_metrics_at_all():
    """The parse finds names in every file (an empty set would make the scrape test vacuous)."""
    named = named_metrics()
    assert all(named.values()), named
    assert {"inferline_queue_depth", "inferline_rpc_duration_seconds_count"} <= named["adapter rules"]


def _send_requests(target: str, image: bytes) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        good = types_pb2.Image(name="scene.jpg", data=image)
        broken = types_pb2.Image(name="broken.jpg", data=b"not an image")
        calls = [controller_pb2.DetectRequest(model="yolov8n", images=[good, broken])] * 4
        calls.append(controller_pb2.DetectRequest(model="no-such-model", images=[good]))

        def call(request: controller_pb2.DetectRequest) -> None:
            try:
                stub.Detect(request, timeout=120)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc

        threads = [threading.Thread(target=call, args=(request,)) for request in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)


def _scrape(address: str) -> set[str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_adapter_alert_rules_and_dashboard_name_is_in_a_live_scrape(
    model_dir, clip_weights, data_dir, tmp_path
):
    stages = Stages.start(stage_env(model_dir, clip_weights.parent, INFERLINE_MODELS="yolov8n"), tmp_path / "logs")
    try:
        _send_requests(stages.target("controller"), (data_dir / "shapes_01.jpg").read_bytes())
        scraped = set().union(*(_scrape(stages.metrics_target(stage)) for stage in STAGES))
    finally:
        stages.stop()
    missing = {
        where: sorted(names - scraped - GPU_ONLY) for where, names in named_metrics().items()
    }
    assert missing == {where: [] for where in missing}, missing
