"""The controller's pipelines as OIP models: which models they are, when they are ready, and how
a batch of detections is laid out (services/controller/oip_pipelines.py, without servers)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferline.common.api import DetectResult, ImageDetections
from inferline.common.detections import Detection
from inferline.common.errors import InvalidInput, ModelNotFound, Overloaded, StageUnavailable
from inferline.common.model_info import ModelInfo, TensorInfo
from inferline.common.oip_bytes import deserialize, serialize
from inferline.common.recipes import Recipe
from inferline.services.controller import oip_pipelines
from inferline.services.controller.oip_pipelines import PipelineCatalog
from inferline.services.controller.ports import Deadline


def _model(name: str, task: str, postprocess: dict | None = None, dim: int = 512) -> ModelInfo:
    return ModelInfo(
        name=name, version="1", platform="pytorch", task=task, max_batch_size=8,
        inputs=(TensorInfo("images", "uint8", (3, -1, -1)),),
        outputs=(TensorInfo("embedding", "float32", (dim,)),) if task == "embed" else (),
        preprocess=Recipe("letterbox", {}),
        postprocess=Recipe("clip" if task == "embed" else "yolo_detect", postprocess or {}),
    )


MODELS = [
    _model("yolo", "detect"),
    _model("seg", "segment"),
    _model("clip", "embed", {"text_model": "clip-text"}),
    _model("clip-text", "embed"),
    _model("lonely-text", "embed"),
]


def test_each_detector_and_each_tower_of_a_served_pair_is_a_pipeline():
    pipelines = oip_pipelines.pipelines_from(MODELS)
    assert set(pipelines) == {"yolo", "seg", "clip", "clip-text"}  # lonely-text has no Embed path
    assert [(s.name, s.datatype, s.dims) for s in pipelines["yolo"].inputs] == [("IMAGE", "BYTES", (1,))]
    assert pipelines["clip"].input.name == "IMAGE" and pipelines["clip-text"].input.name == "TEXT"
    assert pipelines["clip-text"].operation_model == "clip"  # texts are embedded through the image tower
    assert pipelines["clip-text"].models == ("clip", "clip-text") == pipelines["clip"].models
    assert pipelines["clip"].outputs[0].dims == (512,)


def test_a_text_tower_whose_image_tower_is_not_served_is_no_pipeline():
    assert set(oip_pipelines.pipelines_from([_model("clip-text", "embed")])) == set()


def test_a_pipeline_is_ready_only_when_the_controller_and_all_its_models_are():
    pipeline = oip_pipelines.pipelines_from(MODELS)["clip-text"]
    assert oip_pipelines.pipeline_ready(pipeline, lambda model: True)
    assert not oip_pipelines.pipeline_ready(pipeline, lambda model: model != "clip")
    assert not oip_pipelines.pipeline_ready(pipeline, lambda model: model != "")


class FakeModels:
    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    async def __call__(self, deadline: Deadline) -> list[ModelInfo]:
        self.calls += 1
        if self.down:
            raise StageUnavailable("inference stage at localhost:1 is unavailable")
        return list(MODELS)


def test_the_catalog_asks_once_and_names_the_pipelines_for_an_unknown_model():
    models = FakeModels()
    catalog = PipelineCatalog(models)

    async def run() -> None:
        assert (await catalog.get("yolo", "", Deadline(5))).task == "detect"
        assert (await catalog.get("seg", "1", Deadline(5))).task == "segment"
        assert models.calls == 1
        with pytest.raises(ModelNotFound, match="served: clip, clip-text, seg, yolo"):
            await catalog.get("nope", "", Deadline(5))
        with pytest.raises(ModelNotFound, match="version '1'"):
            await catalog.get("yolo", "7", Deadline(5))

    asyncio.run(run())


def test_the_last_list_stands_while_the_inference_stage_is_down():
    models = FakeModels()
    catalog = PipelineCatalog(models)

    async def run() -> None:
        await catalog.all(Deadline(5))
        models.down = True
        catalog._fetched -= oip_pipelines.CATALOG_TTL_S  # the list expired
        assert set(await catalog.all(Deadline(5))) == {"yolo", "seg", "clip", "clip-text"}

    asyncio.run(run())


def test_without_any_list_the_stages_error_is_the_answer():
    models = FakeModels()
    models.down = True
    with pytest.raises(StageUnavailable):
        asyncio.run(PipelineCatalog(models).all(Deadline(5)))


def _found(*scores: float) -> list[Detection]:
    return [Detection("c", k, s, (k, k + 1.0, k + 2.0, k + 3.0)) for k, s in enumerate(scores)]


def test_detections_are_padded_to_the_largest_count_with_the_count_beside():
    result = DetectResult("m", "1", [
        ImageDetections("a", detections=_found(0.9)),
        ImageDetections("b", detections=_found(0.8, 0.7, 0.6)),
        ImageDetections("c"),
    ])
    out = oip_pipelines.detect_outputs(result)
    assert out["num_detections"].tolist() == [[1], [3], [0]]
    assert out["detection_boxes"].shape == (3, 3, 4) and out["detection_classes"].shape == (3, 3)
    np.testing.assert_array_equal(out["detection_scores"][1], np.float32([0.8, 0.7, 0.6]))
    assert out["detection_boxes"][1, 2].tolist() == [2, 3, 4, 5]
    assert not out["detection_boxes"][0, 1:].any() and not out["detection_scores"][2].any()


def test_a_batch_without_detections_has_empty_outputs_of_the_right_rank():
    out = oip_pipelines.detect_outputs(DetectResult("m", "1", [ImageDetections("a")]))
    assert out["detection_boxes"].shape == (1, 0, 4) and out["num_detections"].tolist() == [[0]]


def test_a_failed_item_fails_the_request_with_its_code_and_its_index():
    result = DetectResult("m", "1", [ImageDetections("a"), ImageDetections("b", error=Overloaded("full", 2.0))])
    with pytest.raises(Overloaded, match=r"^IMAGE\[1\]: full$") as raised:
        oip_pipelines.detect_outputs(result)
    assert raised.value.retry_after_s == 2.0


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"conf": ("string_param", "x")}, "'conf' must be a number"),
        ({"iou": ("double_param", 1.5)}, "iou must be between 0 and 1"),
        ({"max_det": ("string_param", "2.5")}, "whole number"),
        ({"max_det": ("bool_param", True)}, "'max_det' must be a number"),
    ],
)
def test_bad_detect_parameters_are_invalid_input(parameters, says):
    with pytest.raises(InvalidInput, match=says):
        oip_pipelines.detect_options(parameters)


def test_detect_parameters_of_every_numeric_kind_become_options():
    options = oip_pipelines.detect_options(
        {"conf": ("double_param", 0.4), "iou": ("string_param", "0.6"), "max_det": ("int64_param", 5)}
    )
    assert (options.conf, options.iou, options.max_det) == (0.4, 0.6, 5)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"\x01\x00", "cut inside its 4-byte length"),
        (b"\x05\x00\x00\x00ab", "says 5 bytes, only 2 follow"),
        (serialize(np.array([b"a", b"b"], dtype=object)), "bytes after them"),
        (b"", "needs 1 BYTES elements, got 0"),
    ],
)
def test_malformed_bytes_tensors_are_invalid_input(raw, says):
    with pytest.raises(InvalidInput, match=says):
        deserialize(raw, (1, 1), "IMAGE")
