"""A served model's description travels as Triton's ModelConfig and comes back unchanged; what
OIP has no field for rides in ``parameters``; ragged outputs declare their ``__shape``."""

import json

import pytest

from inferline.common.errors import StageFailed
from inferline.common.generated import model_config_pb2, types_pb2
from inferline.common.model_info import PARAMETER_KEYS, ModelInfo, TensorInfo, WeightsInfo
from inferline.common.recipes import Recipe

DETECTOR = ModelInfo(
    name="frcnn",
    version="1",
    platform="torch",
    task="detect",
    max_batch_size=8,
    inputs=(TensorInfo("images", "uint8", (3, -1, -1)),),
    outputs=(
        TensorInfo("boxes", "float32", (-1, 4)),
        TensorInfo("scores", "float32", (-1,)),
        TensorInfo("count", "int64", (1,)),
    ),
    preprocess=Recipe("rgb", {"size": 320}),
    postprocess=Recipe("torchvision_detect", {"conf": 0.5, "max_det": 100}),
    candidate_filter=Recipe("yolo", {"output": "boxes"}),
    labels=("person", "bicycle"),
    weights=WeightsInfo("frcnn.pth", "ab" * 32, True),
    precision="fp16",
)


def test_a_model_config_reads_back_as_the_model_info_it_was_made_from():
    assert ModelInfo.from_config(DETECTOR.to_config(), "1") == DETECTOR


def test_what_oip_has_no_field_for_travels_in_parameters_as_strings():
    params = {k: v.string_value for k, v in DETECTOR.to_config().parameters.items()}
    assert set(params) == set(PARAMETER_KEYS)
    assert params["task"] == "detect" and params["precision"] == "fp16"
    assert json.loads(params["postprocess"]) == {"name": "torchvision_detect", "params": {"conf": 0.5, "max_det": 100}}
    assert json.loads(params["labels"]) == ["person", "bicycle"]
    assert json.loads(params["weights_official"]) is True


def test_each_ragged_output_of_a_batched_model_declares_its_shape_output():
    config = DETECTOR.to_config()
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("boxes", model_config_pb2.TYPE_FP32, [-1, 4]),
        ("scores", model_config_pb2.TYPE_FP32, [-1]),
        ("count", model_config_pb2.TYPE_INT64, [1]),
        ("boxes__shape", model_config_pb2.TYPE_INT64, [2]),
        ("scores__shape", model_config_pb2.TYPE_INT64, [1]),
    ]
    assert DETECTOR.ragged_outputs == {"boxes", "scores"}


def test_a_model_without_a_batch_dimension_has_no_ragged_outputs():
    unbatched = ModelInfo(**{**DETECTOR.__dict__, "max_batch_size": 0})
    assert unbatched.ragged_outputs == frozenset()
    assert [o.name for o in unbatched.to_config().output] == ["boxes", "scores", "count"]


def test_an_oip_server_without_the_parameters_is_no_inference_stage():
    config = DETECTOR.to_config()
    del config.parameters["task"]
    with pytest.raises(StageFailed, match="no parameters task"):
        ModelInfo.from_config(config)


def test_a_parameter_that_is_not_json_names_the_model_and_the_parameter():
    config = DETECTOR.to_config()
    config.parameters["labels"].string_value = "person,bicycle"
    with pytest.raises(StageFailed, match="'frcnn' labels"):
        ModelInfo.from_config(config)


def test_the_controllers_public_metadata_shows_every_field():
    meta = DETECTOR.to_metadata()
    assert (meta.name, list(meta.versions), meta.platform, meta.task, meta.max_batch_size) == (
        "frcnn", ["1"], "torch", "detect", 8
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("images", types_pb2.DATA_TYPE_UINT8, [3, -1, -1])
    ]
    assert [t.name for t in meta.outputs] == ["boxes", "scores", "count"]
    assert Recipe.from_proto(meta.postprocess).params == {"conf": 0.5, "max_det": 100}
    assert list(meta.labels) == ["person", "bicycle"]
    assert (meta.weights.path, meta.weights.sha256, meta.weights.official) == ("frcnn.pth", "ab" * 32, True)
