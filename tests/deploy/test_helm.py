"""helm/inferline: lints, renders valid Kubernetes 1.35 objects for the default, GPU, TLS,
autoscaling and gateway-ingress values, refuses bad values, and its rendered Deployments (the HTTP
gateway's too) run under `podman kube play` and serve Detect over gRPC and HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import (
    CHART,
    REPO,
    assert_detects_shapes,
    assert_detects_shapes_json,
    detect,
    free_port,
    http_detect,
    install,
    podman,
    render_chart,
    run,
    wait_http,
)

pytestmark = pytest.mark.slow

VALUES = {"default": None, "gpu": CHART / "ci" / "gpu-values.yaml", "tls": CHART / "ci" / "tls-values.yaml",
          "autoscaling": CHART / "ci" / "autoscaling-values.yaml", "gateway": CHART / "ci" / "gateway-values.yaml"}
OPERATOR_APIS = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                 "--api-versions", "monitoring.coreos.com/v1/PrometheusRule"]




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
    docs = render_chart(helm, *args)
    manifest = tmp_path / "rendered.yaml"
    # CRD kinds (cert-manager, Prometheus Operator) have no built-in schema; they are checked below.
    crds = {"Certificate", "ServiceMonitor", "PrometheusRule"}
    manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in crds]))
    validate = str(Path(install("install-pytools.sh")) / "kubernetes-validate")
    done = run([validate, "--strict", "-k", "1.35.0", str(manifest)])
    assert "failed" not in done.stdout + done.stderr
    deployments = _by_kind(docs, "Deployment")
    components = sorted(d.split("-")[-1] for d in deployments)
    assert components == ["controller", "gateway", "inference", "postprocess", "preprocess"]
    assert len(_by_kind(docs, "Service")) == 5 and len(_by_kind(docs, "PodDisruptionBudget")) == 5
    _assert_gateway(docs, name)
    stages = {k: v for k, v in deployments.items() if not k.endswith("-gateway")}
    for deployment in stages.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
        probe = container["readinessProbe"]
        assert ("exec" in probe) if name == "tls" else (probe["grpc"]["port"] == container["ports"][0]["containerPort"])
        if name != "tls":
            # Liveness asks a health name the stage registers: its service's (the inference
            # stage's is Triton's, which names no stage).
            stage = container["name"] if "name" in container else ""
            served = {"inference": "inference.GRPCInferenceService"}.get(
                stage, f"inferline.v1.{stage.title()}Service"
            )
            assert container["livenessProbe"]["grpc"]["service"] == served, stage
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
        assert {"name": "INFERLINE_TLS_CA_FILE",
                "value": "/etc/inferline/tls/ca.crt"} in inference["containers"][0]["env"]
        assert any(v.get("secret", {}).get("secretName") == "inferline-tls" for v in inference["volumes"])
    if name == "autoscaling":
        hpas = _by_kind(docs, "HorizontalPodAutoscaler")
        assert len(hpas) == 5 and hpas["t-inferline-gateway"]["spec"]["scaleTargetRef"]["name"] == "t-inferline-gateway"
        metrics = hpas["t-inferline-inference"]["spec"]["metrics"]
        assert [m["type"] for m in metrics] == ["Resource", "Pods", "Pods"]
        assert all("replicas" not in d["spec"] for d in deployments.values())
    policies = _by_kind(docs, "NetworkPolicy")
    for stage in ("preprocess", "inference", "postprocess"):  # the controller only (and `helm test`), never the gateway
        stage_from = policies[f"t-inferline-{stage}"]["spec"]["ingress"][0]["from"]
        components = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in stage_from]
        assert components == ["controller", "helm-test"], components


def _component(peer: dict) -> str | None:
    return peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")


def _assert_gateway(docs: list[dict], name: str) -> None:
    """The gateway: HTTP probes on its port, the chart's pod security, the controller's Service as
    its target, reachable by its callers, and able to reach the controller whatever controllerFrom says."""
    deployment = _by_kind(docs, "Deployment")["t-inferline-gateway"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/inferline/inferline-gateway:0.1.0"  # the published image
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["INFERLINE_CONTROLLER_TARGET"] == "dns:///t-inferline-controller.default.svc:50051"
    assert env["INFERLINE_GATEWAY_PORT"] == "8080" and env["INFERLINE_STAGE"] == "gateway"
    assert ("INFERLINE_TLS_CA_FILE" in env) is (name == "tls-controller")  # only when the controller listens with TLS
    service = _by_kind(docs, "Service")["t-inferline-gateway"]["spec"]
    assert service["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP",
                                 "appProtocol": "http"}]
    policies = _by_kind(docs, "NetworkPolicy")
    gateway_in = policies["t-inferline-gateway"]["spec"]["ingress"]
    assert gateway_in[0]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    controller_from = policies["t-inferline-controller"]["spec"]["ingress"][0].get("from")
    ingresses = _by_kind(docs, "Ingress")
    if name == "gateway":
        assert deployment["spec"]["replicas"] == 3 and env["INFERLINE_GATEWAY_MAX_UPLOAD_MB"] == "16"
        assert [_component(peer) for peer in controller_from] == [None, "gateway"]
        assert [_component(peer) for peer in gateway_in[0]["from"]] == [None, "helm-test"]
        ingress = ingresses["t-inferline-gateway"]["spec"]
        assert ingress["ingressClassName"] == "nginx" and ingress["tls"][0]["secretName"] == "inferline-gateway-tls"
        [rule] = ingress["rules"]
        assert rule["host"] == "inferline.example.com"
        assert rule["http"]["paths"][0]["backend"]["service"] == {
            "name": "t-inferline-gateway",
            "port": {"name": "http"},
        }
    else:
        assert controller_from is None and "from" not in gateway_in[0]  # open by default
        assert not ingresses, "the Ingress is off by default"
    if name != "tls-controller":  # rendered with the Prometheus Operator's APIs
        monitor = _by_kind(docs, "ServiceMonitor")["t-inferline"]["spec"]["endpoints"]
        assert {"port": "http", "path": "/metrics"}.items() <= monitor[1].items()


def test_gateway_off_renders_none_of_its_objects(helm):
    docs = render_chart(helm, "--set", "gateway.enabled=false", "--set", "autoscaling.enabled=true", *OPERATOR_APIS)
    assert not [d["metadata"]["name"] for d in docs if d["metadata"]["name"].endswith("-gateway")]
    assert len(_by_kind(docs, "Deployment")) == 4 and len(_by_kind(docs, "HorizontalPodAutoscaler")) == 4
    assert [e["port"] for e in _by_kind(docs, "ServiceMonitor")["t-inferline"]["spec"]["endpoints"]] == ["metrics"]
    test_pod = _by_kind(docs, "Pod")["t-inferline-test-detect"]
    assert "GATEWAY_URL" not in {e["name"] for e in test_pod["spec"]["containers"][0]["env"]}


def test_gateway_dials_a_tls_controller_with_the_release_certificate(helm):
    docs = render_chart(helm, "-f", str(VALUES["tls"]), "--set", "tls.controllerListener=true")
    _assert_gateway(docs, "tls-controller")
    pod = _by_kind(docs, "Deployment")["t-inferline-gateway"]["spec"]["template"]["spec"]
    assert {"name": "tls", "mountPath": "/etc/inferline/tls", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def _env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_prices_in_the_values_reach_every_stage_and_none_is_set_by_default(helm):
    prices = ["--set", "cost.perCoreHour=0.04", "--set", "cost.perGpuHour=2.5"]
    priced = _by_kind(render_chart(helm, *prices), "Deployment")
    stages = {name: d for name, d in priced.items() if not name.endswith("gateway")}
    assert len(stages) == 4
    for name, deployment in stages.items():
        env = _env_of(deployment)
        assert (env["INFERLINE_COST_PER_CORE_HOUR"], env["INFERLINE_COST_PER_GPU_HOUR"]) == ("0.04", "2.5"), name
    for deployment in _by_kind(render_chart(helm), "Deployment").values():
        assert not {"INFERLINE_COST_PER_CORE_HOUR", "INFERLINE_COST_PER_GPU_HOUR"} & set(_env_of(deployment))


def test_stage_services_are_headless_and_their_callers_dial_them_by_dns(helm):
    """Each channel balances over every pod only if DNS lists them all (issue 18)."""
    docs = render_chart(helm, "--namespace", "prod")
    services, deployments = _by_kind(docs, "Service"), _by_kind(docs, "Deployment")
    stages = {"controller": 50051, "preprocess": 50052, "inference": 50053, "postprocess": 50054}
    for stage in stages:
        assert services[f"t-inferline-{stage}"]["spec"]["clusterIP"] == "None", stage
    assert "clusterIP" not in services["t-inferline-gateway"]["spec"]  # the user-facing one stays normal
    controller = _env_of(deployments["t-inferline-controller"])
    for stage in ("preprocess", "inference", "postprocess"):
        assert controller[f"INFERLINE_{stage.upper()}_TARGET"] == f"dns:///t-inferline-{stage}.prod.svc:{stages[stage]}"
    gateway = _env_of(deployments["t-inferline-gateway"])
    assert gateway["INFERLINE_CONTROLLER_TARGET"] == "dns:///t-inferline-controller.prod.svc:50051"


def test_a_clusterip_controller_service_is_there_on_request_and_clusterip_stages_are_dialled_by_name(helm):
    docs = render_chart(helm, "--set", "service.controllerClusterIP=true")
    extra = _by_kind(docs, "Service")["t-inferline-controller-clusterip"]["spec"]
    assert extra["type"] == "ClusterIP" and [p["name"] for p in extra["ports"]] == ["grpc"]  # scraped once
    docs = render_chart(helm, "--set", "service.headless=false")
    assert all(s["spec"].get("clusterIP") != "None" for s in _by_kind(docs, "Service").values())
    controller = _env_of(_by_kind(docs, "Deployment")["t-inferline-controller"])
    assert controller["INFERLINE_INFERENCE_TARGET"] == "t-inferline-inference:50053"


def _adapter_rules() -> list[dict]:
    return yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]


def test_every_hpa_pod_metric_is_served_by_a_shipped_adapter_rule(helm):
    docs = render_chart(helm, "-f", str(VALUES["autoscaling"]))
    wanted = {
        name: [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        for name, hpa in _by_kind(docs, "HorizontalPodAutoscaler").items()
    }
    assert wanted["t-inferline-inference"] == ["inferline_model_busy_ratio", "inferline_queue_depth"]
    assert wanted["t-inferline-preprocess"] == wanted["t-inferline-postprocess"] == ["inferline_rpc_latency_seconds"]
    assert wanted["t-inferline-controller"] == wanted["t-inferline-gateway"] == []
    served = {rule["name"]["as"] for rule in _adapter_rules()}
    assert {name for names in wanted.values() for name in names} <= served
    for rule in _adapter_rules():
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    deployment_doc = (REPO / "docs" / "deployment.md").read_text()
    assert "inferline_inference_queue_depth" not in deployment_doc
    assert "files/prometheus-adapter-rules.yaml" in deployment_doc


def test_operator_objects_only_where_the_operator_is_installed(helm):
    kinds = {d["kind"] for d in render_chart(helm)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "Certificate"}


@pytest.mark.parametrize("bad, message", [
    ("stages.controller.port=0", "/stages/controller/port"),
    ("models.names=null", "models"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("gateway.port=70000", "/gateway/port"),
    ("gateway.ingress.pathType=Any", "/gateway/ingress/pathType"),
    ("cost.perGpuHour=two", "/cost/perGpuHour"),
])
def test_bad_values_are_refused_naming_the_value(helm, bad, message):
    done = run([helm, "template", "t", str(CHART), "--set", bad], check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_rendered_deployments_run_under_podman_kube_play_and_serve_detect(
    helm, images, onnx_models, shapes_image, tmp_path
):
    """Pods on the host network (podman kube play has no cluster DNS for Services), each stage and
    the gateway on a free port, the weights folder as a hostPath volume, the model repository from
    the ConfigMap; Detect through the controller (gRPC) and through the gateway (HTTP)."""
    ports = {stage: free_port() for stage in ("controller", "preprocess", "inference", "postprocess")}
    release = f"kp{ports['controller']}"
    values = {
        "hostNetwork": True,
        "image": {"registry": "localhost"},  # the images `make images` built, not the published ones
        "stages": {stage: {"port": port, "metricsPort": free_port(), "replicas": 1} for stage, port in ports.items()},
        "controllerTargets": {
            stage: f"127.0.0.1:{ports[stage]}" for stage in ("preprocess", "inference", "postprocess")
        },
        "models": {"names": ["yolov8n"], "volume": {"hostPath": {"path": str(onnx_models), "type": "Directory"}},
                   "fetch": {"enabled": False}},  # the weights are on the host (test_storage_deploy.py fetches them)
        "gateway": {"port": free_port(), "replicas": 1, "controllerTarget": f"127.0.0.1:{ports['controller']}"},
    }
    gateway = f"http://127.0.0.1:{values['gateway']['port']}"
    (tmp_path / "values.json").write_text(json.dumps(values))
    out = run([helm, "template", release, str(CHART), "-f", str(tmp_path / "values.json"),
               "--show-only", "templates/deployment.yaml", "--show-only", "templates/gateway-deployment.yaml",
               "--show-only", "templates/configmap-models.yaml"]).stdout
    play = tmp_path / "play.yaml"
    play.write_text(out)
    try:
        podman("kube", "play", str(play), timeout=300)
        assert_detects_shapes(detect(f"127.0.0.1:{ports['controller']}", shapes_image, timeout=180))
        assert '"ready"' in wait_http(f"{gateway}/readyz", timeout=60)
        assert_detects_shapes_json(http_detect(gateway, shapes_image, timeout=60))
        pods = podman("pod", "ps", "--filter", f"name={release}", "--format",
                      "{{.Name}} {{.Status}}").stdout.split("\n")
        assert sum("Running" in p for p in pods) == 5, pods
        _run_helm_test_pod(helm, release, tmp_path / "values.json", ports, gateway)
    finally:
        podman("kube", "down", str(play), check=False, timeout=120)
        podman("volume", "rm", "-f", f"{release}-inferline-models", check=False)


def _run_helm_test_pod(helm: str, release: str, values: Path, ports: dict[str, int], gateway: str) -> None:
    """The chart's `helm test` pod, its own container and script, with the Service names it would
    dial replaced by the host ports (no Service DNS under podman)."""
    pod = yaml.safe_load(run([helm, "template", release, str(CHART), "-f", str(values),
                              "--show-only", "templates/tests/test-detect.yaml"]).stdout)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    for stage, port in ports.items():
        env[f"TARGET_{stage.upper()}"] = f"127.0.0.1:{port}"
    assert env["GATEWAY_URL"].startswith(f"http://{release}-inferline-gateway:")
    env["GATEWAY_URL"] = gateway
    args = ["run", "--rm", "--network", "host", "--read-only", "--user", "10001:10001"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    done = podman(*args, container["image"], *container["command"], timeout=300)
    assert "inference 127.0.0.1" in done.stdout and f"Detect {env['MODEL']} 1:" in done.stdout, done.stdout
    assert f"gateway {gateway}: POST /v1/detect" in done.stdout, done.stdout
