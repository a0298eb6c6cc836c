"""The torch backend's precision setting: autocast inside, float32 on the wire, fp16 only on CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings
from inferline.services.inference.backends import load_backend
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights


def _backend(yolo_weights, precision: str, device: str = "cpu"):
    config = dataclasses.replace(
        load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml"), backend="torch", parameters={}, precision=precision
    )
    weights = ResolvedWeights(path=yolo_weights, sha256="", official=False)
    return load_backend(config, weights, Settings(device=device))


def test_bf16_runs_under_autocast_and_answers_float32_close_to_fp32(yolo_weights):
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 96, 128), dtype=np.uint8)
    full = _backend(yolo_weights, "fp32").run({"images": images})
    bf16 = _backend(yolo_weights, "bf16").run({"images": images})
    for ours, ref in zip(bf16, full, strict=True):
        out = ours["output0"]
        assert out.dtype == np.float32 and out.shape == ref["output0"].shape
        assert not np.array_equal(out, ref["output0"])  # it did run in bfloat16
        boxes, scores = slice(0, 4), slice(4, None)
        np.testing.assert_allclose(out[boxes], ref["output0"][boxes], rtol=0.02, atol=1.0)  # bf16: 8-bit mantissa
        assert np.abs(out[scores] - ref["output0"][scores]).max() < 0.03


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fp16_is_refused_without_cuda_with_what_to_use_instead(yolo_weights):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*bf16"):
        _backend(yolo_weights, "fp16")


def test_unknown_precision_is_a_config_error(tmp_path):
    folder = tmp_path / "yolov8n"
    folder.mkdir()
    text = (BUILTIN_REPOSITORY / "yolov8n" / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text + "\nprecision: int4\n")
    with pytest.raises(ConfigError, match="precision 'int4' is not one of fp32, fp16, bf16"):
        load_config(folder / "config.yaml")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_answers_float32_close_to_fp32(yolo_weights):
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 480, 640), dtype=np.uint8)
    full = _backend(yolo_weights, "fp32", "cuda").run({"images": images})
    half = _backend(yolo_weights, "fp16", "cuda").run({"images": images})
    for ours, ref in zip(half, full, strict=True):
        assert ours["output0"].dtype == np.float32
        assert np.abs(ours["output0"][4:] - ref["output0"][4:]).max() < 0.01
