"""Threads follow the load (issue 17): a lone pass runs on every core, parallel passes on one
thread each, and both give the single-session path's outputs."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import REGISTRY

import inferline.services.inference.backends.onnxruntime_backend as ortb
from inferline.common.settings import Settings
from inferline.services.inference.export import export_onnx
from inferline.services.inference.models import LoadedModel, batch_limit
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights
from inferline.services.preprocess.letterbox import letterbox

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def yolo_config():
    return load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory, yolo_config, yolo_weights) -> Path:
    return export_onnx(yolo_config, yolo_weights, tmp_path_factory.mktemp("onnx") / "yolov8n.onnx")


def _backend(config, path: Path, name: str, **parameters) -> ortb.OnnxRuntimeBackend:
    config = dataclasses.replace(config, name=name, backend="onnxruntime", parameters=parameters)
    weights = ResolvedWeights(path=path, sha256="", official=False)
    return ortb.load_onnxruntime_backend(config, weights, Settings(device="cpu"))


def _image(paths: list[Path]) -> dict[str, np.ndarray]:
    image = letterbox(cv2.imread(str(paths[0])), (640, 640), stride=32, auto=True)[0]
    return {"images": image[None].copy()}


def _threads(model: str) -> float | None:
    return REGISTRY.get_sample_value("inferline_intra_op_threads", {"model": model})


def test_a_lone_pass_gives_the_single_session_outputs_bit_for_bit(yolo_config, yolo_onnx, sample_images):
    backend = _backend(yolo_config, yolo_onnx, "threads-parity", intra_op_threads=1, alone_intra_op_threads=2)
    single = _backend(yolo_config, yolo_onnx, "threads-single", intra_op_threads=1)
    inputs = _image(sample_images)
    shared = backend.run(inputs)[0]["output0"]
    assert _threads("threads-parity") == 1
    alone = backend.run_alone(inputs)[0]["output0"]
    assert _threads("threads-parity") == 2
    reference = single.run(inputs)[0]["output0"]
    np.testing.assert_array_equal(shared, reference)
    # ONNX Runtime's CPU kernels split a convolution by its outputs, not inside one sum, so two
    # threads add in the one-thread order: bit for bit (unlike torch's, whose order follows them).
    np.testing.assert_array_equal(alone, reference)


def test_without_alone_threads_every_pass_runs_on_the_one_session(yolo_config, yolo_onnx, sample_images):
    backend = _backend(yolo_config, yolo_onnx, "threads-off", intra_op_threads=1)
    assert backend.alone_threads == 0
    inputs = _image(sample_images)
    np.testing.assert_array_equal(backend.run_alone(inputs)[0]["output0"], backend.run(inputs)[0]["output0"])


def test_alone_threads_zero_means_every_usable_core(yolo_config, yolo_onnx, monkeypatch):
    monkeypatch.setattr(ortb, "usable_cores", lambda: 3)
    backend = _backend(yolo_config, yolo_onnx, "threads-cores", intra_op_threads=1, alone_intra_op_threads=0)
    assert backend.alone_threads == 3


def test_one_request_at_a_time_runs_alone_on_every_core(yolo_config, yolo_onnx, sample_images):
    config = dataclasses.replace(yolo_config, name="threads-served", instance_count=2)
    backend = _backend(config, yolo_onnx, "threads-served", intra_op_threads=1, alone_intra_op_threads=2)
    model = LoadedModel(config, backend, ResolvedWeights(path=yolo_onnx, sha256="", official=False), 0.0)
    item = {"images": _image(sample_images)["images"][0]}

    async def main():
        for _ in range(2):
            await model.batcher.submit([("k", item)])
        await model.batcher.close()

    asyncio.run(main())
    model.executor.shutdown()
    assert model.batcher.passes_alone == 2
    assert _threads("threads-served") == 2


def _served(yolo_config, yolo_onnx, name: str, **parameters) -> LoadedModel:
    config = dataclasses.replace(yolo_config, name=name, instance_count=2, max_batch_size=32)
    backend = _backend(config, yolo_onnx, name, intra_op_threads=1, **parameters)
    return LoadedModel(config, backend, ResolvedWeights(path=yolo_onnx, sha256="", official=False), 0.0)


def _pass_sizes(model: LoadedModel, items: int, sample_images) -> list[int]:
    """The items of each forward pass when ``items`` arrive together."""
    sizes: list[int] = []
    run = model.backend.run

    def counted(inputs):
        sizes.append(len(inputs["images"]))
        return run(inputs)

    model.backend.run = counted  # type: ignore[method-assign]
    item = {"images": _image(sample_images)["images"][0]}

    async def main():
        await model.batcher.submit([("k", item)] * items)
        await model.batcher.close()

    asyncio.run(main())
    model.executor.shutdown()
    return sizes


def test_on_the_cpu_a_pass_takes_at_most_cpu_max_batch_size_items(yolo_config, yolo_onnx, sample_images):
    # One ORT thread's cost per image grows with the batch on a CPU (51.6 ms at 1, 65.7 at 16):
    # the two instances take single images instead.
    capped = _served(yolo_config, yolo_onnx, "batch-capped", cpu_max_batch_size=1)
    assert capped.backend.max_useful_batch == 1 and capped.batcher.config.max_batch_size == 1
    assert _pass_sizes(capped, 4, sample_images) == [1, 1, 1, 1]


def test_without_cpu_max_batch_size_the_config_sets_the_batch(yolo_config, yolo_onnx, sample_images):
    free = _served(yolo_config, yolo_onnx, "batch-free")
    assert free.backend.max_useful_batch is None and free.batcher.config.max_batch_size == 32
    assert sum(_pass_sizes(free, 4, sample_images)) == 4
    assert max(_pass_sizes(_served(yolo_config, yolo_onnx, "batch-free-2"), 6, sample_images)) > 1


def test_the_batch_limit_lowers_the_config_never_raises_it_and_leaves_no_batching_alone():
    assert batch_limit(32, None) == 32
    assert batch_limit(32, 1) == 1
    assert batch_limit(4, 16) == 4
    assert batch_limit(0, 1) == 0  # a model without a batch dimension
    assert batch_limit(8, 0) == 8



def _spin_stop(session) -> str:
    return session.get_session_options().get_session_config_entry("session.force_spinning_stop")


def test_the_lone_pass_threads_spin_on_after_it_by_default(yolo_config, yolo_onnx):
    """ORT's own behaviour: stopping the spinners when the pass returns was measured slower at
    one client on a 2-core VM (bench/results/compare-cpu-2026-12-02-spinstop.md), the spinning
    cores waking the next stage sooner."""
    backend = _backend(yolo_config, yolo_onnx, "threads-spin", intra_op_threads=1, alone_intra_op_threads=2)
    assert backend._alone is not None
    assert backend._alone.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert _spin_stop(backend._alone) == "0"


def test_stopping_the_spinners_when_a_pass_returns_is_a_setting(yolo_config, yolo_onnx):
    backend = _backend(yolo_config, yolo_onnx, "threads-spin-stop", intra_op_threads=1, alone_intra_op_threads=2,
                       force_spinning_stop=True)
    assert backend._alone is not None and _spin_stop(backend._alone) == "1"
