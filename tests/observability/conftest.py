"""Fixtures of the observability tests."""

from __future__ import annotations

import dataclasses

import pytest

from inferline.common.server import ServerApp
from inferline.services.inference.servicer import build_service as build_inference
from tests.support.servers import LoopThread


@pytest.fixture(scope="session")
def inference(settings, tmp_path_factory):
    """An inference stage (YOLOv8n only) with its metrics port, where the profiler route lives
    (profiling is off by default: this stage opts in)."""
    profiles = tmp_path_factory.mktemp("profiles")
    own = dataclasses.replace(settings, models=("yolov8n",), profile_dir=profiles, profiling=True)
    loop = LoopThread()
    app = ServerApp(build_inference(own), own, port=0, host="127.0.0.1", metrics_port=0)
    loop.run(app.start())
    yield app, profiles
    loop.run(app.stop(0.5))
    loop.close()
