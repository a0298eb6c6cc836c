"""Instance masks as a domain value: COCO's uncompressed RLE, and how they are painted."""

import json

import numpy as np
import pytest

from inferline.common.detections import Detection
from inferline.common.errors import InvalidInput
from inferline.common.generated import types_pb2
from inferline.common.masks import Mask
from inferline.services.presentation.mask_overlay import paint_masks


def _coco_counts(pixels: np.ndarray) -> list[int]:
    """COCO's definition, spelled out: run lengths over the column-major pixels, zeros first."""
    counts, current, run = [], 0, 0
    for value in pixels.ravel(order="F").astype(int):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def test_counts_run_down_columns_and_start_with_zeros():
    assert Mask.encode(np.array([[0, 1], [1, 1]])).counts == (1, 3)
    assert Mask.encode(np.array([[1, 0], [0, 0]])).counts == (0, 1, 3)  # a set first pixel: an empty zero run
    assert Mask.encode(np.array([[0, 0], [1, 0]])).counts == (1, 1, 2)
    assert Mask.encode(np.zeros((3, 2))).counts == (6,)
    assert Mask.encode(np.ones((3, 2))).counts == (0, 6)


@pytest.mark.parametrize("seed", range(6))
def test_encode_decode_round_trip_matches_cocos_definition(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 40, 2)
    pixels = rng.random((height, width)) < rng.uniform(0.05, 0.95)
    mask = Mask.encode(pixels)
    assert list(mask.counts) == _coco_counts(pixels)
    assert (mask.height, mask.width, mask.area) == (height, width, int(pixels.sum()))
    np.testing.assert_array_equal(mask.decode(), pixels)


@pytest.mark.parametrize("seed", range(8))
def test_a_block_encodes_as_its_place_in_the_whole_image(seed):
    rng = np.random.default_rng(100 + seed)
    height, width = rng.integers(1, 30, 2)
    top, left = rng.integers(0, height), rng.integers(0, width)
    rows, cols = rng.integers(0, height - top + 1), rng.integers(0, width - left + 1)
    block = rng.random((rows, cols)) < 0.5
    if seed == 0 and block.size:
        block[:] = True  # a solid block touching nothing but itself
    whole = np.zeros((height, width), bool)
    whole[top : top + rows, left : left + cols] = block
    assert Mask.encode(block, offset=(top, left), size=(height, width)) == Mask.encode(whole)


def test_an_empty_image_has_no_runs():
    assert Mask.encode(np.zeros((0, 5))).counts == ()
    assert Mask.encode(np.zeros((0, 0)), size=(0, 0)).decode().shape == (0, 0)


def test_a_block_outside_its_image_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        Mask.encode(np.ones((3, 3)), offset=(2, 0), size=(4, 4))


def test_proto_and_json_carry_the_mask_only_when_there_is_one():
    mask = Mask.encode(np.array([[0, 1, 1], [0, 1, 0]]))
    with_mask = Detection("kite", 33, 0.5, (1.0, 0.0, 3.0, 2.0), mask=mask)
    message = with_mask.to_proto()
    assert (message.mask.width, message.mask.height, list(message.mask.rle_counts)) == (3, 2, [2, 3, 1])
    assert Detection.from_proto(types_pb2.Detection.FromString(message.SerializeToString())) == with_mask
    assert json.loads(json.dumps(with_mask.to_dict()))["mask"] == {"size": [2, 3], "counts": [2, 3, 1]}

    plain = Detection("kite", 33, 0.9, (1.0, 0.0, 3.0, 2.0))
    assert not plain.to_proto().HasField("mask") and "mask" not in plain.to_dict()
    assert Detection.from_proto(plain.to_proto()).mask is None


@pytest.mark.parametrize(
    ("width", "height", "counts", "message"),
    [
        (3, 2, [2, 1, 1], "sum to 4, but a 2x3 mask has 6 pixels"),
        (3, 2, [7, -1], "must not be negative"),
        (-3, 2, [], "must not be negative"),
    ],
)
def test_a_malformed_mask_from_the_wire_is_invalid_input(width, height, counts, message):
    detection = types_pb2.Detection(label="kite", box=types_pb2.Box(x2=1, y2=1))
    detection.mask.CopyFrom(types_pb2.Mask(width=width, height=height, rle_counts=counts))
    with pytest.raises(InvalidInput, match=message):
        Detection.from_proto(detection)


def test_painting_tints_mask_pixels_and_leaves_the_rest():
    image = np.full((4, 5, 3), 100, np.uint8)
    pixels = np.zeros((4, 5), bool)
    pixels[1:3, 1:4] = True
    painted = paint_masks(image, [(Mask.encode(pixels), "#ff0000")])
    np.testing.assert_array_equal(painted[~pixels], image[~pixels])
    # ultralytics' blend at alpha 0.5: half the image plus half the colour.
    np.testing.assert_array_equal(painted[pixels][0], [177, 50, 50])


def test_overlapping_masks_show_the_image_through_both_under_the_strongest_tint():
    image = np.full((1, 1, 3), 200, np.uint8)
    one = Mask.encode(np.ones((1, 1)))
    painted = paint_masks(image, [(one, "#ff0000"), (one, "#00ff00")])
    np.testing.assert_array_equal(painted[0, 0], [177, 177, 50])  # 200 / 4 + max(tints) 127.5


def test_painting_without_masks_returns_the_image_and_refuses_a_mask_of_another_size():
    image = np.zeros((4, 5, 3), np.uint8)
    assert paint_masks(image, []) is image
    with pytest.raises(InvalidInput, match="a 5x4 mask cannot be painted on a 4x5 image"):
        paint_masks(image, [(Mask.encode(np.ones((5, 4))), "#ff0000")])
