"""The inference stage speaks the Open Inference Protocol, and only it: an unmodified
tritonclient works.

Every call goes through ``tritonclient.grpc`` (PyPI, the dev extra) against the session
stack's inference stage, as a Triton user's code would, except the typed-contents case, which
tritonclient's InferInput cannot build (it always sends raw bytes), and ModelStreamInfer's
per-request errors, which use its stub.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferline.common.model_info import ModelInfo
from inferline.common.oip import unstack_items

STANDIN_SHA256 = "33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b"
MODELS = {"yolov8n", "yolov8n-seg", "fasterrcnn-mobilenet-v3-large-320-fpn", "clip-vit-b-32", "clip-vit-b-32-text"}


@pytest.fixture(scope="module")
def client(stack):
    with triton.InferenceServerClient(stack.servers["inference"].address) as running:
        yield running


@pytest.fixture(scope="module")
def images(sample_images) -> list[np.ndarray]:
    """Two real scenes as CHW uint8 at one size (a batch tensor has one shape)."""
    return [
        np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB").resize((640, 480))).transpose(2, 0, 1))
        for p in sample_images[-2:]
    ]


def _input(batch: np.ndarray, name: str = "images", datatype: str = "UINT8") -> triton.InferInput:
    tensor = triton.InferInput(name, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


def _alone(client, image: np.ndarray, model: str = "yolov8n", **parameters) -> dict[str, np.ndarray]:
    """One image's outputs from a request of its own (the path a batch must equal)."""
    result = client.infer(model, [_input(image[None])], parameters=parameters or None)
    response = result.get_response()
    return unstack_items({o.name: result.as_numpy(o.name) for o in response.outputs})[0]


def _status(raised: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return raised.value.status()


def test_server_and_model_health(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("yolov8n") and client.is_model_ready("yolov8n", "1")


def test_server_metadata_lists_only_the_extensions_served(client):
    meta = client.get_server_metadata()
    assert meta.name == "inferline" and meta.version
    assert list(meta.extensions) == [
        "model_configuration", "model_repository", "statistics", "system_shared_memory"
    ]


def test_model_metadata_has_oip_datatypes_and_a_leading_batch_dimension(client):
    meta = client.get_model_metadata("yolov8n")
    assert (meta.name, list(meta.versions), meta.platform) == ("yolov8n", ["1"], "onnxruntime")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("images", "UINT8", [-1, 3, -1, -1])]
    # output0 varies per item (a candidate filter keeps a different number of anchors per image),
    # so a batch carries each item's real shape beside it.
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("output0", "FP32", [-1, 84, -1]), ("output0__shape", "INT64", [-1, 2])
    ]


def test_a_model_without_ragged_outputs_declares_no_shape_outputs(client):
    meta = client.get_model_metadata("clip-vit-b-32")
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("embedding", [-1, 512])]


def test_model_config_is_tritons_with_the_controllers_extras_in_parameters(client):
    config = client.get_model_config("yolov8n").config
    assert (config.name, config.backend, config.max_batch_size) == ("yolov8n", "onnxruntime", 32)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("images", model_config_pb2.TYPE_UINT8, [3, -1, -1])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("output0", model_config_pb2.TYPE_FP32, [84, -1]), ("output0__shape", model_config_pb2.TYPE_INT64, [2])
    ]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params["task"] == "detect"
    assert json.loads(params["preprocess"])["name"] == "letterbox"
    postprocess = {"name": "yolo_detect", "params": {"conf": 0.25, "iou": 0.7, "max_det": 300}}
    assert json.loads(params["postprocess"]) == postprocess
    labels = json.loads(params["labels"])
    assert len(labels) == 80 and labels[0] == "person"
    assert json.loads(params["candidate_filter"]) == {"name": "yolo", "params": {"output": "output0"}}
    assert params["weights_file"] == "yolov8n.pt" and params["weights_sha256"] == STANDIN_SHA256
    assert json.loads(params["weights_official"]) is False


def test_model_config_reads_back_as_the_stages_model_info(stack, client):
    """What the controller plans with over OIP is what the stage describes in process."""
    inference = stack.servers["inference"].app.service.domain
    for name in MODELS:
        config = client.get_model_config(name).config
        assert ModelInfo.from_config(config, "1") == inference.info(name), name


def test_repository_index_lists_every_model_ready(client):
    index = client.get_model_repository_index()
    assert {m.name for m in index.models} == MODELS
    assert {(m.version, m.state) for m in index.models} == {("1", "READY")}


def test_a_batch_in_raw_contents_gives_what_each_image_alone_gives(client, images):
    result = client.infer("yolov8n", [_input(np.stack(images))], request_id="r1")
    assert result.get_response().id == "r1"
    batch = result.as_numpy("output0")
    expected = [_alone(client, image)["output0"] for image in images]
    assert batch.shape == (2, *expected[0].shape)
    assert result.as_numpy("output0__shape").tolist() == [list(e.shape) for e in expected]
    for got, want in zip(batch, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def min_score(client, images) -> str:
    """A score that about one candidate in a hundred of the first scene passes (the stand-in
    weights score low), as the string tritonclient can send."""
    full = _alone(client, images[0])["output0"]
    return f"{np.quantile(full[4:].max(axis=0), 0.99):.6f}"


def test_min_score_travels_as_a_request_parameter_string(client, images, min_score):
    result = client.infer("yolov8n", [_input(images[0][None])], parameters={"min_score": min_score})
    full = _alone(client, images[0])["output0"]
    expected = full[:, full[4:].max(axis=0) > float(min_score)]  # the candidates the NMS would keep
    assert 0 < expected.shape[1] < 6300
    assert result.as_numpy("output0").shape == (1, *expected.shape)
    np.testing.assert_allclose(result.as_numpy("output0")[0], expected, rtol=1e-4, atol=1e-3)


def test_a_filtered_batch_travels_padded_beside_each_items_real_shape(client, images, min_score):
    """Each image keeps its own number of candidates: one batch tensor padded with zeros, and
    ``output0__shape`` to cut each back (what the controller's port does)."""
    result = client.infer("yolov8n", [_input(np.stack(images))], parameters={"min_score": min_score})
    shapes = result.as_numpy("output0__shape")
    batch = result.as_numpy("output0")
    alone = [_alone(client, image, min_score=min_score)["output0"] for image in images]
    assert shapes.tolist() == [list(a.shape) for a in alone]
    assert shapes[0, 1] != shapes[1, 1], "the two scenes keep different numbers of candidates"
    assert batch.shape == (2, 84, int(shapes[:, 1].max()))
    for got, want in zip(unstack_items({"output0": batch, "output0__shape": shapes}), alone, strict=True):
        np.testing.assert_allclose(got["output0"], want, rtol=1e-4, atol=1e-3)


def test_a_detector_batch_of_different_detection_counts_comes_back_per_image(client, images):
    model = "fasterrcnn-mobilenet-v3-large-320-fpn"
    result = client.infer(model, [_input(np.stack(images))])
    names = [o.name for o in result.get_response().outputs]
    assert set(names) == {"boxes", "scores", "labels", "boxes__shape", "scores__shape", "labels__shape"}
    items = unstack_items({name: result.as_numpy(name) for name in names})
    for image, item in zip(images, items, strict=True):
        alone = _alone(client, image, model)
        assert item["boxes"].shape == alone["boxes"].shape and item["boxes"].shape[1] == 4
        for name in ("boxes", "scores", "labels"):
            np.testing.assert_allclose(item[name], alone[name], rtol=1e-4, atol=1e-3)


def test_outputs_can_be_asked_for_by_name_shape_outputs_too(client, images):
    model = "fasterrcnn-mobilenet-v3-large-320-fpn"
    wanted = [triton.InferRequestedOutput("scores"), triton.InferRequestedOutput("scores__shape")]
    result = client.infer(model, [_input(np.stack(images))], outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["scores", "scores__shape"]
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [_input(images[0][None])], outputs=[triton.InferRequestedOutput("masks")])
    assert _status(raised) == "StatusCode.INVALID_ARGUMENT" and "scores__shape" in raised.value.message()


def test_a_stream_answers_each_request_and_outlives_a_failed_one(stack, images):
    """Requests of one stream run concurrently (they reach the batcher together) and are answered
    as each is done, as Triton's are: a client matches answers by ``id``."""
    def request(model: str, id: str) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name=model, id=id)
        message.inputs.add(name="images", datatype="UINT8", shape=[1, *images[0].shape])
        message.raw_input_contents.append(images[0].tobytes())
        return message

    with grpc.insecure_channel(stack.servers["inference"].address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        requests = [request("yolov8n", "a"), request("nope", "b"), request("yolov8n", "c")]
        answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter(requests), timeout=120)}
    assert sorted(answers) == ["a", "b", "c"]
    assert "nope" in answers["b"].error_message and answers["b"].infer_response.model_name == "nope"
    for good in ("a", "c"):
        assert not answers[good].error_message
        assert triton.InferResult(answers[good].infer_response).as_numpy("output0").shape[:2] == (1, 84)


def test_the_stage_serves_no_other_inference_protocol(stack):
    """Only OIP: the stage's former inferline.v1.InferenceService is gone."""
    with grpc.insecure_channel(stack.servers["inference"].address) as channel:
        call = channel.unary_unary("/inferline.v1.InferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_typed_contents_give_what_raw_contents_give(stack, client):
    image = np.random.default_rng(3).integers(0, 256, (1, 3, 64, 96), dtype=np.uint8)
    raw = client.infer("yolov8n", [_input(image)]).as_numpy("output0")
    request = service_pb2.ModelInferRequest(model_name="yolov8n")
    request.inputs.add(name="images", datatype="UINT8", shape=image.shape).contents.uint_contents.extend(
        image.ravel().tolist()
    )
    with grpc.insecure_channel(stack.servers["inference"].address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    typed = triton.InferResult(response).as_numpy("output0")
    np.testing.assert_allclose(typed, raw, rtol=1e-4, atol=1e-3)


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("nope")
    assert _status(raised) == "StatusCode.NOT_FOUND" and "yolov8n" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("nope", [_input(np.zeros((1, 3, 32, 32), np.uint8))])
    assert _status(raised) == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        (_input(np.zeros((1, 3, 32, 32), np.float32), datatype="FP32"), "is UINT8, got FP32"),
        (_input(np.zeros((3, 32, 32), np.uint8)), "has shape [-1, 3, -1, -1]"),
        (_input(np.zeros((1, 4, 32, 32), np.uint8)), "got [1, 4, 32, 32]"),
        (_input(np.zeros((33, 3, 8, 8), np.uint8)), "max_batch_size"),
        (_input(np.zeros((1, 3, 32, 32), np.uint8), name="pixels"), "unknown: 'pixels'"),
    ],
    ids=["wrong-datatype", "no-batch-dimension", "wrong-channels", "batch-over-max", "unknown-input"],
)
def test_bad_inputs_are_invalid_argument_saying_what_is_expected(client, tensor, says):
    with pytest.raises(InferenceServerException) as raised:
        client.infer("yolov8n", [tensor])
    assert _status(raised) == "StatusCode.INVALID_ARGUMENT"
    assert says in raised.value.message()


def test_a_min_score_that_is_no_number_is_invalid_argument(client, images):
    with pytest.raises(InferenceServerException) as raised:
        client.infer("yolov8n", [_input(images[0][None])], parameters={"min_score": "high"})
    assert _status(raised) == "StatusCode.INVALID_ARGUMENT" and "min_score" in raised.value.message()


def test_raw_contents_that_do_not_match_the_shape_are_invalid_argument(stack):
    request = service_pb2.ModelInferRequest(model_name="yolov8n")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(b"\x00" * 10)
    with grpc.insecure_channel(stack.servers["inference"].address) as channel, pytest.raises(grpc.RpcError) as raised:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 3072 bytes, got 10" in raised.value.details()
