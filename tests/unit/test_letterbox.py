"""The torch-free letterbox must hand the model exactly the pixels ultralytics would."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox

from inferline.services.preprocess.letterbox import letterbox

SIZES = [(1, 1), (1, 3000), (3000, 1), (2, 3), (7, 640), (17, 31), (479, 641), (480, 640), (640, 480),
         (720, 1280), (1080, 810), (333, 999), (2001, 1503), (3000, 4000)]  # fmt: skip


def _assert_same_as_ultralytics(
    image: np.ndarray,
    size: tuple[int, int],
    *,
    stride: int = 32,
    auto: bool = False,
    scaleup: bool = True,
    center: bool = True,
) -> None:
    options = {"stride": stride, "auto": auto, "scaleup": scaleup, "center": center}
    reference = LetterBox(new_shape=size, **options)
    params = reference.get_params({"img": image})
    # The predictor's own HWC->CHW permute and BGR->RGB flip.
    expected = torch.from_numpy(reference(image=image)).permute(2, 0, 1).flip(0).numpy()

    ours, transform = letterbox(image, size, **options)
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, expected, err_msg=f"{image.shape} -> {size} {options}")
    assert (transform.input_height, transform.input_width) == ours.shape[1:]
    assert (transform.orig_height, transform.orig_width) == image.shape[:2]
    assert (transform.scale_x, transform.scale_y) == params["ratio"]
    assert (transform.pad_x, transform.pad_y) == (params["left"], params["top"])


@pytest.fixture(scope="module")
def yolo(yolo_weights: Path) -> YOLO:
    return YOLO(str(yolo_weights))


def test_letterbox_matches_ultralytics_on_random_sizes():
    rng = np.random.default_rng(20240611)
    shapes = SIZES + [tuple(int(v) for v in rng.integers(1, 1500, 2)) for _ in range(40)]
    targets = [(640, 640), (480, 640), (320, 320), (640, 352), (100, 200)]
    for i, (height, width) in enumerate(shapes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        size = targets[i % len(targets)]
        _assert_same_as_ultralytics(image, size, auto=True, stride=32)
        _assert_same_as_ultralytics(image, size, auto=False, scaleup=bool(i % 2), center=bool(i % 3))


@pytest.mark.parametrize("stride", [1, 16, 32, 64])
def test_letterbox_matches_ultralytics_for_other_strides(stride):
    rng = np.random.default_rng(stride)
    for height, width in [(5, 9), (300, 301), (481, 777)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        _assert_same_as_ultralytics(image, (640, 640), auto=True, stride=stride, scaleup=False)
        _assert_same_as_ultralytics(image, (640, 640), auto=True, stride=stride, center=False)


def test_letterbox_matches_ultralytics_on_sample_images(sample_images):
    for path in sample_images:
        image = cv2.imread(str(path))
        for size in [(640, 640), (320, 480)]:
            _assert_same_as_ultralytics(image, size, auto=True, stride=32)
            _assert_same_as_ultralytics(image, size, auto=False)


def test_letterbox_equals_the_tensor_yolo_predict_feeds_the_model(yolo, sample_images):
    # Through the real predictor, so the auto rule (rect=True in Model.predict) is checked too.
    yolo.predict(np.zeros((64, 64, 3), np.uint8), verbose=False)  # sets up yolo.predictor
    for path in sample_images:
        image = cv2.imread(str(path))
        expected = yolo.predictor.preprocess([image])
        ours, _ = letterbox(image)
        assert torch.equal(torch.from_numpy(ours)[None].float().div_(255), expected), path.name


def test_letterbox_pads_to_stride_multiple():
    image = np.zeros((500, 375, 3), np.uint8)
    tensor, transform = letterbox(image, (640, 640), stride=32, auto=True)
    assert tensor.shape == (3, 640, 480)  # 375 * 1.28 = 480, already a multiple of 32
    assert (transform.pad_x, transform.pad_y) == (0.0, 0.0)
    tensor, transform = letterbox(np.zeros((500, 380, 3), np.uint8), (640, 640), stride=32, auto=True)
    assert tensor.shape == (3, 640, 512) and transform.pad_x == 13.0  # 486 wide, 26 px split 13/13
    tensor, transform = letterbox(np.zeros((500, 381, 3), np.uint8), (640, 640), stride=32, auto=True)
    assert tensor.shape == (3, 640, 512) and transform.pad_x == 12.0  # 488 wide, 24 px split 12/12
    tensor, transform = letterbox(np.zeros((500, 379, 3), np.uint8), (640, 640), stride=32, auto=True)
    assert tensor.shape == (3, 640, 512) and transform.pad_x == 13.0  # 485 wide, 27 px split 13/14
    tensor, _ = letterbox(image, (640, 640), auto=False)
    assert tensor.shape == (3, 640, 640)


def test_letterbox_outputs_rgb_with_grey_padding():
    blue = np.zeros((20, 40, 3), np.uint8)
    blue[..., 0] = 255  # BGR
    tensor, transform = letterbox(blue, (64, 64), auto=False, pad_value=114)
    assert transform.pad_y == 16.0 and transform.scale_x == 1.6
    assert (tensor[:, 32, 32] == [0, 0, 255]).all()
    assert (tensor[:, 0, 0] == 114).all() and (tensor[:, 63, 63] == 114).all()


def test_letterbox_transform_maps_input_pixels_back_to_the_original():
    image = np.zeros((1080, 810, 3), np.uint8)
    image[:, 405:] = 255  # right half white
    tensor, transform = letterbox(image, (640, 640), auto=False)
    first_white_column = int(np.argmax(tensor[0, 320] > 128))
    assert (first_white_column - transform.pad_x) / transform.scale_x == pytest.approx(405, abs=1 / transform.scale_x)


def test_letterbox_accepts_non_contiguous_views():
    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    flipped = image[::-1, ::-1]
    ours, _ = letterbox(flipped, (64, 64))
    np.testing.assert_array_equal(ours, letterbox(np.ascontiguousarray(flipped), (64, 64))[0])


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 1), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((10, 0, 3), np.uint8),
        np.zeros((2, 10, 10, 3), np.uint8),
        np.zeros((10, 10, 3), np.float32),
    ],
    ids=["2d", "4-channel", "1-channel", "no-rows", "no-columns", "batch", "float"],
)
def test_letterbox_rejects_invalid_images(image):
    with pytest.raises(ValueError):
        letterbox(image)


@pytest.mark.parametrize("size, stride", [((0, 640), 32), ((640, -1), 32), ((640, 640), 0)])
def test_letterbox_rejects_invalid_sizes(size, stride):
    with pytest.raises(ValueError):
        letterbox(np.zeros((10, 10, 3), np.uint8), size, stride=stride)
