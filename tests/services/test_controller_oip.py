"""The controller's pipelines are Open Inference Protocol models: an unmodified tritonclient
sends encoded images (or texts) and gets what Detect and Embed give, as from a Triton ensemble.

Every call goes through ``tritonclient.grpc`` against the session stack's controller, except
the typed-contents and streaming-error cases, which use tritonclient's own generated stub.
"""

from __future__ import annotations

import dataclasses
import queue
import socket

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferline.common import oip_bytes
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from tests.support.servers import LoopThread, start_stage

YOLO, RCNN, SEG = "yolov8n", "fasterrcnn-mobilenet-v3-large-320-fpn", "yolov8n-seg"
CLIP, CLIP_TEXT = "clip-vit-b-32", "clip-vit-b-32-text"
PIPELINES = {YOLO, RCNN, SEG, CLIP, CLIP_TEXT}
DETECTION_OUTPUTS = ["num_detections", "detection_boxes", "detection_scores", "detection_classes"]


@pytest.fixture(scope="module")
def client(stack):
    with triton.InferenceServerClient(stack.controller) as running:
        yield running


@pytest.fixture(scope="module")
def controller(stack):
    """The controller's own inferline.v1 service: what the pipelines must equal."""
    with grpc.insecure_channel(stack.controller) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


@pytest.fixture(scope="module")
def oip_stub(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def photos(sample_images) -> list[bytes]:
    """Two of the shared scenes (the YOLO stand-ins are trained on such shapes), in which every
    detector finds a different number of objects: one, and more than one."""
    return [p.read_bytes() for p in sample_images[:2]]


def _items(*items: bytes, name: str = "IMAGE", datatype: str = "BYTES") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(items), 1], datatype)
    array = np.empty((len(items), 1), dtype=object)
    array[:, 0] = items
    tensor.set_data_from_numpy(array)
    return tensor


def _detect(controller, model: str, images: list[bytes], **options) -> list[list[types_pb2.Detection]]:
    request = controller_pb2.DetectRequest(
        model=model, images=[types_pb2.Image(data=d) for d in images], options=types_pb2.DetectOptions(**options)
    )
    results = controller.Detect(request, timeout=120).results
    assert all(r.status.code == 0 for r in results)
    return [list(r.detections) for r in results]


def _assert_same_detections(result: triton.InferResult, expected: list[list[types_pb2.Detection]]) -> None:
    counts = result.as_numpy("num_detections")
    boxes, scores = result.as_numpy("detection_boxes"), result.as_numpy("detection_scores")
    classes = result.as_numpy("detection_classes")
    largest = max(len(d) for d in expected)
    assert counts.dtype == np.int32 and classes.dtype == np.int32 and boxes.dtype == scores.dtype == np.float32
    assert counts.tolist() == [[len(d)] for d in expected]
    assert boxes.shape == (len(expected), largest, 4) and scores.shape == classes.shape == (len(expected), largest)
    for i, detections in enumerate(expected):
        n = len(detections)
        want = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in detections], np.float32).reshape(n, 4)
        np.testing.assert_array_equal(boxes[i, :n], want)
        np.testing.assert_array_equal(scores[i, :n], np.array([d.score for d in detections], np.float32))
        assert classes[i, :n].tolist() == [d.class_id for d in detections]
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not classes[i, n:].any()


def _error(raised: pytest.ExceptionInfo[InferenceServerException]) -> tuple[str, str]:
    return raised.value.status(), raised.value.message()


# ---- server and model metadata -------------------------------------------------------------


def test_server_is_live_and_ready_once_the_stages_are(client):
    assert client.is_server_live() and client.is_server_ready()


def test_every_served_model_is_a_ready_pipeline(client):
    assert all(client.is_model_ready(name) for name in PIPELINES)
    assert client.is_model_ready(YOLO, "1")


def test_server_metadata_lists_only_the_extensions_served(client):
    meta = client.get_server_metadata()
    assert meta.name == "inferline" and meta.version and list(meta.extensions) == ["model_configuration"]


def test_repository_index_lists_each_pipeline_ready(client):
    index = client.get_model_repository_index()
    assert {m.name for m in index.models} == PIPELINES
    assert {(m.version, m.state) for m in index.models} == {("1", "READY")}


def test_with_a_stage_down_the_server_is_live_and_its_pipelines_unavailable(stack):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]
    loop = LoopThread()
    broken = dataclasses.replace(stack.settings, preprocess_target=f"127.0.0.1:{unused}")
    controller = start_stage(loop, "controller", broken)
    try:
        with triton.InferenceServerClient(controller.address) as client:
            assert client.is_server_live() and not client.is_server_ready()
            assert not client.is_model_ready(YOLO)
            index = client.get_model_repository_index()
            assert {m.name for m in index.models} == PIPELINES
            assert {m.state for m in index.models} == {"UNAVAILABLE"}
            assert "waiting for yolov8n" in next(m.reason for m in index.models if m.name == YOLO)
    finally:
        controller.stop()
        loop.close()


def test_an_inprocess_controller_serves_its_pipelines_ready_once_loaded(settings, photos):
    loop = LoopThread()
    controller = start_stage(loop, "controller", dataclasses.replace(settings, inprocess=True, models=(YOLO,)))
    try:
        with triton.InferenceServerClient(controller.address) as client:
            assert client.is_server_ready() and client.is_model_ready(YOLO)
            assert [m.name for m in client.get_model_repository_index().models] == [YOLO]
            assert client.infer(YOLO, [_items(photos[0])]).as_numpy("num_detections").tolist() == [[1]]
    finally:
        controller.stop()
        loop.close()


def test_a_detector_takes_encoded_images_and_gives_efficientnms_outputs(client):
    meta = client.get_model_metadata(YOLO)
    assert (meta.name, list(meta.versions), meta.platform) == (YOLO, ["1"], "inferline_pipeline")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("IMAGE", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("num_detections", "INT32", [-1, 1]),
        ("detection_boxes", "FP32", [-1, -1, 4]),
        ("detection_scores", "FP32", [-1, -1]),
        ("detection_classes", "INT32", [-1, -1]),
    ]


def test_clip_towers_take_images_or_texts_and_give_embeddings(client):
    image, text = client.get_model_metadata(CLIP), client.get_model_metadata(CLIP_TEXT)
    assert [(t.name, t.datatype, list(t.shape)) for t in image.inputs] == [("IMAGE", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in text.inputs] == [("TEXT", "BYTES", [-1, 1])]
    for meta in (image, text):
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("embedding", "FP32", [-1, 512])]


def test_model_config_is_an_ensemble_like_pipeline_with_its_task(client, stack):
    config = client.get_model_config(SEG).config
    assert (config.name, config.platform, config.backend) == (SEG, "inferline_pipeline", "inferline")
    assert config.max_batch_size == stack.settings.max_batch_images
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("IMAGE", model_config_pb2.TYPE_STRING, [1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("num_detections", model_config_pb2.TYPE_INT32, [1]),
        ("detection_boxes", model_config_pb2.TYPE_FP32, [-1, 4]),
        ("detection_scores", model_config_pb2.TYPE_FP32, [-1]),
        ("detection_classes", model_config_pb2.TYPE_INT32, [-1]),
    ]
    params = {key: value.string_value for key, value in client.get_model_config(CLIP_TEXT).config.parameters.items()}
    assert params == {"task": "embed", "operation": "Embed", "models": f"{CLIP},{CLIP_TEXT}"}
    assert config.parameters["task"].string_value == "segment"


# ---- inference ------------------------------------------------------------------------------


def test_yolo_batch_gives_exactly_the_detections_detect_gives(client, controller, photos):
    result = client.infer(YOLO, [_items(*photos)], request_id="batch-1")
    assert result.get_response().id == "batch-1"
    _assert_same_detections(result, _detect(controller, YOLO, photos))


def test_detect_options_travel_as_request_parameters(client, controller, photos):
    result = client.infer(YOLO, [_items(photos[1])], parameters={"conf": "0.5", "max_det": 3, "iou": "0.5"})
    _assert_same_detections(result, _detect(controller, YOLO, photos[1:], conf=0.5, max_det=3, iou=0.5))
    assert result.as_numpy("num_detections")[0, 0] <= 3


def test_faster_rcnn_pads_each_image_to_the_largest_count(client, controller, photos):
    expected = _detect(controller, RCNN, photos)
    assert len({len(d) for d in expected}) == 2  # the two scenes differ: padding is exercised
    _assert_same_detections(client.infer(RCNN, [_items(*photos)]), expected)


def test_only_the_outputs_asked_for_come_back(client, photos):
    result = client.infer(YOLO, [_items(photos[0])], outputs=[triton.InferRequestedOutput("num_detections")])
    assert [o.name for o in result.get_response().outputs] == ["num_detections"]


def test_clip_embeddings_equal_the_embed_operations(client, controller, photos):
    texts = ["a red circle", "some squares"]
    response = controller.Embed(
        controller_pb2.EmbedRequest(model=CLIP, images=[types_pb2.Image(data=d) for d in photos], texts=texts),
        timeout=120,
    )
    images = client.infer(CLIP, [_items(*photos)]).as_numpy("embedding")
    embedded_texts = client.infer(CLIP_TEXT, [_items(*(t.encode() for t in texts), name="TEXT")]).as_numpy("embedding")
    np.testing.assert_allclose(images, [list(e.embedding) for e in response.images], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embedded_texts, [list(e.embedding) for e in response.texts], rtol=1e-5, atol=1e-6)


def test_typed_bytes_contents_give_what_raw_contents_give(client, oip_stub, photos):
    request = service_pb2.ModelInferRequest(model_name=YOLO)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(photos[1])
    typed = triton.InferResult(oip_stub.ModelInfer(request, timeout=120))
    raw = client.infer(YOLO, [_items(photos[1])])
    for name in DETECTION_OUTPUTS:
        np.testing.assert_array_equal(typed.as_numpy(name), raw.as_numpy(name))


def test_a_stream_answers_each_request_and_stays_open_after_an_error(client, photos):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(YOLO, [_items(photos[0])], request_id="good-1")
        client.async_stream_infer(YOLO, [_items(b"not an image")], request_id="bad")
        client.async_stream_infer(YOLO, [_items(photos[1])], request_id="good-2")
        got = [answers.get(timeout=120) for _ in range(3)]
    finally:
        client.stop_stream()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for _, e in got if e is not None]
    assert set(results) == {"good-1", "good-2"}
    assert results["good-1"].as_numpy("num_detections")[0, 0] > 0
    assert len(errors) == 1 and "IMAGE[0]" in errors[0].message()


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_model_is_not_found_and_names_the_pipelines(client, photos):
    for call in (lambda: client.get_model_metadata("nope"), lambda: client.infer("nope", [_items(photos[0])])):
        with pytest.raises(InferenceServerException) as raised:
            call()
        status, message = _error(raised)
        assert status == "StatusCode.NOT_FOUND" and YOLO in message


def test_a_bad_image_fails_the_request_naming_the_item(client, photos):
    with pytest.raises(InferenceServerException) as raised:
        client.infer(YOLO, [_items(photos[0], b"\x89PNG broken")])
    status, message = _error(raised)
    assert status == "StatusCode.INVALID_ARGUMENT" and message.startswith("IMAGE[1]: ")


def test_text_that_is_not_utf8_is_invalid_argument(client):
    with pytest.raises(InferenceServerException) as raised:
        client.infer(CLIP_TEXT, [_items(b"fine", b"\xff\xfe", name="TEXT")])
    status, message = _error(raised)
    assert status == "StatusCode.INVALID_ARGUMENT" and "TEXT[1] is not UTF-8" in message


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: _items(b"x", name="images"), "unknown: 'images', missing: IMAGE"),
        (lambda: _items(b"x", name="TEXT"), "takes one input, IMAGE"),
        (lambda: _numeric(np.zeros((1, 1), np.uint8)), "is BYTES, got 'UINT8'"),
        (lambda: _items(*[b"x"] * 65), "batch size 65"),
        (lambda: _flat(b"x"), "has shape [-1, 1]"),
    ],
    ids=["wrong-name", "text-to-an-image-model", "wrong-datatype", "batch-over-max", "no-batch-dimension"],
)
def test_bad_inputs_are_invalid_argument_saying_what_is_expected(client, make, says):
    with pytest.raises(InferenceServerException) as raised:
        client.infer(YOLO, [make()])
    status, message = _error(raised)
    assert status == "StatusCode.INVALID_ARGUMENT" and says in message


def test_a_threshold_that_is_no_number_is_invalid_argument(client, photos):
    with pytest.raises(InferenceServerException) as raised:
        client.infer(YOLO, [_items(photos[0])], parameters={"conf": "high"})
    status, message = _error(raised)
    assert status == "StatusCode.INVALID_ARGUMENT" and "'conf'" in message


def test_raw_bytes_that_are_not_length_prefixed_are_invalid_argument(oip_stub):
    request = service_pb2.ModelInferRequest(model_name=YOLO)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\xff\x00\x00\x00abc")
    with pytest.raises(grpc.RpcError) as raised:
        oip_stub.ModelInfer(request, timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "element 0 says 255 bytes, only 3 follow" in raised.value.details()


def _numeric(array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    return tensor


def _flat(*items: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object))
    return tensor


# ---- BYTES serialisation --------------------------------------------------------------------


def test_bytes_serialisation_is_tritonclients():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor  # noqa: PLC0415 - this test only

    array = np.array([[b"a"], [b""], [b"\x00\x01 zero bytes kept\x00"]], dtype=object)
    assert oip_bytes.serialize(array) == serialize_byte_tensor(array).item()
    back = oip_bytes.deserialize(oip_bytes.serialize(array), (3, 1))
    assert back.dtype == object and back.tolist() == array.tolist()
    assert deserialize_bytes_tensor(oip_bytes.serialize(array)).tolist() == array.ravel().tolist()
