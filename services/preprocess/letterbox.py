"""YOLO letterboxing without torch, bit-identical to what ultralytics feeds its models.

The preprocess service must run without torch, yet its tensors have to equal ultralytics'
``LetterBox`` + ``BasePredictor.preprocess`` byte for byte, so that the pipeline's detections can
be compared exactly with ``YOLO.predict``. Every rounding step below mirrors ultralytics 8.4.
"""

from __future__ import annotations

import cv2
import numpy as np

from inferline.common.transform import ImageTransform


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
    right, bottom = pad_w - left, pad_h - top

    pixels = np.ascontiguousarray(image_bgr)  # OpenCV rejects negative strides (e.g. a flipped view)
    if (width, height) != (new_w, new_h):
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pixels = cv2.copyMakeBorder(pixels, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    # The predictor permutes HWC->CHW and flips the channel axis (BGR->RGB) before dividing by 255.
    chw_rgb = np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))

    transform = ImageTransform(
        orig_width=width,
        orig_height=height,
        input_width=chw_rgb.shape[2],
        input_height=chw_rgb.shape[1],
        scale_x=r,
        scale_y=r,
        pad_x=float(left),
        pad_y=float(top),
    )
    return chw_rgb, transform
