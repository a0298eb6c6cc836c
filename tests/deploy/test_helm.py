"""helm/inferline: lints, renders valid Kubernetes 1.35 objects for the default, GPU, TLS and
autoscaling values, refuses bad values, and its rendered Deployments run under `podman kube play`
and serve Detect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import REPO, assert_detects_shapes, detect, free_port, install, podman, run

pytestmark = pytest.mark.slow

CHART = REPO / "helm" / "inferline"
VALUES = {"default": None, "gpu": CHART / "ci" / "gpu-values.yaml", "tls": CHART / "ci" / "tls-values.yaml",
          "autoscaling": CHART / "ci" / "autoscaling-values.yaml"}
OPERATOR_APIS = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                 "--api-versions", "monitoring.coreos.com/v1/PrometheusRule"]


@pytest.fixture(scope="module")
def helm() -> str:
    return install("install-helm.sh")


def _render(helm: str, *args: str) -> list[dict]:
    out = run([helm, "template", "t", str(CHART), *args]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_helm_lint_passes_with_every_values_file(helm):
    run([helm, "lint", "--strict", str(CHART)])
    for values in VALUES.values():
        if values:
            run([helm, "lint", "--strict", str(CHART), "-f", str(values)])


@pytest.mark.parametrize("name", list(VALUES))
def test_rendered_objects_are_valid_for_kubernetes_1_35(helm, name, tmp_path):
    args = (["-f", str(VALUES[name])] if VALUES[name] else []) + OPERATOR_APIS
    docs = _render(helm, *args)
    manifest = tmp_path / "rendered.yaml"
    # CRD kinds (cert-manager, Prometheus Operator) have no built-in schema; they are checked below.
    crds = {"Certificate", "ServiceMonitor", "PrometheusRule"}
    manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in crds]))
    validate = str(Path(install("install-pytools.sh")) / "kubernetes-validate")
    done = run([validate, "--strict", "-k", "1.35.0", str(manifest)])
    assert "failed" not in done.stdout + done.stderr
    deployments = _by_kind(docs, "Deployment")
    assert sorted(d.split("-")[-1] for d in deployments) == ["controller", "inference", "postprocess", "preprocess"]
    assert len(_by_kind(docs, "Service")) == 4 and len(_by_kind(docs, "PodDisruptionBudget")) == 4
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
        probe = container["readinessProbe"]
        assert ("exec" in probe) if name == "tls" else (probe["grpc"]["port"] == container["ports"][0]["containerPort"])
    inference = deployments["t-inferline-inference"]["spec"]["template"]["spec"]
    limits = inference["containers"][0]["resources"]["limits"]
    rule = _by_kind(docs, "PrometheusRule")["t-inferline"]
    assert "InferlineStageDown" in [r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]]
    assert _by_kind(docs, "ServiceMonitor")["t-inferline"]["spec"]["endpoints"][0]["port"] == "metrics"
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert {"name": "INFERLINE_DEVICE", "value": "cuda"} in inference["containers"][0]["env"]
    else:
        assert "nvidia.com/gpu" not in limits
    if name == "tls":
        certificate = _by_kind(docs, "Certificate")["t-inferline-tls"]["spec"]
        assert certificate["secretName"] == "inferline-tls" and "localhost" in certificate["dnsNames"]
        assert "t-inferline-inference.default.svc" in certificate["dnsNames"]
        controller_env = deployments["t-inferline-controller"]["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "INFERLINE_TLS_SERVE", "value": "false"} in controller_env
        assert {"name": "INFERLINE_TLS_CA_FILE", "value": "/etc/inferline/tls/ca.crt"} in inference["containers"][0]["env"]
        assert any(v.get("secret", {}).get("secretName") == "inferline-tls" for v in inference["volumes"])
    if name == "autoscaling":
        hpas = _by_kind(docs, "HorizontalPodAutoscaler")
        assert len(hpas) == 4
        metrics = hpas["t-inferline-inference"]["spec"]["metrics"]
        assert [m["type"] for m in metrics] == ["Resource", "Pods"]
        assert all("replicas" not in d["spec"] for d in deployments.values())
    policies = _by_kind(docs, "NetworkPolicy")
    stage_from = policies["t-inferline-inference"]["spec"]["ingress"][0]["from"]
    assert stage_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"


def test_operator_objects_only_where_the_operator_is_installed(helm):
    kinds = {d["kind"] for d in _render(helm)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "Certificate"}


@pytest.mark.parametrize("bad, message", [
    ("stages.controller.port=0", "/stages/controller/port"),
    ("models.names=null", "models"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
])
def test_bad_values_are_refused_naming_the_value(helm, bad, message):
    done = run([helm, "template", "t", str(CHART), "--set", bad], check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_rendered_deployments_run_under_podman_kube_play_and_serve_detect(helm, images, onnx_models, shapes_image, tmp_path):
    """Pods on the host network (podman kube play has no cluster DNS for Services), each stage on
    a free port, the weights folder as a hostPath volume, the model repository from the ConfigMap."""
    ports = {stage: free_port() for stage in ("controller", "preprocess", "inference", "postprocess")}
    release = f"kp{ports['controller']}"
    values = {
        "hostNetwork": True,
        "stages": {stage: {"port": port, "metricsPort": free_port(), "replicas": 1} for stage, port in ports.items()},
        "controllerTargets": {stage: f"127.0.0.1:{ports[stage]}" for stage in ("preprocess", "inference", "postprocess")},
        "models": {"names": ["yolov8n"], "volume": {"hostPath": {"path": str(onnx_models), "type": "Directory"}}},
    }
    (tmp_path / "values.json").write_text(json.dumps(values))
    out = run([helm, "template", release, str(CHART), "-f", str(tmp_path / "values.json"),
               "--show-only", "templates/deployment.yaml", "--show-only", "templates/configmap-models.yaml"]).stdout
    play = tmp_path / "play.yaml"
    play.write_text(out)
    try:
        podman("kube", "play", str(play), timeout=300)
        assert_detects_shapes(detect(f"127.0.0.1:{ports['controller']}", shapes_image, timeout=180))
        pods = podman("pod", "ps", "--filter", f"name={release}", "--format", "{{.Name}} {{.Status}}").stdout.split("\n")
        assert sum("Running" in p for p in pods) == 4, pods
        _run_helm_test_pod(helm, release, tmp_path / "values.json", ports)
    finally:
        podman("kube", "down", str(play), check=False, timeout=120)
        podman("volume", "rm", "-f", f"{release}-inferline-models", check=False)


def _run_helm_test_pod(helm: str, release: str, values: Path, ports: dict[str, int]) -> None:
    """The chart's `helm test` pod, its own container and script, with the Service names it would
    dial replaced by the host ports (no Service DNS under podman)."""
    pod = yaml.safe_load(run([helm, "template", release, str(CHART), "-f", str(values),
                              "--show-only", "templates/tests/test-detect.yaml"]).stdout)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    for stage, port in ports.items():
        env[f"TARGET_{stage.upper()}"] = f"127.0.0.1:{port}"
    args = ["run", "--rm", "--network", "host", "--read-only", "--user", "10001:10001"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    done = podman(*args, container["image"], *container["command"], timeout=300)
    assert "inference 127.0.0.1" in done.stdout and f"Detect {env['MODEL']} 1:" in done.stdout, done.stdout
