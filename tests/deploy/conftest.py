"""Fixtures for the deployment tests: container tools, the built images, exported ONNX weights."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.tools import DEPLOY_IMAGES, REPO, build_stage_ids, install, prune_stale_build_images, run


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary, from the project's own installer (deploy/tools/install-helm.sh)."""
    return install("install-helm.sh")


@pytest.fixture(scope="session")
def container_tools() -> str:
    """buildah, podman, runc, the offline base image and podman-compose, installed by the
    project's script; CONTAINERS_CONF is what podman needs on these hosts (runc, ulimits)."""
    os.environ["CONTAINERS_CONF"] = install("install-containers.sh")
    return os.environ["CONTAINERS_CONF"]


@pytest.fixture(scope="session")
def images(container_tools: str) -> Iterator[dict[str, str]]:
    """The four images the stack runs, built by deploy/docker/build.sh (cached layers on re-runs).
    When the session ends, the build-only stages of earlier builds go (this build's stay, as the
    next one's cache): a machine that runs the suite on every change keeps a bounded disk."""
    done = run(["bash", str(REPO / "deploy" / "docker" / "build.sh"), *DEPLOY_IMAGES], timeout=1200)
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    yield {name: f"localhost/inferline-{name}:{version}" for name in DEPLOY_IMAGES}
    prune_stale_build_images(keep=build_stage_ids(done.stderr))


@pytest.fixture(scope="session")
def onnx_models(yolo_weights: Path):
    """A weights folder holding yolov8n.onnx, exported from the stand-in by `inferline export`,
    readable by the images' unprivileged user (it is mounted read-only)."""
    folder = Path(tempfile.mkdtemp(prefix="inferline-onnx-"))
    inferline = shutil.which("inferline", path=str(Path(sys.executable).parent)) or "inferline"
    env = dict(os.environ, INFERLINE_MODEL_DIR=str(yolo_weights.parent))
    run([inferline, "export", "--model", "yolov8n", "--out", str(folder / "yolov8n.onnx")], env=env, timeout=300)
    folder.chmod(0o755)
    (folder / "yolov8n.onnx").chmod(0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes_image(data_dir: Path) -> Path:
    return data_dir / "shapes_05.jpg"
