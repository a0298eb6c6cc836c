"""YOLO letterboxing without torch, bit-identical to what ultralytics feeds its models.

The preprocess service must run without torch, yet its tensors have to equal ultralytics'
``LetterBox`` + ``BasePredictor.preprocess`` byte for byte, so that the pipeline's detections can
be compared exactly with ``YOLO.predict``. Every rounding step below mirrors ultralytics 8.4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inferline.common.transform import ImageTransform
from inferline.services.preprocess.resize import resize_linear


@dataclass(frozen=True)
class Geometry:
    """Where a letterboxed image lands: its resized size and the padding on each side."""

    new_w: int
    new_h: int
    top: int
    bottom: int
    left: int
    right: int
    scale: float

    def transform(self, width: int, height: int) -> ImageTransform:
        return ImageTransform(
            orig_width=width,
            orig_height=height,
            input_width=self.new_w + self.left + self.right,
            input_height=self.new_h + self.top + self.bottom,
            scale_x=self.scale,
            scale_y=self.scale,
            pad_x=float(self.left),
            pad_y=float(self.top),
        )


def letterbox_geometry(
    height: int, width: int, size: tuple[int, int], *, stride: int = 32, auto: bool = True, scaleup: bool = True,
    center: bool = True,
) -> Geometry:
    """ultralytics' LetterBox.get_params, shared by the CPU path and the torch (GPU) path."""
    target_h, target_w = int(size[0]), int(size[1])
    # Python floats and Python round() (half to even) exactly as LetterBox.get_params, so that the
    # resized size agrees with ultralytics even when w * r lands on .5.
    r = min(target_h / height, target_w / width)
    if not scaleup:
        r = min(r, 1.0)
    new_w, new_h = max(round(width * r), 1), max(round(height * r), 1)  # thin images keep 1 pixel
    pad_w, pad_h = target_w - new_w, target_h - new_h
    if auto:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    # LetterBox splits an odd padding as round(d/2 - 0.1) before and round(d/2 + 0.1) after, i.e.
    # the extra pixel goes right/bottom; without centering everything goes right/bottom.
    left, top = (pad_w // 2, pad_h // 2) if center else (0, 0)
    return Geometry(new_w, new_h, top, pad_h - top, left, pad_w - left, r)


def letterbox(
    image_bgr: np.ndarray,
    size: tuple[int, int] = (640, 640),
    *,
    stride: int = 32,
    auto: bool = True,
    scaleup: bool = True,
    center: bool = True,
    pad_value: int = 114,
) -> tuple[np.ndarray, ImageTransform]:
    """Resize keeping the aspect ratio, pad, and return the (3, H', W') uint8 RGB model input.

    ``auto=True`` is what ``YOLO.predict`` uses for a single image (or a batch of equal shapes) on a
    PyTorch model, because ``Model.predict`` sets ``rect=True``: the padding is only what is needed
    to reach a multiple of ``stride``, so H' or W' may be smaller than ``size``. Exported
    fixed-shape models need ``auto=False`` (pad to exactly ``size``).
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.shape[0] < 1 or image_bgr.shape[1] < 1:
        raise ValueError(f"expected a non-empty HxWx3 BGR image, got shape {image_bgr.shape}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image_bgr.dtype}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive (height, width), got {size!r}")
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")

    height, width = image_bgr.shape[:2]
    g = letterbox_geometry(height, width, size, stride=stride, auto=auto, scaleup=scaleup, center=center)
    new_w, new_h, top, bottom, left, right = g.new_w, g.new_h, g.top, g.bottom, g.left, g.right

    pixels = np.ascontiguousarray(image_bgr)  # OpenCV rejects negative strides (e.g. a flipped view)
    if (width, height) != (new_w, new_h):
        pixels = resize_linear(pixels, new_w, new_h)
    if top or bottom or left or right:  # cv2.copyMakeBorder(BORDER_CONSTANT), in numpy
        padded = np.full((new_h + top + bottom, new_w + left + right, 3), pad_value, np.uint8)
        padded[top : top + new_h, left : left + new_w] = pixels
        pixels = padded
    # The predictor permutes HWC->CHW and flips the channel axis (BGR->RGB) before dividing by 255.
    chw_rgb = np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))

    transform = g.transform(width, height)
    return chw_rgb, transform
