"""Helpers for the deployment tests: the project's own tool installers, podman, and one Detect.

The tools come from deploy/tools/install-*.sh (the same scripts operators and `make` use); when
one cannot install, the test fails with the script's message instead of skipping.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "deploy" / "tools"
CHART = REPO / "helm" / "inferline"
DEPLOY_IMAGES = ("controller", "preprocess", "postprocess", "inference-onnx", "gateway")
STAGE_PORTS = {"controller": 50051, "preprocess": 50052, "inference": 50053, "postprocess": 50054}


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Runs a command; on failure the assertion shows the command and its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
                    f"\n--- stderr\n{done.stderr[-4000:]}")
    return done


def install(script: str) -> str:
    """Runs deploy/tools/<script> and returns its last line (the path it installed)."""
    return run(["bash", str(TOOLS / script)], timeout=900).stdout.strip().splitlines()[-1]


def render_chart(helm: str, *args: str) -> list[dict]:
    """``helm template`` of the chart with ``args`` (values files, --set, --api-versions): its
    objects, parsed."""
    import yaml  # noqa: PLC0415 - only the chart tests need it

    out = run([helm, "template", "t", str(CHART), *args]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check)


def wait_healthy(container: str, timeout: float = 180) -> None:
    """Runs the image's own HEALTHCHECK until it passes. podman has no systemd timer here to run
    it on its own schedule, so the test is the timer (`podman healthcheck run`)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        done = podman("healthcheck", "run", container, check=False, timeout=60)
        if done.returncode == 0:
            return
        last = done.stdout + done.stderr
        state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state in {"exited", "stopped"}:
            logs = podman("logs", container, check=False)
            pytest.fail(f"{container} exited before it was healthy:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(2)
    logs = podman("logs", container, check=False)
    pytest.fail(f"{container} not healthy after {timeout:.0f} s ({last.strip()}):\n{logs.stderr[-3000:]}")


def health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def detect(target: str, image: Path, model: str = "yolov8n", timeout: float = 120) -> controller_pb2.DetectResponse:
    """One Detect call through the controller, retried while the stack is still coming up."""
    request = controller_pb2.DetectRequest(model=model,
                                           images=[types_pb2.Image(data=image.read_bytes(), name=image.name)])
    deadline = time.monotonic() + timeout
    while True:
        with grpc.insecure_channel(target) as channel:
            try:
                return controller_pb2_grpc.ControllerServiceStub(channel).Detect(request, timeout=60)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
        time.sleep(2)


def assert_detects_shapes(response: controller_pb2.DetectResponse) -> None:
    """The stand-in YOLOv8n finds the synthetic shapes in shapes_05.jpg (a kite and a frisbee)."""
    assert len(response.results) == 1
    result = response.results[0]
    assert result.status.code == 0, result.status.message
    assert (result.width, result.height) == (640, 480)
    labels = {d.label for d in result.detections if d.score > 0.5}
    assert {"kite", "frisbee"} <= labels, [(d.label, d.score) for d in result.detections]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of one GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - a local http URL
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_http(url: str, timeout: float = 120, status: int = 200) -> str:
    """Polls a URL until it answers `status` (a gateway's /readyz while its controller comes up)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            code, body = http_get(url, timeout=5)
            if code == status:
                return body
            last = f"HTTP {code}: {body[:500]}"
        except OSError as exc:  # refused or reset while the server starts
            last = str(exc)
        time.sleep(2)
    pytest.fail(f"{url} did not answer {status} within {timeout:.0f} s (last: {last})")


def http_detect(base_url: str, image: Path, model: str = "yolov8n", timeout: float = 120) -> dict:
    """One POST /v1/detect through an HTTP gateway, the image as base64 JSON (as in the README's
    curl line); retried while the gateway or the stack behind it is still coming up (503)."""
    body = json.dumps({"model": model,
                       "images": [{"name": image.name, "data": base64.b64encode(image.read_bytes()).decode()}]})
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"{base_url}/v1/detect", data=body.encode(), method="POST",  # noqa: S310 - a local http URL
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - a local http URL
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                pytest.fail(f"POST {base_url}/v1/detect: HTTP {exc.code}: {exc.read().decode()[:2000]}")
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(2)


def assert_detects_shapes_json(document: dict) -> None:
    """The gateway's JSON for shapes_05.jpg says what assert_detects_shapes checks on the gRPC reply."""
    [result] = document["results"]
    assert "error" not in result, result.get("error")
    assert (result["width"], result["height"]) == (640, 480)
    labels = {d["label"] for d in result["detections"] if d["score"] > 0.5}
    assert {"kite", "frisbee"} <= labels, result["detections"]


def compressed_size(image: str, workdir: Path) -> int:
    """Sum of the gzip-compressed layers of `podman save`: what a registry stores and a node pulls."""
    archive = workdir / "image.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), image)
    total = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and (member.name.endswith(".tar") or "/layer" in member.name):
                total += len(gzip.compress(tar.extractfile(member).read(), compresslevel=6))
    archive.unlink()
    return total


def build_image(
    target: str, *, env: dict[str, str] | None = None, timeout: float = 3000
) -> tuple[str, float, set[str]]:
    """Builds one target with deploy/docker/build.sh (extra variables in `env`, e.g.
    INFERLINE_BUILD_OPTS); returns its tag, the seconds the build took, and the (short) ids of
    every image the build committed or reused, as buildah prints them (`--> 3e40203ff1b`)."""
    started = time.monotonic()
    done = run(["bash", str(REPO / "deploy" / "docker" / "build.sh"), target], env={**os.environ, **(env or {})},
               timeout=timeout)
    tag = done.stdout.split("built ", 1)[1].split()[0]
    return tag, time.monotonic() - started, build_stage_ids(done.stderr)


def _all_images() -> list[dict]:
    return json.loads(podman("images", "--all", "--format", "json").stdout or "[]")


def image_ids() -> set[str]:
    """Every image id in local storage, intermediate build layers included."""
    return {image["Id"] for image in _all_images()}


def remove_built_image(tag: str, before: set[str], layers: set[str]) -> None:
    """Gives the disk back after a large image: its tag, then the untagged build layers its own
    build printed that did not exist before it (`before`), newest first. Never an image with a
    tag (the session's other images, or anyone's built meanwhile), nor one that was there before;
    a layer another image still uses as its parent stays too (no --force)."""
    podman("rmi", tag, check=False)
    mine = [
        image
        for image in _all_images()
        if image["Id"] not in before and not _tagged(image) and any(image["Id"].startswith(s) for s in layers)
    ]
    for image in sorted(mine, key=lambda image: -image["Created"]):
        podman("rmi", image["Id"], check=False)


# The label the Dockerfiles' builder stages carry (and so every build-only stage built on them).
BUILD_STAGE_LABEL = "org.inferline.stage=build"


def build_stage_ids(output: str) -> set[str]:
    """The (short) ids of the images a build committed or reused, as buildah prints them."""
    return set(re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})\s*$", output, re.M))


def prune_stale_build_images(keep: set[str]) -> int:
    """Removes the untagged build-only stages (the ``venv-*`` stages whose virtual environments
    were copied into the images) left by earlier builds, except those in ``keep`` (this session's
    builds used them: they are the next build's cache). Without this, every change to the code
    leaves ~2 GB of stale stages behind on a machine that runs the suite again and again, until
    its disk is full. The same goes for the older builds of the images themselves, untagged when a
    new build took their tag. Only untagged images with our labels; never --force."""
    stale = [
        image for image in _all_images()
        if not _tagged(image) and _ours(image.get("Labels") or {})
        and not any(image["Id"].startswith(short) for short in keep)
    ]
    removed = 0
    for image in sorted(stale, key=lambda image: -image["Created"]):
        removed += podman("rmi", image["Id"], check=False).returncode == 0
    return removed


def _ours(labels: dict[str, str]) -> bool:
    """A build stage of our Dockerfiles, or one of our images (which all name their vendor)."""
    return labels.get("org.inferline.stage") == "build" or labels.get("org.opencontainers.image.vendor") == "inferline"


def _tagged(image: dict) -> bool:
    """podman's JSON lists an image's tags under ``Names`` (``RepoTags`` stays null)."""
    return bool(image.get("Names") or image.get("RepoTags"))
