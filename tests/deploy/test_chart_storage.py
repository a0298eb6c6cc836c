"""helm/inferline, issue 18: every values file in ci/ renders objects valid for Kubernetes 1.35;
the default install fetches the official weights with an init container; pvc:// sources,
credentials, a PVC cache and the chart conventions (name overrides, spread, priority, extra
environment and volumes, service account annotations) render as documented; the release
workflow builds both platforms and `helm package` works."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import CHART, REPO, install, render_chart, run

pytestmark = pytest.mark.slow

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
OPERATOR_APIS = [
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
]
CRDS = {"Certificate", "ServiceMonitor", "PrometheusRule"}
YOLO_SHA256 = "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36"




def _one(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.stem if v else "default")
def test_every_values_file_renders_valid_kubernetes_1_35_objects(helm, values, tmp_path):
    docs = render_chart(helm, *(["-f", str(values)] if values else []), *OPERATOR_APIS)
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in CRDS]))
    validate = str(Path(install("install-pytools.sh")) / "kubernetes-validate")
    done = run([validate, "--strict", "-k", "1.35.0", str(manifest)])
    assert "failed" not in done.stdout + done.stderr
    run([helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else [])])


def test_default_install_fetches_the_official_weights_from_ghcr_images(helm):
    docs = render_chart(helm)
    pod = _one(docs, "Deployment", "t-inferline-inference")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == "fetch-models" and init["args"] == ["inferline", "fetch-models"]
    assert init["image"].startswith("ghcr.io/inferline/inferline-inference-torch:")
    assert pod["containers"][0]["image"].startswith("ghcr.io/inferline/inferline-inference-onnx:")
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["INFERLINE_MODEL_DIR"] == "/models" and env["INFERLINE_FETCH_ATTEMPTS"] == "0"
    sources = yaml.safe_load(_one(docs, "ConfigMap", "t-inferline-models")["data"]["sources.yaml"])
    assert sources == {
        "yolov8n": {
            "uri": "https://github.com/ultralytics/assets/releases/download/v8.4.0/yolov8n.pt",
            "sha256": YOLO_SHA256,
            "export": "onnx",
        }
    }
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and "readOnly" not in mounts["models"]
    stage_mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert stage_mounts["models"]["readOnly"] is True
    cache = next(v for v in pod["volumes"] if v["name"] == "models")
    assert cache == {"name": "models", "emptyDir": {"sizeLimit": "1Gi"}}
    assert all(
        d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("ghcr.io/inferline/")
        for d in docs
        if d["kind"] == "Deployment"
    )


def test_storage_values_mount_pvc_sources_credentials_and_a_pvc_cache(helm):
    docs = render_chart(helm, "-f", str(CHART / "ci" / "storage-values.yaml"))
    pod = _one(docs, "Deployment", "ml-inference")["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "fetch-models")
    assert init["image"] == "registry.example.com/ml/inferline-inference-onnx:0.1.0"
    assert {"secretRef": {"name": "model-store-credentials"}} in init["envFrom"]
    assert {"name": "pvc-offline-models", "mountPath": "/mnt/pvc/offline-models", "readOnly": True} in init[
        "volumeMounts"
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pvc-offline-models"]["persistentVolumeClaim"] == {"claimName": "offline-models", "readOnly": True}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "inferline-model-cache"}
    sources = yaml.safe_load(_one(docs, "ConfigMap", "ml-models")["data"]["sources.yaml"])
    assert sorted(sources) == ["yolov8n", "yolov8n-seg"], "only the models the stage loads are fetched"
    assert "export" not in sources["yolov8n"], "a source replaces the default's keys (a list, not a map)"


def test_chart_conventions_reach_every_pod(helm):
    docs = render_chart(helm, "-f", str(CHART / "ci" / "storage-values.yaml"))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert sorted(d["metadata"]["name"] for d in deployments) == [
        "ml-controller",
        "ml-gateway",
        "ml-inference",
        "ml-postprocess",
        "ml-preprocess",
    ]
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert pod["priorityClassName"] == "inferline-serving"
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        container = pod["containers"][0]
        assert any(e["name"] == "NODE_NAME" and "valueFrom" in e for e in container["env"])
        assert {"configMapRef": {"name": "inferline-site"}} in container["envFrom"]
        assert {"name": "site-ca", "mountPath": "/etc/ssl/site", "readOnly": True} in container["volumeMounts"]
        assert any(v["name"] == "site-ca" for v in pod["volumes"])
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/inferline-models")
    overridden = render_chart(helm, "--set", "nameOverride=detector")
    names = {d["metadata"]["name"] for d in overridden if d["kind"] == "Deployment"}
    assert "t-detector-inference" in names
    labels = next(d for d in overridden if d["kind"] == "Deployment")["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "detector"


def test_fetching_off_leaves_no_init_container_and_no_sources(helm):
    docs = render_chart(helm, "--set", "models.fetch.enabled=false")
    pod = _one(docs, "Deployment", "t-inferline-inference")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "sources.yaml" not in _one(docs, "ConfigMap", "t-inferline-models")["data"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("models.sources[0].uri=oci://ghcr.io/x/y", "/models/sources/0/uri"),
        ("models.sources[0].sha256=abc", "/models/sources/0/sha256"),
        ("models.sources[0].export=tflite", "/models/sources/0/export"),
        ("topologySpreadConstraints[0].maxSkew=0", "/topologySpreadConstraints/0"),
    ],
)
def test_bad_storage_values_are_refused_naming_the_value(helm, bad, message):
    done = run([helm, "template", "t", str(CHART), "--set", bad], check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_release_workflow_builds_both_platforms_signs_and_pushes_the_chart():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*.*.*"]  # YAML 1.1 reads the key `on` as True
    images = workflow["jobs"]["images"]
    assert images["permissions"]["id-token"] == "write" and images["permissions"]["packages"] == "write"
    matrix = images["strategy"]["matrix"]["include"]
    built = {m["image"] for m in matrix}
    targets = set(run(["sed", "-n", "s/^FROM runtime AS \\(.*\\)$/\\1/p", "deploy/docker/Dockerfile"]).stdout.split())
    assert targets <= built and "inference-cuda" in built
    for entry in matrix:
        if entry["image"] != "inference-cuda":
            assert entry["platforms"].split(",") == ["linux/amd64", "linux/arm64"], entry
    uses = [step.get("uses", "") for step in images["steps"]]
    assert any(u.startswith("docker/setup-qemu-action") for u in uses)
    assert any(u.startswith("docker/setup-buildx-action") for u in uses)
    scripts = "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    assert "cosign sign --yes" in scripts and "helm package helm/inferline" in scripts
    assert 'helm push dist/inferline-*.tgz "oci://${REGISTRY}/${owner}/charts"' in scripts
    assert workflow["env"]["REGISTRY"] == "ghcr.io"


def test_helm_package_makes_a_chart_with_the_icon_and_schema(helm, tmp_path):
    run([helm, "package", str(CHART), "--version", "1.2.3", "--app-version", "1.2.3", "--destination", str(tmp_path)])
    package = tmp_path / "inferline-1.2.3.tgz"
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
        chart = yaml.safe_load(tar.extractfile("inferline/Chart.yaml").read())  # type: ignore[union-attr]
    assert {"inferline/values.schema.json", "inferline/templates/deployment.yaml"} <= names
    assert chart["appVersion"] == "1.2.3" and chart["icon"].startswith("https://")
