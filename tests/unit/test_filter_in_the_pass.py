"""A request's candidate filter runs in the forward pass, where the outputs lie.

On a GPU a YOLOv8n head is 2 MB per image and nearly all of it is dropped by the filter: the
backends that can (torch, ONNX Runtime with IO binding) filter on the device and copy only the
kept candidates to the host. Here the same code runs on CPU tensors: the torch backend on the
CPU, ONNX Runtime's IO-binding path bound to the CPU. Everywhere the kept columns are the ones
the host filter keeps, bit for bit, and each request's own ``min_score`` applies to its items,
also when items of several requests share one batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import inferline.services.inference.backends.onnxruntime_backend as ortb
import inferline.services.inference.backends.torch_backend as torch_backends
from inferline.common.settings import Settings
from inferline.services.inference.backends import load_backend
from inferline.services.inference.export import export_onnx
from inferline.services.inference.filters import shrink_for, yolo_candidates
from inferline.services.inference.models import Filtered, LoadedModel
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights

IMAGES = np.random.default_rng(17).integers(0, 256, size=(2, 3, 96, 128), dtype=np.uint8)


@pytest.fixture(scope="module")
def yolo_config():
    return load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")


@pytest.fixture(scope="module")
def torch_backend(yolo_config, yolo_weights):
    config = dataclasses.replace(yolo_config, backend="torch", parameters={})
    return load_backend(config, ResolvedWeights(path=yolo_weights, sha256="", official=False), Settings())


@pytest.fixture(scope="module")
def ort_backend(tmp_path_factory, yolo_config, yolo_weights) -> ortb.OnnxRuntimeBackend:
    path: Path = export_onnx(yolo_config, yolo_weights, tmp_path_factory.mktemp("onnx") / "yolov8n.onnx")
    config = dataclasses.replace(yolo_config, name="filter-in-pass", parameters={"intra_op_threads": 1})
    return ortb.load_onnxruntime_backend(config, ResolvedWeights(path=path, sha256="", official=False),
                                         Settings(device="cpu"))


def _host_filtered(outputs: list[dict[str, np.ndarray]], min_scores: list[float]) -> list[dict[str, np.ndarray]]:
    return [yolo_candidates(o, m) if m > 0 else o for o, m in zip(outputs, min_scores, strict=True)]


def _shrinks(config, min_scores: list[float]):
    return [shrink_for(config.candidate_filter, m) for m in min_scores]


def _same(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    assert [sorted(o) for o in got] == [sorted(o) for o in want]
    for ours, theirs in zip(got, want, strict=True):
        for name in theirs:
            assert isinstance(ours[name], np.ndarray), "what leaves the pass is on the host"
            assert ours[name].shape == theirs[name].shape and ours[name].tobytes() == theirs[name].tobytes()


def test_the_yolo_filter_keeps_the_same_columns_of_a_tensor_as_of_an_array():
    head = np.random.default_rng(0).random((84, 500), dtype=np.float32)
    best = head[4:].max(axis=0)
    for min_score in (float(q) for q in np.quantile(best, [0.1, 0.5, 0.9])):
        on_host = yolo_candidates({"output0": head}, min_score)["output0"]
        on_device = yolo_candidates({"output0": torch.from_numpy(head)}, min_score)["output0"]
        assert isinstance(on_device, torch.Tensor) and on_device.is_contiguous()
        assert 0 < on_host.shape[1] < 500 and on_device.numpy().tobytes() == on_host.tobytes()


def test_no_filter_without_a_min_score_or_a_declared_filter(yolo_config):
    assert shrink_for(yolo_config.candidate_filter, 0.0) is None
    assert shrink_for(None, 0.25) is None
    assert shrink_for(yolo_config.candidate_filter, 0.25) is not None


def test_the_torch_backend_filters_each_item_before_its_outputs_leave_the_device(
    torch_backend, yolo_config, monkeypatch
):
    assert torch_backend.shrinks_outputs
    min_scores = [0.01, 0.0]  # the second item's request asked for every candidate
    want = _host_filtered(torch_backend.run({"images": IMAGES}), min_scores)
    copied = []
    to_host = torch_backends._to_numpy
    monkeypatch.setattr(torch_backends, "_to_numpy", lambda t: copied.append(tuple(t.shape)) or to_host(t))
    got = torch_backend.run({"images": IMAGES}, _shrinks(yolo_config, min_scores))
    _same(got, want)
    anchors = want[1]["output0"].shape[1]
    assert copied == [(84, want[0]["output0"].shape[1]), (84, anchors)], "only the kept columns are copied"
    assert want[0]["output0"].shape[1] < anchors


def test_onnx_runtime_filters_where_io_binding_left_the_outputs(ort_backend, yolo_config, monkeypatch):
    """The CUDA provider's path (IO binding, the outputs read by DLPack and filtered in place),
    bound to the CPU here; and the plain host path."""
    min_scores = [0.01, 0.02]
    want = _host_filtered(ort_backend.run({"images": IMAGES}), min_scores)
    _same(ort_backend.run({"images": IMAGES}, _shrinks(yolo_config, min_scores)), want)

    monkeypatch.setattr(ort_backend, "_bound", ("cpu", 0))
    filtered_on_device = []
    original = ort_backend._shrunk_on_device
    monkeypatch.setattr(ort_backend, "_shrunk_on_device",
                        lambda *a: filtered_on_device.append(1) or original(*a))
    _same(ort_backend.run({"images": torch.from_numpy(IMAGES)}, _shrinks(yolo_config, min_scores)), want)
    _same(ort_backend.run({"images": IMAGES}), ort_backend.run({"images": IMAGES}))  # unfiltered: copied out whole
    assert filtered_on_device == [1]


def test_items_of_two_requests_in_one_batch_each_get_their_own_filter(torch_backend, yolo_config):
    """The filter travels with each item through the batcher (``Filtered``), so a shared pass
    applies each request's own ``min_score``."""
    model = LoadedModel.__new__(LoadedModel)  # only what a pass needs: no batcher, no threads
    model.config, model.backend = yolo_config, torch_backend
    model.stats = type("Stats", (), {"pass_ran": lambda *a: None})()
    low, high = _shrinks(yolo_config, [0.01, 0.05])
    items = [Filtered({"images": IMAGES[0]}, low), Filtered({"images": IMAGES[1]}, high), {"images": IMAGES[1]}]
    got = model.run_batch(items)
    want = _host_filtered(torch_backend.run({"images": np.stack([IMAGES[0], IMAGES[1], IMAGES[1]])}),
                          [0.01, 0.05, 0.0])
    _same(got, want)

    # A backend that cannot filter in its pass: the same filters, on the host right after it.
    class HostOnly:
        def __init__(self, inner):
            self.inner = inner

        def run(self, inputs):
            return self.inner.run(inputs)

    model.backend = HostOnly(torch_backend)
    _same(model.run_batch(items), want)

