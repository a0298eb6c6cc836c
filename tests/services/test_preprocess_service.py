"""Preprocess stage through a real server: letterbox tensors, transforms and per-image errors."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from inferline.common import tensors
from inferline.common.generated import preprocess_pb2, preprocess_pb2_grpc, types_pb2
from inferline.common.recipes import Recipe
from tests.support.images import encoded
from tests.support.servers import LoopThread, start_stage

LETTERBOX = Recipe("letterbox", {"size": 640, "stride": 32, "auto": True}).to_proto()


@pytest.fixture(scope="module")
def stub(settings):
    loop = LoopThread()
    server = start_stage(loop, "preprocess", dataclasses.replace(settings, max_image_pixels=1_000_000))
    with grpc.insecure_channel(server.address) as channel:
        yield preprocess_pb2_grpc.PreprocessServiceStub(channel)
    server.stop()
    loop.close()


def _request(*images: bytes, recipe=LETTERBOX) -> preprocess_pb2.PreprocessRequest:
    return preprocess_pb2.PreprocessRequest(recipe=recipe, images=[types_pb2.Image(data=d) for d in images])


def test_letterbox_returns_uint8_rgb_chw_tensors_with_transforms(stub, data_dir):
    response = stub.Preprocess(_request((data_dir / "shapes_01.jpg").read_bytes(), encoded(100, 300)), timeout=30)
    first, second = response.images
    assert first.status.code == 0 and second.status.code == 0
    assert tensors.from_proto(first.tensor).shape == (3, 480, 640)
    assert tensors.from_proto(first.tensor).dtype == np.uint8
    assert (first.transform.orig_width, first.transform.orig_height) == (640, 480)
    assert first.transform.scale_x == pytest.approx(1.0)
    # 300x100 scales by 640/300 to 640x213, padded to the next multiple of 32: 224.
    assert tensors.from_proto(second.tensor).shape == (3, 224, 640)
    assert (second.transform.input_width, second.transform.input_height) == (640, 224)
    assert second.transform.pad_y > 0


def test_a_bad_image_fails_only_its_own_item(stub):
    response = stub.Preprocess(_request(encoded(), b"not an image", encoded(seed=1)), timeout=30)
    codes = [item.status.code for item in response.images]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "not a decodable image" in response.images[1].status.message
    assert not response.images[1].HasField("tensor")


def test_an_image_over_the_pixel_limit_is_refused_with_the_limit_named(stub):
    response = stub.Preprocess(_request(encoded(1001, 1000)), timeout=30)
    assert response.images[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "over the limit of 1000000" in response.images[0].status.message


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(encoded(), recipe=Recipe("nope").to_proto()), "unknown preprocess recipe 'nope'"),
        (_request(encoded(), recipe=types_pb2.Recipe()), "recipe has no name"),
        (_request(), "no images"),
        (_request(encoded(), recipe=Recipe("letterbox", {"size": -3}).to_proto()), None),
    ],
)
def test_bad_requests_are_invalid_argument(stub, request_, message):
    if message is None:
        response = stub.Preprocess(request_, timeout=30)
        assert response.images[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        return
    with pytest.raises(grpc.RpcError) as raised:
        stub.Preprocess(request_, timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
