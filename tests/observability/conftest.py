"""Fixtures of the observability tests."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from inferline.common.server import ServerApp
from inferline.services.inference.repository import BUILTIN_REPOSITORY
from inferline.services.inference.servicer import build_service as build_inference
from tests.support.servers import LoopThread


@pytest.fixture(scope="session")
def inference(settings, tmp_path_factory):
    """An inference stage (YOLOv8n only, on the torch backend: the route runs PyTorch's profiler)
    with its metrics port, where the profiler route lives (profiling is off by default: this
    stage opts in)."""
    profiles = tmp_path_factory.mktemp("profiles")
    repository = _torch_repository(tmp_path_factory.mktemp("repository") / "models")
    own = dataclasses.replace(
        settings, models=("yolov8n",), profile_dir=profiles, profiling=True, model_repository=repository
    )
    loop = LoopThread()
    app = ServerApp(build_inference(own), own, port=0, host="127.0.0.1", metrics_port=0)
    loop.run(app.start())
    yield app, profiles
    loop.run(app.stop(0.5))
    loop.close()


def _torch_repository(root: Path) -> Path:
    """The built-in repository with yolov8n on the torch backend (its default is ONNX Runtime)."""
    shutil.copytree(BUILTIN_REPOSITORY, root)
    path = root / "yolov8n" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(backend="torch", instance_count=1, parameters={})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return root
