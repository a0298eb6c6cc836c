"""Inference stage through a real server, over its one protocol (OIP, the generated stub):
metadata, readiness, batched runs, the candidate filter, and errors.

OIP has no per-item status: a request is one batch that succeeds or fails whole, so what used
to be one bad item among good ones is now one bad request beside good ones."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from inferline.common import oip
from inferline.common.generated import grpc_service_pb2 as pb
from inferline.common.generated import grpc_service_pb2_grpc
from inferline.common.model_info import ModelInfo

STANDIN_SHA256 = "33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b"


@pytest.fixture(scope="module")
def stub(stack):
    """The session stack's inference stage: the models load once for the whole run."""
    # Unfiltered, a segment model's head and prototypes are 5 MB: over a default client's 4 MB.
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(stack.servers["inference"].address, options=options) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(
    model: str, inputs: dict[str, np.ndarray], min_score: float | None = None, **fields
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, array in inputs.items():
        tensor, data = oip.input_tensor(name, array)
        request.inputs.append(tensor)
        request.raw_input_contents.append(data)
    if min_score is not None:
        request.parameters[oip.MIN_SCORE].double_param = min_score
    return request


def _infer(stub, model: str, batch: np.ndarray, name: str = "images", **kwargs) -> list[dict[str, np.ndarray]]:
    response = stub.ModelInfer(_request(model, {name: batch}, **kwargs), timeout=60)
    return oip.unstack_items(oip.decode_outputs(response))


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def test_server_is_live_and_ready_once_models_are_loaded(stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="yolov8n"), timeout=5).ready


def test_model_config_describes_everything_a_caller_plans_with(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="yolov8n"), timeout=5).config
    info = ModelInfo.from_config(config, "1")
    assert (info.name, info.task, info.platform, info.version) == ("yolov8n", "detect", "onnxruntime", "1")
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("images", "uint8", (3, -1, -1))]
    assert info.outputs[0].dtype == "float32"
    assert info.preprocess.name == "letterbox"
    assert info.postprocess.params == {"conf": 0.25, "iou": 0.7, "max_det": 300}
    assert len(info.labels) == 80 and info.labels[0] == "person" and info.labels[32] == "sports ball"
    assert info.weights.file == "yolov8n.pt"  # the file's name: the server's folders stay private
    assert info.weights.sha256 == STANDIN_SHA256 and info.weights.official is False


def test_the_repository_index_lists_the_repository(stub):
    models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
    assert {m.name for m in models} == {
        "yolov8n",
        "yolov8n-seg",
        "fasterrcnn-mobilenet-v3-large-320-fpn",
        "clip-vit-b-32",
        "clip-vit-b-32-text",
    }


@pytest.mark.parametrize("method", ["ModelMetadata", "ModelReady", "ModelConfig"])
def test_unknown_model_is_not_found_with_the_served_models_named(stub, method):
    request_type = getattr(pb, f"{method}Request")
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request_type(name="nope"), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'nope'" in raised.value.details() and "yolov8n" in raised.value.details()


def test_unknown_version_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="yolov8n", version="7"), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_requests_of_different_shapes_run_and_a_bad_request_fails_alone(stub):
    """Formerly one request of good and bad items; OIP has no per-item status, so each is a
    request of its own, on one channel, and each bad one fails without touching the others."""
    good = [_image(480, 640), _image(224, 640, seed=1)]
    bad = [
        ({"images": np.zeros((1, 3, 480, 640), np.float32)}, "is UINT8, got FP32"),
        ({"pixels": _image(480, 640)[None]}, "unknown: 'pixels'"),
        ({"images": _image(32, 32)[0][None]}, "has shape [-1, 3, -1, -1]"),
    ]
    for inputs, says in bad:
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(_request("yolov8n", inputs), timeout=60)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and says in raised.value.details()
    response = stub.ModelInfer(_request("yolov8n", {"images": good[0][None]}, id="req-1"), timeout=60)
    assert response.id == "req-1" and response.model_name == "yolov8n"
    assert oip.decode_outputs(response)["output0"].shape == (1, 84, 6300)
    assert _infer(stub, "yolov8n", good[1][None])[0]["output0"].shape == (84, 2940)


def test_a_batch_gives_each_item_what_it_gets_alone(stub):
    images = [_image(256, 320, seed=s) for s in range(3)]
    batch = _infer(stub, "yolov8n", np.stack(images))
    for image, result in zip(images, batch, strict=True):
        (alone,) = _infer(stub, "yolov8n", image[None])
        np.testing.assert_allclose(result["output0"], alone["output0"], rtol=1e-3, atol=1e-3)


def test_infer_on_an_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(_request("nope", {"images": _image(32, 32)[None]}), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def _scene(sample_images, size=(640, 640)) -> np.ndarray:
    import cv2  # noqa: PLC0415

    from inferline.services.preprocess.letterbox import letterbox  # noqa: PLC0415

    return letterbox(cv2.imread(str(sample_images[0])), size)[0]


def test_min_score_keeps_exactly_the_candidates_above_it_in_order(stub, sample_images):
    image = _scene(sample_images)[None]
    (full,) = _infer(stub, "yolov8n", image)
    everything = full["output0"]
    score = float(np.quantile(everything[4:].max(axis=0), 0.99))  # the stand-in weights score low
    (kept,) = _infer(stub, "yolov8n", image, min_score=score)
    candidates = kept["output0"]
    expected = everything[:, everything[4:].max(axis=0) > score]
    assert 0 < candidates.shape[1] < everything.shape[1] // 10
    np.testing.assert_array_equal(candidates, expected)


def test_a_segment_model_answers_its_head_and_prototypes_and_filters_only_the_head(stub, sample_images):
    image = _scene(sample_images, (480, 640))[None]
    response = stub.ModelInfer(_request("yolov8n-seg", {"images": image}), timeout=30)
    assert [t.name for t in response.outputs] == ["output0", "output1", "output0__shape", "output1__shape"]
    (full,) = oip.unstack_items(oip.decode_outputs(response))
    head, protos = full["output0"], full["output1"]
    assert head.shape == (4 + 80 + 32, 6300) and protos.shape == (32, 120, 160)
    score = float(np.quantile(head[4:84].max(axis=0), 0.99))
    (kept,) = _infer(stub, "yolov8n-seg", image, min_score=score)
    # Only the 80 class rows decide; the 32 mask coefficients ride along with their anchors.
    np.testing.assert_array_equal(kept["output0"], head[:, head[4:84].max(axis=0) > score])
    assert 0 < kept["output0"].shape[1] < head.shape[1] // 10
    np.testing.assert_array_equal(kept["output1"], protos)


@pytest.mark.parametrize("min_score", [-0.1, 1.5])
def test_min_score_outside_zero_one_is_invalid(stub, min_score):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(_request("yolov8n", {"images": _image(64, 64)[None]}, min_score=min_score), timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "min_score" in raised.value.details()


def test_min_score_leaves_models_without_a_candidate_filter_alone(stub):
    tokens = np.zeros((1, 77), dtype=np.int64)
    plain = stub.ModelInfer(_request("clip-vit-b-32-text", {"tokens": tokens}), timeout=30)
    hinted = stub.ModelInfer(_request("clip-vit-b-32-text", {"tokens": tokens}, min_score=0.9), timeout=30)
    assert hinted.raw_output_contents == plain.raw_output_contents
