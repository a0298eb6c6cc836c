"""CUDA graphs for the torch backend (issue 16): per model config, CUDA only, same outputs as eager."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings
from inferline.services.inference.backends import load_backend
from inferline.services.inference.backends.cuda_graphs import GraphedForward
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights


def _backend(yolo_weights, device: str, **parameters):
    config = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    config = dataclasses.replace(config, backend="torch", parameters={**config.parameters, **parameters})
    return load_backend(config, ResolvedWeights(path=yolo_weights, sha256="", official=False), Settings(device=device))


def test_cuda_graphs_are_refused_on_cpu_with_what_to_do(yolo_weights):
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device.*remove it or serve on cuda"):
        _backend(yolo_weights, "cpu", cuda_graphs=True)


def test_without_the_parameter_the_forward_pass_is_not_wrapped(yolo_weights):
    backend = _backend(yolo_weights, "cpu", cuda_graphs=False)
    assert not isinstance(backend._model.forward, GraphedForward)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_answer_as_the_eager_pass_and_extra_shapes_run_eagerly(yolo_weights):
    eager = _backend(yolo_weights, "cuda")
    graphed = _backend(yolo_weights, "cuda", cuda_graphs=True, cuda_graph_shapes=2)
    assert isinstance(graphed._model.forward, GraphedForward)
    rng = np.random.default_rng(0)
    for shape in [(4, 3, 640, 480), (4, 3, 640, 480), (1, 3, 480, 640), (2, 3, 320, 320)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        for ours, ref in zip(graphed.run({"images": images}), eager.run({"images": images}), strict=True):
            np.testing.assert_allclose(ours["output0"], ref["output0"], rtol=1e-4, atol=1e-3)
    recorded = [g for g in graphed._model.forward._graphs.values() if g is not None]
    assert len(graphed._model.forward._graphs) == 3 and len(recorded) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_forward_pass_that_syncs_with_the_host_runs_eagerly():
    def syncing(tensors):
        x = tensors["x"]
        return [{"y": x[: int(x.sum().item() > 0) + 1]}]

    graphed = GraphedForward(syncing, "syncing")
    x = torch.ones(4, device="cuda")
    assert graphed({"x": x})[0]["y"].tolist() == [1.0, 1.0]
    assert list(graphed._graphs.values()) == [None]
