"""The numpy bilinear resize gives OpenCV's INTER_LINEAR bytes, so the slim preprocess image
(no OpenCV) feeds models exactly what ultralytics does."""

import cv2
import numpy as np
import pytest

from inferline.services.preprocess import resize
from inferline.services.preprocess.letterbox import letterbox, letterbox_geometry
from inferline.services.preprocess.resize import resize_linear, resize_linear_numpy


def _opencv(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def test_random_sizes_up_and_down_equal_opencv():
    rng = np.random.default_rng(0)
    for _ in range(400):
        src_h, src_w, dst_h, dst_w = (int(v) for v in rng.integers(1, 260, 4))
        image = rng.integers(0, 256, (src_h, src_w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(
            resize_linear_numpy(image, dst_w, dst_h), _opencv(image, dst_w, dst_h),
            err_msg=f"{src_w}x{src_h} -> {dst_w}x{dst_h}",
        )


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((1080, 1920), (360, 640)),  # exactly 3x down, the most common camera frame
        ((480, 640), (240, 320)),  # exactly 2x down: OpenCV switches to its INTER_AREA code
        ((300, 300), (600, 600)),  # exactly 2x up
        ((4000, 3000), (640, 480)),  # a phone photo
        ((1, 1), (5, 7)),
        ((1, 50), (3, 20)),
        ((50, 1), (20, 3)),
        ((2, 2), (1, 1)),
        ((17, 33), (17, 66)),  # one axis unchanged
        ((101, 100), (50, 50)),
    ],
)
def test_edge_and_common_sizes_equal_opencv(src, dst):
    image = np.random.default_rng(sum(src + dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_linear_numpy(image, dst[1], dst[0]), _opencv(image, dst[1], dst[0]))


def test_flat_images_stay_flat_and_extremes_do_not_wrap():
    for value in (0, 1, 254, 255):
        image = np.full((37, 53, 3), value, np.uint8)
        assert (resize_linear_numpy(image, 91, 29) == value).all()
    checker = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)[:, :, None].repeat(3, 2)
    np.testing.assert_array_equal(resize_linear_numpy(checker, 97, 61), _opencv(checker, 97, 61))


def test_letterbox_sizes_of_the_sample_images_equal_opencv(sample_images):
    for path in sample_images:
        image = cv2.imread(str(path))
        for size in [(640, 640), (320, 480), (1280, 1280)]:
            g = letterbox_geometry(*image.shape[:2], size)
            np.testing.assert_array_equal(resize_linear_numpy(image, g.new_w, g.new_h),
                                          _opencv(image, g.new_w, g.new_h))


def test_letterbox_without_opencv_gives_the_same_tensor(monkeypatch, sample_images):
    images = [cv2.imread(str(p)) for p in sample_images]
    images.append(np.random.default_rng(1).integers(0, 256, (333, 517, 3), dtype=np.uint8))
    expected = [letterbox(image, (640, 640), auto=auto) for image in images for auto in (True, False)]
    monkeypatch.setattr(resize, "cv2", None)
    got = [letterbox(image, (640, 640), auto=auto) for image in images for auto in (True, False)]
    for (want, want_t), (have, have_t) in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)
        assert have_t == want_t


def test_resize_linear_uses_opencv_when_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(resize, "resize_linear_numpy", lambda *a: calls.append(a))
    resize_linear(np.zeros((4, 4, 3), np.uint8), 2, 2)
    assert calls == []
    monkeypatch.setattr(resize, "cv2", None)
    resize_linear(np.zeros((4, 4, 3), np.uint8), 2, 2)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("image", "size", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), (2, 2), "uint8"),
        (np.zeros((4, 4), np.uint8), (2, 2), "HxWxC"),
        (np.zeros((4, 4, 3), np.uint8), (0, 2), "positive"),
    ],
)
def test_bad_arguments_are_refused(image, size, message):
    with pytest.raises(ValueError, match=message):
        resize_linear_numpy(image, *size)


def test_cached_coefficients_cannot_be_modified():
    cols0, *_ = resize._columns(10, 20, 3)
    with pytest.raises(ValueError):
        cols0[0] = 5
