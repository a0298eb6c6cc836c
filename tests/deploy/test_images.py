"""The container images: lint-clean, within their size budgets, unprivileged, and the four of them
serve Detect together as containers with memory and CPU limits on a user network."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import grpc
import pytest

from tests.deploy.tools import (
    REPO,
    STAGE_PORTS,
    assert_detects_shapes,
    compressed_size,
    detect,
    free_port,
    health,
    install,
    podman,
    run,
    wait_healthy,
)
from tests.support.standins import TRUSTED_WEIGHTS_ENV

pytestmark = pytest.mark.slow

MB = 1_000_000
# Budgets from the deployment issue, met both unpacked (`podman image inspect`'s Size, what a
# node's disk holds) and compressed (gzip of each layer, what a registry stores and a node pulls).
BUDGET = {"controller": 250 * MB, "preprocess": 250 * MB, "postprocess": 250 * MB, "inference-onnx": 450 * MB}
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("Dockerfile*"))


def test_hadolint_passes_on_every_dockerfile():
    hadolint = install("install-hadolint.sh")
    assert len(DOCKERFILES) >= 2, DOCKERFILES
    for dockerfile in DOCKERFILES:
        run([hadolint, "--failure-threshold", "info", str(dockerfile)])


def _inspect(image: str) -> dict:
    return json.loads(podman("image", "inspect", image).stdout)[0]


@pytest.mark.parametrize("name", ["controller", "preprocess", "postprocess", "inference-onnx"])
def test_image_is_within_its_size_budget_and_runs_unprivileged(images, name, tmp_path):
    info = _inspect(images[name])
    unpacked = int(info["Size"])
    pulled = compressed_size(images[name], tmp_path)
    print(f"{name}: {unpacked / MB:.0f} MB unpacked, {pulled / MB:.0f} MB compressed")
    assert unpacked <= BUDGET[name], f"{name}: {unpacked / MB:.0f} MB unpacked > {BUDGET[name] / MB:.0f} MB"
    assert pulled <= BUDGET[name], f"{name}: {pulled / MB:.0f} MB compressed > {BUDGET[name] / MB:.0f} MB"
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][0].endswith("tini")
    assert "/opt/inferline/healthcheck.py" in " ".join(info["Healthcheck"]["Test"])  # docker format kept it
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == f"inferline-{name}"
    assert labels["org.opencontainers.image.version"]
    # No torch in any of these images; no OpenCV or ONNX Runtime outside the inference image.
    packages = podman(
        "run",
        "--rm",
        "--network",
        "none",
        images[name],
        "python",
        "-c",
        "import importlib.util as u; print([m for m in ('torch', 'cv2', 'onnxruntime') if u.find_spec(m)])",
    ).stdout
    found = eval(packages.strip().splitlines()[-1])  # a list literal printed by the line above
    assert "torch" not in found
    if name in ("controller", "preprocess", "postprocess"):
        assert found == [], f"{name} should carry neither torch, OpenCV nor ONNX Runtime: {found}"
    if name == "inference-onnx":
        assert "onnxruntime" in found


class ContainerStack:
    """The four images as containers on their own network, named with a random suffix."""

    def __init__(self, images: dict[str, str], models: Path):
        self.suffix = uuid.uuid4().hex[:8]
        self.network = f"inferline-test-{self.suffix}"
        self.port = free_port()
        self.images = images
        self.models = models
        self.names: dict[str, str] = {}

    def name(self, stage: str) -> str:
        return f"inferline-{stage}-{self.suffix}"

    def start(self, stage: str, *extra: str, image: str | None = None, env: dict[str, str] | None = None) -> str:
        name = self.name(stage)
        args = ["run", "-d", "--name", name, "--network", self.network, "--network-alias", stage,
                "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--pids-limit", "256", "--memory", "1g" if stage == "inference" else "512m", "--cpus", "1"]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        podman(*args, *extra, image or self.images["inference-onnx" if stage == "inference" else stage])
        self.names[stage] = name
        return name

    def up(self) -> None:
        podman("network", "create", self.network)
        self.start("preprocess")
        self.start("postprocess")
        self.start("inference", "-v", f"{self.models}:/models:ro",
                   env={"INFERLINE_MODELS": "yolov8n", **TRUSTED_WEIGHTS_ENV})
        self.start("controller", "-p", f"127.0.0.1:{self.port}:50051", env={
            f"INFERLINE_{stage.upper()}_TARGET": f"{stage}:{port}"
            for stage, port in STAGE_PORTS.items() if stage != "controller"})

    def down(self) -> None:
        for name in self.names.values():
            podman("rm", "-f", "-t", "2", name, check=False)
        podman("network", "rm", "-f", self.network, check=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def container_stack(images, onnx_models):
    stack = ContainerStack(images, onnx_models)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def test_four_containers_serve_detect_with_limits_on_a_user_network(container_stack, shapes_image):
    for stage in ("preprocess", "postprocess", "inference", "controller"):
        wait_healthy(container_stack.names[stage])
    assert health(container_stack.target) == "SERVING"
    response = detect(container_stack.target, shapes_image)
    assert_detects_shapes(response)
    stats = podman("stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}} {{.CPUPerc}}",
                   *container_stack.names.values()).stdout
    print("memory after one Detect:\n" + stats)
    limits = json.loads(podman("inspect", container_stack.names["inference"]).stdout)[0]["HostConfig"]
    assert limits["Memory"] == 1024 ** 3 and limits["NanoCpus"] == 1_000_000_000 and limits["ReadonlyRootfs"]


def test_unknown_model_is_not_found_through_the_containers(container_stack, shapes_image):
    wait_healthy(container_stack.names["controller"])
    with pytest.raises(grpc.RpcError) as caught:
        detect(container_stack.target, shapes_image, model="nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in caught.value.details()


def test_inference_without_its_weights_names_the_file_and_exits_only_when_strict(images, tmp_path):
    """By default a model whose weights are missing is UNAVAILABLE, its reason logged, and the
    stage stays up for the others (and for a later load); INFERLINE_EXIT_ON_ERROR=true, Triton's
    --exit-on-error, makes it exit instead."""
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o755)
    run_args = ["--read-only", "--network", "none", "-v", f"{empty}:/models:ro", "-e", "INFERLINE_MODELS=yolov8n"]
    done = podman("run", "--rm", *run_args, "-e", "INFERLINE_EXIT_ON_ERROR=true", images["inference-onnx"],
                  check=False, timeout=120)
    assert done.returncode != 0
    assert "yolov8n.onnx" in done.stdout + done.stderr, done.stderr[-2000:]
    name = f"inferline-noweights-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, *run_args, images["inference-onnx"])
    try:
        deadline = time.monotonic() + 120
        logs = ""
        while "yolov8n.onnx" not in logs and time.monotonic() < deadline:
            time.sleep(1)
            done = podman("logs", name, check=False)
            logs = done.stdout + done.stderr
        assert "yolov8n.onnx" in logs, logs[-2000:]
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["Running"] is True, state
    finally:
        podman("rm", "-f", name, check=False)


def test_sigterm_drains_and_exits_cleanly(images):
    """tini is PID 1 and hands SIGTERM to the stage, which stops on it instead of being killed."""
    name = f"inferline-sigterm-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--read-only", "--network", "none", images["postprocess"])
    try:
        wait_healthy(name, timeout=60)
        podman("stop", "-t", "20", name, timeout=60)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
    finally:
        podman("rm", "-f", name, check=False)
