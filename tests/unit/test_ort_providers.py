"""ONNX Runtime's TensorRT EP goes first only when asked for, present, and CUDA was chosen (issue 16)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from inferline.common.settings import Settings
from inferline.services.inference.backends.providers import TENSORRT, engine_cache_dir, with_tensorrt

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_WHEEL = [TENSORRT, CUDA, CPU]


def test_tensorrt_goes_first_with_fp16_and_a_per_model_engine_cache(tmp_path: Path):
    settings = Settings(ort_tensorrt=True, ort_tensorrt_cache_dir=tmp_path)
    providers = with_tensorrt([CUDA, CPU], GPU_WHEEL, settings, "yolov8n")
    (name, options), *rest = providers
    assert name == TENSORRT and rest == [CUDA, CPU]
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "yolov8n") and (tmp_path / "yolov8n").is_dir()
    assert engine_cache_dir(Settings(), "m").parts[-2:] == ("tensorrt", "m")


def test_fp16_can_be_turned_off(tmp_path: Path):
    settings = Settings(ort_tensorrt=True, ort_tensorrt_fp16=False, ort_tensorrt_cache_dir=tmp_path)
    assert with_tensorrt([CUDA, CPU], GPU_WHEEL, settings, "m")[0][1]["trt_fp16_enable"] is False


def test_without_the_setting_the_chosen_providers_are_unchanged(tmp_path: Path):
    assert with_tensorrt([CUDA, CPU], GPU_WHEEL, Settings(ort_tensorrt_cache_dir=tmp_path), "m") == [CUDA, CPU]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("chosen", "available", "why"),
    [([CPU], [CPU], "no TensorRT EP"), ([CPU], GPU_WHEEL, "CUDA EP was not chosen")],
)
def test_asked_for_but_unusable_tensorrt_warns_once_and_serves_on(chosen, available, why, tmp_path, caplog):
    settings = Settings(ort_tensorrt=True, ort_tensorrt_cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        assert with_tensorrt(chosen, available, settings, "m") == chosen
    assert [r.getMessage() for r in caplog.records if why in r.getMessage()] and len(caplog.records) == 1


@pytest.mark.gpu
@pytest.mark.skipif(TENSORRT not in ort.get_available_providers(), reason="needs onnxruntime-gpu with TensorRT")
def test_an_onnx_model_loads_on_the_tensorrt_ep_where_the_wheel_has_it(tmp_path: Path):
    providers = with_tensorrt(
        [CUDA, CPU],
        ort.get_available_providers(),
        Settings(ort_tensorrt=True, ort_tensorrt_cache_dir=tmp_path),
        "identity",
    )

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = ort.InferenceSession(str(path), providers=providers)
    assert session.get_providers()[0] == TENSORRT
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None]
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.maximum(x, 0))
