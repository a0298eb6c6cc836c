"""The geometry that links a preprocessed tensor back to the image the user sent."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageTransform:
    """Where one image went on its way into the model input.

    Postprocessing needs it to put boxes back on the original pixels, and it travels between
    services, so it holds plain numbers only: ``x_orig = (x_input - pad_x) / scale_x``.
    """

    orig_width: int
    orig_height: int
    input_width: int
    input_height: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float


@dataclass(frozen=True)
class Region:
    """A box of one of a request's images, cut out and preprocessed on its own."""

    image: int  # index into the request's images
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
