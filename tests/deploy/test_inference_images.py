"""The PyTorch and CUDA inference images: each builds with deploy/docker/build.sh, runs as the
unprivileged user on a read-only root filesystem, and serves Detect behind the other three images.

Both are large (torch brings NVIDIA's CUDA libraries, onnxruntime-gpu its CUDA provider), so each
image is built for one test class and removed, with the build layers it made, when the class ends:
the two are never on disk at once. There is no GPU here: the
CUDA image is built on python:3.11-slim with CUDA and cuDNN from NVIDIA's pip wheels (the
Dockerfile's default base, NVIDIA's CUDA image, cannot be pulled offline), checked for a CUDA
provider whose libraries all resolve but the driver's, and run on its CPU fallback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.test_images import ContainerStack
from tests.deploy.tools import (
    assert_detects_shapes,
    build_image,
    detect,
    image_ids,
    podman,
    remove_built_image,
    wait_healthy,
)

pytestmark = pytest.mark.slow

MB = 1_000_000
# The CUDA image's variant the tests can build: Debian's Python base, CUDA and cuDNN from pip.
CUDA_ON_SLIM = "--build-arg CUDA_IMAGE=python:3.11-slim --build-arg ORT_GPU_EXTRAS=cuda,cudnn"
# The one library of the CUDA provider that only a GPU host has: the driver, which the NVIDIA
# container toolkit mounts into the container.
DRIVER = "libcuda.so.1"


def _built(target: str, env: dict[str, str]) -> Iterator[str]:
    before = image_ids()
    tag, seconds, layers = build_image(target, env={"INFERLINE_PIP_FROM_HOST": "1", **env})
    size = int(json.loads(podman("image", "inspect", tag).stdout)[0]["Size"])
    print(f"\n{target}: built in {seconds:.0f} s, {size / MB:.0f} MB unpacked")
    try:
        yield tag
    finally:
        remove_built_image(tag, before, layers)


@pytest.fixture(scope="class")
def torch_image(container_tools: str) -> Iterator[str]:
    """inference-torch, from the wheel sources the host's pip uses (local mirrors mounted)."""
    yield from _built("inference-torch", {})


@pytest.fixture(scope="class")
def cuda_image(container_tools: str) -> Iterator[str]:
    """inference-cuda on python:3.11-slim with CUDA and cuDNN from NVIDIA's pip wheels."""
    yield from _built("inference-cuda", {"INFERLINE_BUILD_OPTS": CUDA_ON_SLIM})


class StackWithInference(ContainerStack):
    """The four-container stack of test_images.py with another image in the inference role."""

    def __init__(self, images: dict[str, str], models: Path, inference_image: str, memory: str = "1g"):
        super().__init__(images, models)
        self.inference_image = inference_image
        self.memory = memory

    def start(self, stage: str, *extra: str, image: str | None = None, env: dict[str, str] | None = None) -> str:
        if stage == "inference":
            # The later --memory wins over the stack's default 1g.
            return super().start(stage, *extra, "--memory", self.memory, image=self.inference_image, env=env)
        return super().start(stage, *extra, image=image, env=env)

    def logs(self, stage: str) -> str:
        done = podman("logs", self.names[stage], check=False)
        return done.stdout + done.stderr


def _serve_detect(stack: StackWithInference, shapes_image: Path) -> str:
    """Brings the stack up, checks one Detect finds the shapes, returns the inference logs."""
    try:
        stack.up()
        for stage in ("preprocess", "postprocess", "inference", "controller"):
            wait_healthy(stack.names[stage], timeout=300)
        assert_detects_shapes(detect(stack.target, shapes_image))
        return stack.logs("inference")
    finally:
        stack.down()


def _in_image(image: str, script: str) -> str:
    """Runs a shell script in the image as its own user, read-only, without a network."""
    return podman("run", "--rm", "--read-only", "--network", "none", image, "sh", "-c", script, timeout=300).stdout


def _assert_unprivileged_with_healthcheck(image: str, title: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][0].endswith("tini")
    assert "/opt/inferline/healthcheck.py" in " ".join(info["Healthcheck"]["Test"])
    assert config["Labels"]["org.opencontainers.image.title"] == title
    assert _in_image(image, "id -u; id -g").split() == ["10001", "10001"]


# --- PyTorch ---------------------------------------------------------------------------------

# The first test of each class builds its image (several GB of wheels from a cold cache): the
# build, not the test, sets the time. One CI run spent over 600 s (the suite's default limit) on
# inference-torch's build alone; build_image's own limit is 3000 s.
BUILD_TIMEOUT_S = 2400


@pytest.mark.timeout(BUILD_TIMEOUT_S)
class TestPyTorchImage:
    """inference-torch: the PyTorch backend (torch, torchvision, ultralytics, open_clip)."""

    def test_imports_the_pytorch_backend_as_the_unprivileged_user(self, torch_image):
        _assert_unprivileged_with_healthcheck(torch_image, "inferline-inference-torch")
        versions = _in_image(torch_image, "python -c 'import torch, torchvision, ultralytics, open_clip; "
                                          "print(torch.__version__, torchvision.__version__, ultralytics.__version__)'")
        # ultralytics announces the settings file it creates (under /tmp) before the last line.
        last = versions.strip().splitlines()[-1]
        print("torch, torchvision, ultralytics:", last)
        assert last.split()[0].startswith("2."), versions

    def test_serves_the_default_layout_exported_in_the_image_on_a_read_only_root(
            self, images, torch_image, yolo_weights, shapes_image):
        stack = StackWithInference(images, yolo_weights.parent, torch_image, memory="2g")
        logs = _serve_detect(stack, shapes_image)
        # The default model repository: yolov8n.pt, exported here by torch (ultralytics loads the
        # checkpoint) into the export cache under $HOME=/tmp, served by ONNX Runtime (issue 17).
        assert re.search(r"yolov8n: exported \S*yolov8n\.pt to /tmp/\S+\.onnx", logs), logs[-3000:]
        assert re.search(r"loaded yolov8n v\S+ \(onnxruntime/ultralytics\) from /models/yolov8n\.pt", logs), \
            logs[-3000:]
        # ultralytics (settings, fonts) and torch keep their files under /tmp; nothing tried the root.
        for complaint in ("Read-only file system", "not writeable", "Permission denied"):
            assert complaint not in logs, logs[-3000:]


# --- CUDA ------------------------------------------------------------------------------------

@pytest.mark.timeout(BUILD_TIMEOUT_S)
class TestCudaImage:
    """inference-cuda on python:3.11-slim with CUDA and cuDNN from pip wheels, without a GPU."""

    def test_has_the_cuda_provider_and_its_libraries_resolve_but_the_driver(self, cuda_image):
        _assert_unprivileged_with_healthcheck(cuda_image, "inferline-inference-cuda")
        providers = _in_image(cuda_image, "python -c 'import onnxruntime as o; print(o.get_available_providers())'")
        assert "CUDAExecutionProvider" in providers, providers
        ldd = _in_image(cuda_image,
                        "ldd /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so")
        for library in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"):
            assert re.search(rf"{re.escape(library)} => /", ldd), f"{library} not resolved:\n{ldd}"
        missing = {line.split()[0] for line in ldd.splitlines() if "not found" in line}
        assert missing == {DRIVER}, ldd
        # Opened at run time rather than linked: cuDNN, cuFFT and NVRTC must be known to the linker too.
        cache = _in_image(cuda_image, "ldconfig -p")
        for library in ("libcudnn.so.9", "libcufft.so.12", "libnvrtc.so.13"):
            assert f"{library} " in cache, f"{library} is not in the linker cache"

    def test_without_a_gpu_warns_once_and_serves_detect_on_the_cpu(self, images, cuda_image, onnx_models, shapes_image):
        stack = StackWithInference(images, onnx_models, cuda_image)
        logs = _serve_detect(stack, shapes_image)
        assert re.search(r"loaded yolov8n v\S+ \(onnxruntime/ultralytics\) from /models/yolov8n\.onnx",
                         logs), logs[-3000:]
        warnings = [line for line in logs.splitlines() if "Failed to create CUDAExecutionProvider" in line]
        assert len(warnings) == 1, logs[-3000:]
