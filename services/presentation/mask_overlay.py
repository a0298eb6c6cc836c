"""Instance masks painted on an image, as ultralytics' annotator paints them.

Each mask tints its pixels with its colour at ``alpha``; where masks overlap, the image shows
through each of them (``image * prod(1 - alpha)``) under the strongest tint (``max(colour *
alpha)``), which is ultralytics' ``Annotator.masks`` formula. Boxes and labels go on top after.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inferline.common.errors import InvalidInput
from inferline.common.masks import Mask


def paint_masks(image: np.ndarray, masks: Sequence[tuple[Mask, str]], alpha: float = 0.5) -> np.ndarray:
    """``image`` (h, w, 3) uint8 RGB with each (mask, "#rrggbb" colour) painted on; the image
    itself when there is no mask."""
    if not masks:
        return image
    height, width = image.shape[:2]
    through = np.ones((height, width, 1), np.float32)
    tint = np.zeros((height, width, 3), np.float32)
    for mask, colour in masks:
        if (mask.height, mask.width) != (height, width):
            raise InvalidInput(f"a {mask.height}x{mask.width} mask cannot be painted on a {height}x{width} image")
        pixels = mask.decode()
        through[pixels] *= np.float32(1 - alpha)
        rgb = np.frombuffer(bytes.fromhex(colour.lstrip("#")), np.uint8).astype(np.float32) / 255 * np.float32(alpha)
        tint[pixels] = np.maximum(tint[pixels], rgb)
    painted = (image.astype(np.float32) / 255 * through + tint) * 255
    return painted.astype(np.uint8)
