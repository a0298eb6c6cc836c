"""deploy/compose.yaml: the whole file validates with every profile, and podman-compose brings up
the four inferline services and the HTTP gateway from it, which answer Detect over gRPC and HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import (
    REPO,
    assert_detects_shapes,
    assert_detects_shapes_json,
    detect,
    free_port,
    http_detect,
    install,
    run,
    wait_http,
)

pytestmark = pytest.mark.slow

COMPOSE = REPO / "deploy" / "compose.yaml"
INFERLINE = {"controller", "preprocess", "inference", "postprocess", "gateway"}
STAGES = INFERLINE - {"gateway"}
OFFLINE_UNAVAILABLE = {"prometheus", "alertmanager", "grafana", "otel-collector", "jaeger"}


def _compose(container_tools: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    tools_bin = Path(install("install-pytools.sh"))
    return run([str(tools_bin / "podman-compose"), "-f", str(COMPOSE), *args],
               env=dict(os.environ, **(env or {})), cwd=COMPOSE.parent, timeout=timeout)


def test_the_whole_file_validates_with_every_profile(container_tools):
    rendered = yaml.safe_load(_compose(container_tools, "--profile", "observability", "--profile", "gpu",
                                       "config").stdout)
    services = rendered["services"]
    assert set(services) == INFERLINE | OFFLINE_UNAVAILABLE | {"inference-gpu"}
    for name, service in services.items():
        assert service["image"], name
        limits = service["deploy"]["resources"]["limits"]
        assert limits["memory"] and limits["cpus"], name
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in OFFLINE_UNAVAILABLE:
        assert raw[name]["profiles"] == ["observability"], f"{name} must stay out of the default services"
    assert raw["inference-gpu"]["profiles"] == ["gpu"]
    gpu = raw["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    for stage in STAGES - {"controller"}:
        assert raw["controller"]["depends_on"][stage] == {"condition": "service_healthy"}
    for name in INFERLINE:
        assert raw[name]["read_only"] is True and raw[name]["cap_drop"] == ["ALL"]
    assert any(v.endswith(":/models:ro") for v in raw["inference"]["volumes"])
    gateway = services["gateway"]
    assert gateway["depends_on"]["controller"]["condition"] == "service_healthy"
    assert gateway["environment"]["INFERLINE_CONTROLLER_TARGET"] == "controller:50051"
    assert raw["gateway"]["ports"] == ["${INFERLINE_GATEWAY_HOST_PORT:-8080}:8080"]
    # The image's health check, which speaks HTTP for INFERLINE_STAGE=gateway.
    assert gateway["environment"]["INFERLINE_STAGE"] == "gateway"
    assert gateway["healthcheck"]["test"][-1] == "/opt/inferline/healthcheck.py"
    collector = yaml.safe_load((COMPOSE.parent / "compose" / "otel-collector.yaml").read_text())
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"


def test_compose_up_serves_detect_over_grpc_and_through_the_gateway(container_tools, images, onnx_models, shapes_image):
    port, http_port = free_port(), free_port()
    env = {"INFERLINE_MODEL_VOLUME": str(onnx_models), "INFERLINE_CONTROLLER_HOST_PORT": str(port),
           "INFERLINE_GATEWAY_HOST_PORT": str(http_port), "COMPOSE_PROJECT_NAME": f"inferline-test-{port}"}
    try:
        _compose(container_tools, "-p", env["COMPOSE_PROJECT_NAME"], "up", "-d", env=env)
        # podman 4.3 ignores `condition: service_healthy` (podman-compose says so); the
        # controller answers UNAVAILABLE until the stages are up, and detect() retries on that.
        assert_detects_shapes(detect(f"127.0.0.1:{port}", shapes_image, timeout=180))
        gateway = f"http://127.0.0.1:{http_port}"
        assert '"ready"' in wait_http(f"{gateway}/readyz", timeout=60)
        assert_detects_shapes_json(http_detect(gateway, shapes_image, timeout=60))
    finally:
        _compose(container_tools, "-p", env["COMPOSE_PROJECT_NAME"], "down", "-t", "5", env=env)


def test_compose_and_helm_use_the_observability_rules_and_jobs():
    """One rule file: the chart's copy is the one Prometheus loads locally and in Compose, and
    Compose's Prometheus scrapes the four services and the gateway under the job names the alerts use."""
    rules = REPO / "deploy" / "prometheus" / "rules" / "inferline.rules.yaml"
    assert (REPO / "helm" / "inferline" / "files" / "prometheus-rules.yaml").read_text() == rules.read_text()
    config = yaml.safe_load((COMPOSE.parent / "compose" / "prometheus.yml").read_text())
    local = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == local["rule_files"]
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    ports = {"controller": 9101, "preprocess": 9102, "inference": 9103, "postprocess": 9104, "gateway": 8080}
    assert jobs == {f"inferline-{stage}": [f"{stage}:{port}"] for stage, port in ports.items()}
    mounts = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]["volumes"]
    assert "./compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
