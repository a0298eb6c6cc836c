"""The chart's fetch-models init container, run by podman: with a local HTTP server standing in
for the object store, the default install's shape (weights fetched and verified into the cache,
then served) comes up under `podman kube play` and a Detect through the gateway works; with the
store unreachable the init container says why and keeps retrying (no crash loop), and finishes
by itself once the store answers."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import (
    CHART,
    assert_detects_shapes_json,
    free_port,
    http_detect,
    podman,
    run,
    wait_http,
)

pytestmark = pytest.mark.slow




@contextmanager
def object_store(folder: Path, port: int) -> Iterator[list[str]]:
    """An HTTP server on 127.0.0.1:port serving ``folder``; yields the paths it was asked for."""
    asked: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


def _sources(port: int, digest: str) -> list[dict]:
    return [{"model": "yolov8n", "uri": f"http://127.0.0.1:{port}/v1/yolov8n.onnx", "sha256": digest}]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(1500)  # the first run builds the five images
def test_kube_play_fetches_verified_weights_from_the_store_and_serves_detect(
    helm, images, onnx_models, shapes_image, tmp_path
):
    store_port = free_port()
    (tmp_path / "store" / "v1").mkdir(parents=True)
    weights = onnx_models / "yolov8n.onnx"
    (tmp_path / "store" / "v1" / "yolov8n.onnx").write_bytes(weights.read_bytes())
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)  # the init container writes as uid 10001
    ports = {stage: free_port() for stage in ("controller", "preprocess", "inference", "postprocess")}
    release = f"st{ports['controller']}"
    values = {
        "hostNetwork": True,
        "image": {"registry": "localhost"},
        "stages": {stage: {"port": port, "metricsPort": free_port(), "replicas": 1} for stage, port in ports.items()},
        "controllerTargets": {s: f"127.0.0.1:{ports[s]}" for s in ("preprocess", "inference", "postprocess")},
        "models": {
            "names": ["yolov8n"],
            "sources": _sources(store_port, _digest(weights)),
            "fetch": {"image": "inference-onnx"},
            "volume": {"hostPath": {"path": str(cache), "type": "Directory"}},
        },
        "gateway": {"port": free_port(), "replicas": 1, "controllerTarget": f"127.0.0.1:{ports['controller']}"},
    }
    (tmp_path / "values.json").write_text(json.dumps(values))
    rendered = run(
        [
            helm,
            "template",
            release,
            str(CHART),
            "-f",
            str(tmp_path / "values.json"),
            "--show-only",
            "templates/deployment.yaml",
            "--show-only",
            "templates/gateway-deployment.yaml",
            "--show-only",
            "templates/configmap-models.yaml",
        ]
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        if doc["kind"] == "Deployment":
            # podman 4.3's kube play restarts an init container that exited 0 when the pod's policy
            # is Always (a Deployment's only one), so the stage never starts; Kubernetes runs init
            # containers to completion once. OnFailure gives podman Kubernetes' behaviour.
            doc["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(docs))
    gateway = f"http://127.0.0.1:{values['gateway']['port']}"
    with object_store(tmp_path / "store", store_port) as asked:
        try:
            podman("kube", "play", str(play), timeout=300)
            assert '"ready"' in wait_http(f"{gateway}/readyz", timeout=180)
            assert_detects_shapes_json(http_detect(gateway, shapes_image, timeout=60))
        finally:
            podman("kube", "down", str(play), check=False, timeout=120)
            podman("volume", "rm", "-f", f"{release}-inferline-models", check=False)
    assert asked == ["/v1/yolov8n.onnx"]
    assert _digest(cache / "yolov8n.onnx") == _digest(weights)
    assert sorted(p.name for p in cache.iterdir()) == ["yolov8n.onnx"]


def test_unreachable_store_keeps_the_init_container_retrying_with_the_reason_until_it_answers(
    helm, images, onnx_models, tmp_path
):
    """The init container as the chart renders it (image, args, env), its sources file from the
    rendered ConfigMap; the store's port answers nothing at first."""
    store_port = free_port()
    weights = onnx_models / "yolov8n.onnx"
    values = {
        "image": {"registry": "localhost"},
        "models": {
            "sources": _sources(store_port, _digest(weights)),
            "fetch": {"image": "inference-onnx", "backoffSeconds": 1, "maxBackoffSeconds": 2},
        },
    }
    (tmp_path / "values.json").write_text(json.dumps(values))
    docs = list(
        yaml.safe_load_all(
            run(
                [
                    helm,
                    "template",
                    "t",
                    str(CHART),
                    "-f",
                    str(tmp_path / "values.json"),
                    "--show-only",
                    "templates/deployment.yaml",
                    "--show-only",
                    "templates/configmap-models.yaml",
                ]
            ).stdout
        )
    )
    pod = next(d for d in docs if d and d["metadata"]["name"] == "t-inferline-inference")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    config = tmp_path / "storage"
    config.mkdir()
    sources = next(d for d in docs if d and d["kind"] == "ConfigMap")["data"]["sources.yaml"]
    (config / "sources.yaml").write_text(sources)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    name = f"fetch-{store_port}"
    args = [
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--user",
        "10001:10001",
        "-v",
        f"{cache}:/models",
        "-v",
        f"{config}:/etc/inferline/storage:ro",
    ]
    for env in init["env"]:
        args += ["-e", f"{env['name']}={env['value']}"]
    podman(*args, init["image"], *init["args"])
    try:
        deadline = time.monotonic() + 60
        logs = ""
        while "attempt 3" not in logs and time.monotonic() < deadline:
            time.sleep(1)
            done = podman("logs", name, check=False)
            logs = done.stdout + done.stderr
        assert "unreachable" in logs and f"127.0.0.1:{store_port}/v1/yolov8n.onnx" in logs, logs
        assert "retrying until it answers" in logs and "attempt 3" in logs, logs
        state = podman("inspect", "--format", "{{.State.Running}} {{.RestartCount}}", name).stdout.split()
        assert state == ["true", "0"], "still waiting, not exited or restarted"
        (tmp_path / "store" / "v1").mkdir(parents=True)
        (tmp_path / "store" / "v1" / "yolov8n.onnx").write_bytes(weights.read_bytes())
        with object_store(tmp_path / "store", store_port):
            code = podman("wait", name, timeout=60).stdout.strip()
        assert code == "0", podman("logs", name, check=False).stderr
        assert _digest(cache / "yolov8n.onnx") == _digest(weights)
    finally:
        podman("rm", "-f", name, check=False)
