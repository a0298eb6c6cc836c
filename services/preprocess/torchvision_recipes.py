"""Image recipes for torchvision's detection models.

torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD) carry their own
``GeneralizedRCNNTransform``: they take float RGB images in [0, 1] at any size and resize,
normalise and pad them inside the forward pass. Doing any of that here would be a second,
slightly different copy of it, so the recipe hands the model the decoded pixels as they are:
uint8 RGB, channels first, at the original size, with an identity transform. The ``/ 255``
to float happens on the model's device (the loader), so a quarter of the bytes travel.

That is exactly what a torchvision user feeds the model
(``decode_image(read_file(path))`` then ``convert_image_dtype(..., torch.float)``), and the boxes
the model returns are already in original-image pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from inferline.common.transform import ImageTransform
from inferline.services.preprocess.recipes import PREPROCESSORS


@PREPROCESSORS.register("rgb")
def rgb_recipe(image: np.ndarray, params: Mapping[str, Any]) -> tuple[np.ndarray, ImageTransform]:
    """HxWx3 BGR (decoded, EXIF applied) -> 3xHxW uint8 RGB, same size; takes no params."""
    height, width = image.shape[:2]
    chw = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
    return chw, ImageTransform(
        orig_width=width,
        orig_height=height,
        input_width=width,
        input_height=height,
        scale_x=1.0,
        scale_y=1.0,
        pad_x=0.0,
        pad_y=0.0,
    )
