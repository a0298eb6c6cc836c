"""The controller's inference port over OIP: items grouped by input shape, one ModelInfer per
group (at most max_batch_size items), ragged outputs cut back per item, and a failed group
failing only its own items."""

import asyncio
import dataclasses

import numpy as np
import pytest

from inferline.common import oip
from inferline.common.errors import InvalidInput, StageUnavailable
from inferline.common.generated import grpc_service_pb2 as pb
from inferline.common.model_info import ModelInfo, TensorInfo
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.services.controller.grpc_ports import GrpcInference, SharedTensors
from inferline.services.controller.ports import Deadline

MODEL = ModelInfo(
    name="det", version="1", platform="torch", task="detect", max_batch_size=2,
    inputs=(TensorInfo("images", "uint8", (3, -1, -1)),), outputs=(TensorInfo("boxes", "float32", (-1, 4)),),
    preprocess=Recipe("letterbox"), postprocess=Recipe("yolo_detect"),
)


class FakeStage:
    """Answers each item of a batch with ``width`` boxes, each box filled with the item's first
    pixel; a batch whose width is ``fail_width`` fails with ``error``."""

    def __init__(self, fail_width: int = -1, error: Exception | None = None):
        self.requests: list[pb.ModelInferRequest] = []
        self.fail_width, self.error = fail_width, error

    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:  # noqa: N802
        self.requests.append(request)
        images = oip.decode_inputs(request)["images"]
        if images.shape[-1] == self.fail_width:
            assert self.error is not None
            raise self.error
        items = [{"boxes": np.full((images.shape[-1], 4), image[0, 0, 0], np.float32)} for image in images]
        response = pb.ModelInferResponse(model_name="det")
        for name, array in oip.stack_items(items, ragged={"boxes"}).items():
            tensor, data = oip.output_tensor(name, array)
            response.outputs.append(tensor)
            response.raw_output_contents.append(data)
        return response


def _port(stage: FakeStage) -> GrpcInference:
    port = GrpcInference.__new__(GrpcInference)

    async def call(method, request, deadline):
        return await method(request)

    port._stub, port._call = stage, call  # type: ignore[assignment]
    port.shared = SharedTensors(Settings(tensor_transport="inline"), stage, call)  # type: ignore[arg-type]
    return port


def _image(width: int, value: int) -> dict[str, np.ndarray]:
    return {"images": np.full((3, 2, width), value, np.uint8)}


def test_items_of_one_shape_share_a_call_chunked_at_max_batch_size_in_request_order():
    stage = FakeStage()
    items = [_image(3, 1), _image(5, 2), _image(3, 3), _image(3, 4)]
    results = asyncio.run(_port(stage).infer(MODEL, items, 0.0, Deadline(5)))
    assert sorted(tuple(r.inputs[0].shape) for r in stage.requests) == [(1, 3, 2, 3), (1, 3, 2, 5), (2, 3, 2, 3)]
    assert [r["boxes"].shape for r in results] == [(3, 4), (5, 4), (3, 4), (3, 4)]
    assert [float(r["boxes"][0, 0]) for r in results] == [1, 2, 3, 4]
    assert all(oip.MIN_SCORE not in r.parameters for r in stage.requests)


def test_min_score_travels_as_a_double_parameter():
    stage = FakeStage()
    asyncio.run(_port(stage).infer(MODEL, [_image(3, 1)], 0.25, Deadline(5)))
    assert stage.requests[0].parameters[oip.MIN_SCORE].double_param == 0.25


def test_a_failed_group_fails_only_its_items():
    stage = FakeStage(fail_width=5, error=InvalidInput("width 5 is refused"))
    results = asyncio.run(_port(stage).infer(MODEL, [_image(3, 1), _image(5, 2), _image(3, 3)], 0.0, Deadline(5)))
    assert isinstance(results[1], InvalidInput) and "width 5" in str(results[1])
    assert [r["boxes"].shape for r in (results[0], results[2])] == [(3, 4), (3, 4)]


def test_an_unavailable_stage_fails_the_whole_call():
    stage = FakeStage(fail_width=5, error=StageUnavailable("inference stage at x is unavailable"))
    with pytest.raises(StageUnavailable):
        asyncio.run(_port(stage).infer(MODEL, [_image(3, 1), _image(5, 2)], 0.0, Deadline(5)))


def test_a_model_without_a_batch_dimension_gets_one_item_a_call():
    stage = FakeStage()

    async def unbatched(request):
        images = oip.decode_inputs(request)["images"]
        response = pb.ModelInferResponse()
        tensor, data = oip.output_tensor("boxes", np.full((images.shape[-1], 4), 7, np.float32))
        response.outputs.append(tensor)
        response.raw_output_contents.append(data)
        stage.requests.append(request)
        return response

    stage.ModelInfer = unbatched  # type: ignore[method-assign]
    model = dataclasses.replace(MODEL, max_batch_size=0)
    results = asyncio.run(_port(stage).infer(model, [_image(3, 1), _image(3, 2)], 0.0, Deadline(5)))
    assert [tuple(r.inputs[0].shape) for r in stage.requests] == [(3, 2, 3), (3, 2, 3)]
    assert [r["boxes"].shape for r in results] == [(3, 4), (3, 4)]
