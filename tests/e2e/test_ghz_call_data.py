"""The ghz files in bench/ghz/ are what a running stack takes: each config names a method the
controller serves, and make_request.py's call data parses as that method's request and is
answered (ghz itself is not installable here, so the stack answers the same data over grpcio)."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from inferline.common.generated import controller_pb2, controller_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from tests.conftest import REPO

GHZ = REPO / "bench" / "ghz"


def _call_data(*args: str) -> object:
    done = subprocess.run([sys.executable, str(GHZ / "make_request.py"), *args], capture_output=True, text=True,
                          check=True, timeout=60)
    return json.loads(done.stdout)


@pytest.mark.parametrize("config, service", [
    ("detect.json", controller_pb2.DESCRIPTOR.services_by_name["ControllerService"]),
    ("pipeline-infer.json", grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
])
def test_each_config_calls_a_method_the_controller_serves(config, service):
    call = json.loads((GHZ / config).read_text())["call"]
    name, _, method = call.rpartition(".")
    assert name == service.full_name and service.methods_by_name.get(method) is not None


def test_oip_call_data_is_answered_by_the_controllers_pipeline(stack, sample_images):
    data = _call_data("--oip", "--conf", "0.05", *map(str, sample_images[:2]))
    assert isinstance(data, list) and len(data) == 2  # one image per request, round-robin
    batch = _call_data("--oip", "--one-request", *map(str, sample_images[:2]))
    with grpc.insecure_channel(stack.controller) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for body, images in ((data[0], 1), (batch, 2)):
            request = json_format.ParseDict(body, grpc_service_pb2.ModelInferRequest())
            response = stub.ModelInfer(request, timeout=120)
            (counts,) = [raw for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
                         if out.name == "num_detections"]
            assert np.frombuffer(counts, "<i4").shape == (images,)


def test_detect_call_data_is_a_detect_request_the_controller_answers(stack, sample_images):
    body = _call_data(str(sample_images[0]))
    request = json_format.ParseDict(body, controller_pb2.DetectRequest())
    with grpc.insecure_channel(stack.controller) as channel:
        response = controller_pb2_grpc.ControllerServiceStub(channel).Detect(request, timeout=120)
    assert len(response.results) == 1 and response.results[0].width > 0
