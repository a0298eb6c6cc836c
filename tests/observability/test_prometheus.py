"""A real Prometheus scrapes a live stack under load; every dashboard query and every rule
answers; promtool accepts and unit-tests the rules; a killed stage pages through a real
Alertmanager to a webhook.

Prometheus, promtool and Alertmanager come from deploy/tools/install-prometheus.sh (Debian
packages); when it cannot install them the test fails. Scrapes and rule evaluations run every
second and every ``for:`` is cut to 1 s (a copy of the real rule file), so the whole module
takes well under a minute once the tools are installed.
"""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest
import yaml

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.common.telemetry.metrics import register_gpu_metrics
from tests.observability.harness import (
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    RULES,
    Alertmanager,
    Prometheus,
    Stages,
    Webhook,
    dashboard_queries,
    install_prometheus,
    stage_env,
    wait_for,
)

pytestmark = pytest.mark.slow

LOAD_SECONDS = 12.0


def _is_gpu_query(expr: str) -> bool:
    return "inferline_gpu_" in expr or "inferline:gpu_memory" in expr


@pytest.fixture(scope="module")
def tools():
    return install_prometheus()


def drive_load(target: str, images: list[bytes], seconds: float, workers: int = 3) -> dict[str, int]:
    """Detect calls from a few threads: mostly good, some for an unknown model (NOT_FOUND) and
    some with a broken image (a per-item INVALID_ARGUMENT)."""
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            n = index
            while time.monotonic() < stop_at:
                n += 1
                batch = [types_pb2.Image(name="scene.jpg", data=images[n % len(images)])]
                if n % 7 == 0:
                    batch.append(types_pb2.Image(name="broken.jpg", data=b"not an image"))
                model = "no-such-model" if n % 11 == 0 else "yolov8n"
                try:
                    stub.Detect(controller_pb2.DetectRequest(model=model, images=batch), timeout=60)
                    key = "ok"
                except grpc.RpcError:
                    key = "failed"
                with lock:
                    counts[key] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


@pytest.fixture(scope="module")
def monitored(tools, model_dir, clip_weights, data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    stages = Stages.start(stage_env(model_dir, clip_weights.parent, INFERLINE_MODELS="yolov8n"), work / "logs")
    webhook = Webhook()
    processes = []
    try:
        alertmanager = Alertmanager(tools, webhook, work)
        processes.append(alertmanager)
        prometheus = Prometheus(tools, stages, work, alertmanager=alertmanager.target)
        processes.append(prometheus)
        wait_for(lambda: len([t for t in prometheus.query('up{job=~"inferline-.*"} == 1')]) == 4, 30,
                 "Prometheus to scrape all four stages")
        images = [p.read_bytes() for p in sorted(data_dir.glob("*.jpg"))[:4]]
        counts = drive_load(stages.target("controller"), images, LOAD_SECONDS)
        assert counts["ok"] > 10 and counts["failed"] > 0, counts
        time.sleep(3)  # a few more scrapes and evaluations after the last call
        yield prometheus, stages, webhook
    finally:
        for process in reversed(processes):
            process.stop()
        webhook.stop()
        stages.stop()


def test_promtool_accepts_the_rules_config_and_passes_the_rule_unit_tests(tools):
    checked = subprocess.run([tools.promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tools.promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    config = subprocess.run([tools.promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_dashboard_panel_query_returns_data_from_the_live_stack(monitored):
    prometheus, _, _ = monitored
    gpu = register_gpu_metrics()
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        result = prometheus.query(expr)
        if _is_gpu_query(expr) and not gpu:
            assert result == [], f"{title}: GPU series on a machine without a GPU: {expr}"
        elif not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_recording_rule_returns_data_and_every_rule_evaluates_cleanly(monitored):
    prometheus, _, _ = monitored
    gpu = register_gpu_metrics()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    recorded = [r["record"] for g in groups for r in g["rules"] if "record" in r]
    empty = [
        name
        for name in recorded
        if not prometheus.query(name) and not (name.startswith("inferline:gpu_memory") and not gpu)
    ]
    assert not empty, f"recording rules without data: {empty}"
    loaded = prometheus.rules()
    assert len(loaded) == sum(len(g["rules"]) for g in groups)
    unhealthy = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not unhealthy


def test_the_latency_and_error_series_reflect_the_load(monitored):
    prometheus, _, _ = monitored
    p95 = prometheus.query('inferline:rpc_latency_seconds:p95_5m{service="controller",method="Detect"}')
    assert 0 < float(p95[0]["value"][1]) < 60
    refused = prometheus.query('inferline:rpc_requests:rate5m{service="controller",method="Detect",code="NOT_FOUND"}')
    assert float(refused[0]["value"][1]) > 0
    # NOT_FOUND is the caller's mistake: it must not count against the error budget.
    assert float(prometheus.query("inferline:rpc_errors:ratio_rate5m")[0]["value"][1]) == 0


def test_a_killed_stage_fires_stage_down_and_pages_through_alertmanager(monitored):
    prometheus, stages, webhook = monitored
    stages.kill("preprocess")
    fired = wait_for(
        lambda: [a for a in prometheus.firing()
                 if a["labels"]["alertname"] == "InferlineStageDown" and a["labels"]["job"] == "inferline-preprocess"],
        60, "InferlineStageDown for inferline-preprocess to fire in Prometheus",
    )
    assert fired[0]["labels"]["severity"] == "page"
    paged = wait_for(
        lambda: [(path, a) for path, a in webhook.alerts()
                 if a["labels"]["alertname"] == "InferlineStageDown" and a["status"] == "firing"],
        60, "Alertmanager to deliver InferlineStageDown to the webhook",
    )
    path, alert = paged[0]
    assert path == "/inferline/page"
    assert alert["labels"]["job"] == "inferline-preprocess"
    assert "inferline-preprocess" in alert["annotations"]["summary"]
    others = {a["labels"]["job"] for _, a in webhook.alerts() if a["labels"]["alertname"] == "InferlineStageDown"}
    assert others == {"inferline-preprocess"}, "only the killed stage is reported down"
