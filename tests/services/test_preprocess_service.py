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
from tests.support.servers import stage_channel

LETTERBOX = Recipe("letterbox", {"size": 640, "stride": 32, "auto": True}).to_proto()


@pytest.fixture(scope="module")
def stub(settings):
    with stage_channel("preprocess", dataclasses.replace(settings, max_image_pixels=1_000_000)) as channel:
        yield preprocess_pb2_grpc.PreprocessServiceStub(channel)


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
        (_request(), "no images or texts"),
        # A recipe applies to the whole request: its parameters are checked once, before decoding.
        (_request(encoded(), recipe=Recipe("letterbox", {"size": -3}).to_proto()),
         "letterbox size must be a positive integer"),
    ],
)
def test_bad_requests_are_invalid_argument(stub, request_, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Preprocess(request_, timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


def _region(image: int, x1: float, y1: float, x2: float, y2: float) -> types_pb2.Region:
    return types_pb2.Region(image=image, box=types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2))


def test_regions_give_one_item_per_box_cut_from_its_image(stub):
    request = _request(encoded(100, 200), encoded(60, 80, seed=3),
                       recipe=Recipe("letterbox", {"size": 64, "auto": True}).to_proto())
    request.regions.extend([_region(0, 10, 10, 74, 42), _region(1, 0, 0, 80, 60), _region(0, 150.5, 0, 400, 100)])
    items = stub.Preprocess(request, timeout=30).images
    assert [item.status.code for item in items] == [0, 0, 0]
    assert [(i.transform.orig_width, i.transform.orig_height) for i in items] == [(64, 32), (80, 60), (50, 100)]


def test_bad_regions_fail_alone(stub):
    request = _request(encoded(100, 200), b"broken")
    request.regions.extend([_region(0, 0, 0, 50, 50), _region(5, 0, 0, 10, 10), _region(0, 300, 300, 400, 400),
                            _region(1, 0, 0, 10, 10)])
    items = stub.Preprocess(request, timeout=30).images
    assert [item.status.code for item in items] == [0, 3, 3, 3]
    assert "refers to image 5" in items[1].status.message
    assert "no pixels inside the image" in items[2].status.message
    assert "not a decodable image" in items[3].status.message


def test_texts_need_a_text_recipe_and_come_alone(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Preprocess(preprocess_pb2.PreprocessRequest(recipe=LETTERBOX, texts=["a dog"]), timeout=10)
    assert (
        raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        and "unknown text preprocess recipe" in raised.value.details()
    )
    mixed = _request(encoded())
    mixed.texts.append("a dog")
    with pytest.raises(grpc.RpcError) as raised:
        stub.Preprocess(mixed, timeout=10)
    assert "images or texts, not both" in raised.value.details()
