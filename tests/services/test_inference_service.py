"""Inference stage through a real server: metadata, readiness, batched runs, per-item errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from inferline.common import tensors
from inferline.common.generated import inference_pb2, inference_pb2_grpc, types_pb2
from inferline.common.recipes import Recipe

STANDIN_SHA256 = "33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b"


@pytest.fixture(scope="module")
def stub(stack):
    """The session stack's inference stage: the models load once for the whole run."""
    with grpc.insecure_channel(stack.servers["inference"].address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def _item(array: np.ndarray, name: str = "images") -> inference_pb2.InferItem:
    return inference_pb2.InferItem(inputs=[tensors.to_proto(array, name)])


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def test_server_is_live_and_ready_once_models_are_loaded(stub):
    assert stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=5).ready
    assert stub.ModelReady(inference_pb2.ModelReadyRequest(name="yolov8n"), timeout=5).ready


def test_metadata_describes_everything_a_caller_plans_with(stub):
    meta = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="yolov8n"), timeout=5)
    assert (meta.name, meta.task, meta.platform, list(meta.versions)) == ("yolov8n", "detect", "torch", ["1"])
    assert meta.inputs[0].name == "images" and meta.inputs[0].datatype == types_pb2.DATA_TYPE_UINT8
    assert list(meta.inputs[0].shape) == [3, -1, -1]
    assert meta.outputs[0].datatype == types_pb2.DATA_TYPE_FP32
    assert Recipe.from_proto(meta.preprocess).name == "letterbox"
    assert Recipe.from_proto(meta.postprocess).params == {"conf": 0.25, "iou": 0.7, "max_det": 300}
    assert len(meta.labels) == 80 and meta.labels[0] == "person" and meta.labels[32] == "sports ball"
    assert meta.weights.path == "yolov8n.pt"  # the file's name: the server's folders stay private
    assert meta.weights.sha256 == STANDIN_SHA256 and meta.weights.official is False


def test_list_models_lists_the_repository(stub):
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
    assert {m.name for m in models} == {
        "yolov8n",
        "yolov8n-seg",
        "fasterrcnn-mobilenet-v3-large-320-fpn",
        "clip-vit-b-32",
        "clip-vit-b-32-text",
    }


@pytest.mark.parametrize("method", ["ModelMetadata", "ModelReady"])
def test_unknown_model_is_not_found_with_the_served_models_named(stub, method):
    request_type = getattr(inference_pb2, f"{method}Request")
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request_type(name="nope"), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'nope'" in raised.value.details() and "yolov8n" in raised.value.details()


def test_unknown_version_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="yolov8n", version="7"), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_infer_runs_items_of_different_shapes_and_fails_bad_items_alone(stub):
    request = inference_pb2.ModelInferRequest(
        model_name="yolov8n",
        id="req-1",
        items=[
            _item(_image(480, 640)),
            _item(np.zeros((3, 480, 640), np.float32)),  # wrong dtype
            _item(_image(224, 640, seed=1)),
            _item(_image(480, 640), name="pixels"),  # wrong input name
            inference_pb2.InferItem(
                inputs=[
                    types_pb2.Tensor(name="images", datatype=types_pb2.DATA_TYPE_UINT8, shape=[3, 32, 32], data=b"\x00")
                ]
            ),
            _item(_image(32, 32)[0]),  # wrong rank
        ],
    )
    response = stub.ModelInfer(request, timeout=60)
    assert response.id == "req-1" and response.model_name == "yolov8n"
    codes = [r.status.code for r in response.results]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [0, invalid, 0, invalid, invalid, invalid]
    assert "must be uint8" in response.results[1].status.message
    assert tensors.from_proto(response.results[0].outputs[0]).shape == (84, 6300)
    assert tensors.from_proto(response.results[2].outputs[0]).shape == (84, 2940)


def test_a_batch_gives_each_item_what_it_gets_alone(stub):
    images = [_image(256, 320, seed=s) for s in range(3)]
    batch = stub.ModelInfer(
        inference_pb2.ModelInferRequest(model_name="yolov8n", items=[_item(i) for i in images]), timeout=60
    )
    for image, result in zip(images, batch.results, strict=False):
        alone = stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="yolov8n", items=[_item(image)]), timeout=60)
        np.testing.assert_allclose(
            tensors.from_proto(result.outputs[0]), tensors.from_proto(alone.results[0].outputs[0]), rtol=1e-3, atol=1e-3
        )


def test_infer_on_an_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="nope", items=[_item(_image(32, 32))]), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_min_score_keeps_exactly_the_candidates_above_it_in_order(stub, sample_images):
    import cv2  # noqa: PLC0415

    from inferline.services.preprocess.letterbox import letterbox  # noqa: PLC0415

    item = _item(letterbox(cv2.imread(str(sample_images[0])), (640, 640))[0])
    full = stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="yolov8n", items=[item]), timeout=30)
    kept = stub.ModelInfer(
        inference_pb2.ModelInferRequest(model_name="yolov8n", items=[item], min_score=0.25), timeout=30
    )
    everything = tensors.from_proto(full.results[0].outputs[0])
    candidates = tensors.from_proto(kept.results[0].outputs[0])
    expected = everything[:, everything[4:].max(axis=0) > 0.25]
    assert 0 < candidates.shape[1] < everything.shape[1] // 10
    np.testing.assert_array_equal(candidates, expected)
    assert len(kept.results[0].outputs[0].data) * 10 < len(full.results[0].outputs[0].data)


def test_a_segment_model_answers_its_head_and_prototypes_and_filters_only_the_head(stack, stub, sample_images):
    import cv2  # noqa: PLC0415

    from inferline.services.preprocess.letterbox import letterbox  # noqa: PLC0415

    item = _item(letterbox(cv2.imread(str(sample_images[0])))[0])  # 480 x 640
    # Unfiltered, the head and the prototypes are 5 MB: over a default client's 4 MB limit.
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    with grpc.insecure_channel(stack.servers["inference"].address, options=options) as channel:
        full = inference_pb2_grpc.InferenceServiceStub(channel).ModelInfer(
            inference_pb2.ModelInferRequest(model_name="yolov8n-seg", items=[item]), timeout=30
        )
    kept = stub.ModelInfer(
        inference_pb2.ModelInferRequest(model_name="yolov8n-seg", items=[item], min_score=0.25), timeout=30
    )
    head, protos = (tensors.from_proto(t) for t in full.results[0].outputs)
    assert [t.name for t in full.results[0].outputs] == ["output0", "output1"]
    assert head.shape == (4 + 80 + 32, 6300) and protos.shape == (32, 120, 160)
    candidates, same_protos = (tensors.from_proto(t) for t in kept.results[0].outputs)
    # Only the 80 class rows decide; the 32 mask coefficients ride along with their anchors.
    np.testing.assert_array_equal(candidates, head[:, head[4:84].max(axis=0) > 0.25])
    assert 0 < candidates.shape[1] < head.shape[1] // 10
    np.testing.assert_array_equal(same_protos, protos)


@pytest.mark.parametrize("min_score", [-0.1, 1.5])
def test_min_score_outside_zero_one_is_invalid(stub, min_score):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(
            inference_pb2.ModelInferRequest(model_name="yolov8n", items=[_item(_image(64, 64))], min_score=min_score),
            timeout=10,
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "min_score" in raised.value.details()


def test_min_score_leaves_models_without_a_candidate_filter_alone(stub):
    tokens = np.zeros((77,), dtype=np.int64)
    plain = stub.ModelInfer(
        inference_pb2.ModelInferRequest(model_name="clip-vit-b-32-text", items=[_item(tokens, "tokens")]), timeout=30
    )
    hinted = stub.ModelInfer(
        inference_pb2.ModelInferRequest(
            model_name="clip-vit-b-32-text", items=[_item(tokens, "tokens")], min_score=0.9
        ),
        timeout=30,
    )
    assert hinted.results[0].outputs[0].data == plain.results[0].outputs[0].data
