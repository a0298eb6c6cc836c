"""The gateway serves the Open Inference Protocol's REST form, so an unmodified tritonclient.http works.

The gateway translates REST v2 to ``inference.GRPCInferenceService`` on its upstream. Here the
upstream is the session stack's inference stage (``INFERLINE_GATEWAY_OIP_TARGET``), an OIP server
that exists today; every answer through the gateway must equal tritonclient.grpc's straight from
that server. BYTES, which no served model takes, is specified on the translation functions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from inferline.common.generated import grpc_service_pb2 as pb
from inferline.common.oip_bytes import serialize
from inferline.services.gateway.oip_rest import BadRequest, infer_request, infer_response
from tests.support.gateway import RunningGateway

IMAGE = np.random.default_rng(7).integers(0, 256, (1, 3, 64, 96), dtype=np.uint8)


@pytest.fixture(scope="module")
def oip_gateway(stack) -> Iterator[RunningGateway]:
    settings = dataclasses.replace(stack.settings, gateway_oip_target=stack.servers["inference"].address)
    running = RunningGateway(settings, stack.controller)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(oip_gateway) -> Iterator[triton_http.InferenceServerClient]:
    running = triton_http.InferenceServerClient(oip_gateway.url.removeprefix("http://"), network_timeout=120)
    yield running
    running.close()


@pytest.fixture(scope="module")
def direct(stack) -> Iterator[triton_grpc.InferenceServerClient]:
    with triton_grpc.InferenceServerClient(stack.servers["inference"].address) as running:
        yield running


@pytest.fixture()
def http(oip_gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=oip_gateway.url, timeout=120) as running:
        yield running


@pytest.fixture(scope="module")
def expected(direct) -> np.ndarray:
    tensor = triton_grpc.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    return direct.infer("yolov8n", [tensor]).as_numpy("output0")


def test_health_server_metadata_and_model_readiness(client, direct):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("yolov8n") and client.is_model_ready("yolov8n", "1")
    meta = direct.get_server_metadata()
    assert client.get_server_metadata() == {
        "name": meta.name, "version": meta.version, "extensions": list(meta.extensions)
    }


def test_model_metadata_is_the_upstreams(client, direct):
    meta = direct.get_model_metadata("yolov8n")
    for version in ("", "1"):
        assert client.get_model_metadata("yolov8n", version) == {
            "name": "yolov8n",
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, -1, -1]}],
            "outputs": [
                {"name": "output0", "datatype": "FP32", "shape": [-1, 84, -1]},
                {"name": "output0__shape", "datatype": "INT64", "shape": [-1, 2]},
            ],
        }


def test_model_config_is_the_upstreams_as_protobuf_json(client, direct):
    config = client.get_model_config("yolov8n")
    want = direct.get_model_config("yolov8n", as_json=True)["config"]
    assert config == want
    assert config["name"] == "yolov8n" and config["max_batch_size"] == 32
    assert config["parameters"]["task"] == {"string_value": "detect"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_gives_what_tritonclient_grpc_gives(client, expected, binary):
    tensor = triton_http.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE, binary_data=binary)
    output = triton_http.InferRequestedOutput("output0", binary_data=binary)
    result = client.infer("yolov8n", [tensor], outputs=[output], request_id="r7")
    assert result.get_response()["id"] == "r7"
    assert result.get_output("output0")["datatype"] == "FP32"
    assert ("binary_data_size" in result.get_output("output0").get("parameters", {})) is binary
    np.testing.assert_array_equal(result.as_numpy("output0"), expected)


def test_outputs_not_asked_for_come_back_binary_under_binary_data_output(client, expected):
    tensor = triton_http.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    result = client.infer("yolov8n", [tensor], model_version="1")  # tritonclient sets binary_data_output
    assert result.get_output("output0")["parameters"]["binary_data_size"] == expected.nbytes
    np.testing.assert_array_equal(result.as_numpy("output0"), expected)


def test_nested_json_data_and_request_parameters_pass_through(http, direct):
    body = {
        "parameters": {"min_score": "0.25"},
        "inputs": [{"name": "images", "shape": list(IMAGE.shape), "datatype": "UINT8", "data": IMAGE.tolist()}],
    }
    reply = http.post("/v2/models/yolov8n/infer", json=body)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    (output,) = [o for o in reply.json()["outputs"] if o["name"] == "output0"]
    tensor = triton_grpc.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    want = direct.infer("yolov8n", [tensor], parameters={"min_score": "0.25"}).as_numpy("output0")
    assert output["shape"] == list(want.shape) and want.shape[2] < 6300  # the parameter reached the model
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32).reshape(want.shape), want)


def test_unknown_model_is_404_with_the_error_key(client, http):
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("nope")
    assert raised.value.status() == "404" and "yolov8n" in raised.value.message()
    reply = http.post("/v2/models/nope/infer", json={"inputs": [{"name": "x", "shape": [1], "datatype": "INT8",
                                                                  "data": [1]}]})
    assert reply.status_code == 404 and "nope" in reply.json()["error"]


def test_an_input_the_model_refuses_is_400_with_the_upstreams_reason(client):
    tensor = triton_http.InferInput("images", list(IMAGE.shape), "FP32")
    tensor.set_data_from_numpy(IMAGE.astype(np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("yolov8n", [tensor])
    assert raised.value.status() == "400" and "is UINT8, got FP32" in raised.value.message()


@pytest.mark.parametrize(
    ("body", "headers", "says"),
    [
        (b"{not json", {}, "not valid JSON"),
        (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "UINT9", "data": [1]}]}).encode(), {},
         "'UINT9' is not an OIP datatype"),
        (json.dumps({"inputs": [{"name": "images", "shape": [2, 2], "datatype": "UINT8", "data": [1, 2, 3]}]}).encode(),
         {}, "shape [2, 2] holds 4 elements, `data` has 3"),
        (json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 8, 8], "datatype": "UINT8",
                                 "parameters": {"binary_data_size": 192}}]}).encode() + b"\0" * 100,
         "header", "runs past the binary data"),
        (json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 8, 8], "datatype": "UINT8",
                                 "parameters": {"binary_data_size": 100}}]}).encode() + b"\0" * 100,
         "header", "needs 192 bytes"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "but the body has 2 bytes"),
        (b"{}", {}, "needs `inputs`"),
    ],
    ids=["malformed-json", "bad-datatype", "shape-data-mismatch", "truncated-binary", "wrong-binary-size",
         "header-length-past-body", "no-inputs"],
)
def test_requests_the_gateway_cannot_translate_are_400_saying_what_to_fix(http, body, headers, says):
    if headers == "header":
        headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    reply = http.post("/v2/models/yolov8n/infer", content=body, headers=headers)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]
    assert http.get("/v2/health/live").status_code == 200  # and the gateway stays up


# BYTES: the binary form is tritonclient's, both ways; JSON strings are UTF-8.


def test_bytes_inputs_in_json_and_binary_become_the_same_raw_contents():
    strings = [["caf\u00e9", "b"], ["", "d"]]
    raw = serialize(np.array([s.encode() for row in strings for s in row], dtype=object))
    from_json, _ = infer_request("m", "", {"inputs": [{"name": "t", "shape": [2, 2], "datatype": "BYTES",
                                                       "data": strings}]}, b"")
    from_binary, _ = infer_request(
        "m", "", {"inputs": [{"name": "t", "shape": [2, 2], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(raw)}}]}, raw,
    )
    assert list(from_json.raw_input_contents) == list(from_binary.raw_input_contents) == [raw]
    with pytest.raises(BadRequest, match="holds 3 BYTES elements"):
        infer_request("m", "", {"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES",
                                            "parameters": {"binary_data_size": len(raw)}}]}, raw)


def test_parameters_pass_through_typed_and_binary_extension_parameters_stay_behind():
    message, binary = infer_request(
        "m", "2",
        {"id": "x", "parameters": {"b": True, "i": 3, "f": 0.5, "s": "v", "binary_data_output": True},
         "inputs": [{"name": "t", "shape": [1], "datatype": "FP64", "data": [1.5], "parameters": {"k": 1}}],
         "outputs": [{"name": "o", "parameters": {"binary_data": False, "top": 2}}, {"name": "p"}]},
        b"",
    )
    params = message.parameters
    assert (params["b"].bool_param, params["i"].int64_param, params["f"].double_param, params["s"].string_param) == (
        True, 3, 0.5, "v")
    assert "binary_data_output" not in params and message.inputs[0].parameters["k"].int64_param == 1
    assert dict(message.outputs[0].parameters) == {"top": pb.InferParameter(int64_param=2)}
    assert (message.model_version, message.id) == ("2", "x")
    assert np.frombuffer(message.raw_input_contents[0], "<f8").tolist() == [1.5]
    assert binary == {"*", "-o"}  # o asked for JSON by name; p and the rest follow binary_data_output


def test_bytes_outputs_answer_as_json_strings_or_binary():
    raw = serialize(np.array([b"x", "\u00fc".encode()], dtype=object))
    reply = pb.ModelInferResponse(model_name="m", model_version="1", raw_output_contents=[raw, raw])
    reply.outputs.add(name="a", datatype="BYTES", shape=[2])
    reply.outputs.add(name="b", datatype="BYTES", shape=[2])
    response = infer_response(reply, {"b"})
    assert response.media_type == "application/octet-stream"
    length = int(response.headers["Inference-Header-Content-Length"])
    header, rest = json.loads(bytes(response.body[:length])), bytes(response.body[length:])
    assert header["outputs"][0]["data"] == ["x", "\u00fc"]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": len(raw)} and rest == raw
    assert deserialize_bytes_tensor(rest).tolist() == [b"x", "\u00fc".encode()]


def test_an_upstream_that_is_down_is_503_with_the_error_key(orphan_gateway):
    with httpx.Client(base_url=orphan_gateway.url, timeout=30) as http:
        reply = http.get("/v2/health/ready", headers={"X-Request-Timeout": "5"})
    assert reply.status_code == 503 and "unavailable" in reply.json()["error"]


# The gateway's own upstream, by default: the controller's pipelines (docs/oip-pipelines.md).


@pytest.fixture(scope="module")
def pipeline_gateway(stack) -> Iterator[RunningGateway]:
    running = RunningGateway(stack.settings, stack.controller)
    yield running
    running.stop()


def test_a_pipeline_takes_encoded_images_over_rest_as_over_grpc(pipeline_gateway, stack, sample_images):
    """JPEG bytes in, EfficientNMS-style detections out: the same answer as the controller's gRPC."""
    encoded = np.array([[p.read_bytes()] for p in sample_images[:2]], dtype=object)
    outputs = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
    rest = triton_http.InferenceServerClient(pipeline_gateway.url.removeprefix("http://"), network_timeout=120)
    try:
        assert rest.is_model_ready("yolov8n")
        inputs = rest.get_model_metadata("yolov8n")["inputs"]
        assert inputs == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}]
        tensor = triton_http.InferInput("IMAGE", [2, 1], "BYTES")
        tensor.set_data_from_numpy(encoded)
        via_rest = rest.infer("yolov8n", [tensor], parameters={"conf": "0.3"})
    finally:
        rest.close()
    with triton_grpc.InferenceServerClient(stack.controller) as grpc_client:
        tensor = triton_grpc.InferInput("IMAGE", [2, 1], "BYTES")
        tensor.set_data_from_numpy(encoded)
        via_grpc = grpc_client.infer("yolov8n", [tensor], parameters={"conf": "0.3"})
    counts = via_rest.as_numpy("num_detections")
    assert counts.shape == (2, 1) and counts.sum() > 0
    for name in outputs:
        np.testing.assert_array_equal(via_rest.as_numpy(name), via_grpc.as_numpy(name))
