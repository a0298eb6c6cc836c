"""Bilinear resize of uint8 HxWxC pixels, bit-identical to ``cv2.resize(..., INTER_LINEAR)``.

ultralytics letterboxes with OpenCV, so the model input must be OpenCV's pixels, not merely close
to them. OpenCV is the fast path whenever it is installed (the development install, the CLI,
the inference images). The preprocess container image leaves it out: the ``opencv-python-headless``
wheel unpacks to 153 MB (its own FFmpeg and OpenBLAS included), which alone breaks the image's
250 MB budget. Without it, this module computes the same bytes with numpy.

OpenCV 5's ``INTER_LINEAR`` on 8-bit pixels, which the numpy path reproduces:

- per output column, ``fx = float32((dx + 0.5) * (src/dst) - 0.5)``, ``sx = floor(fx)``, clamped to
  the image (weight 0 beyond the edge); the two weights are ``round((1 - fx) * 2048)`` and
  ``round(fx * 2048)`` (11-bit fixed point);
- per output row the same, except that rows are *not* clamped before the weights are taken: the
  row index is clamped when read, so a border row mixes the edge row with itself using
  fractional weights (that rounds differently from a weight of 2048, and OpenCV does it so);
- the horizontal pass sums in int32; the vertical pass is OpenCV's SIMD one, used for every
  element: ``((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16)``, then ``(x + 2) >> 2``, saturated.

An exact 2x reduction, which OpenCV hands to its INTER_AREA code, gives the same result by this
arithmetic (weights 1024/1024). ``tests/unit/test_resize.py`` checks the equality on random sizes
up and down, 1-pixel edges and the sizes letterboxing produces.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

try:  # the fast path; see the module docstring for why it may be absent
    import cv2
except ImportError:  # pragma: no cover - exercised in the preprocess image (tests/deploy)
    cv2 = None  # type: ignore[assignment]  # every use checks for None first

_COEF_BITS = 11
# The two source indices and their two weights for each output column or row.
Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_COEF_SCALE = np.float32(1 << _COEF_BITS)


def resize_linear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``pixels`` (HxWxC uint8, contiguous) resized to ``height`` x ``width``, as OpenCV does."""
    if cv2 is not None:
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    return resize_linear_numpy(pixels, width, height)


def resize_linear_numpy(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The numpy reproduction of ``cv2.resize(pixels, (width, height), INTER_LINEAR)``."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected HxWxC uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    src_h, src_w, channels = pixels.shape
    cols0, cols1, wx0, wx1 = _columns(width, src_w, channels)
    rows0, rows1, wy0, wy1 = _rows(height, src_h)

    # Horizontal pass on the source rows the output needs, in int32 as OpenCV's buffer.
    needed, where = np.unique(np.concatenate([rows0, rows1]), return_inverse=True)
    source = pixels.reshape(src_h, src_w * channels)[needed]
    horizontal = np.take(source, cols0, axis=1).astype(np.int32)
    horizontal *= wx0
    right = np.take(source, cols1, axis=1).astype(np.int32)
    right *= wx1
    horizontal += right
    horizontal >>= 4  # the SIMD vertical pass packs (value >> 4) into int16 before multiplying

    # Vertical pass: multiply-high of each row by its 16-bit weight, then round off two bits.
    out = horizontal[where[:height]]
    out *= wy0
    out >>= 16
    below = horizontal[where[height:]]
    below *= wy1
    below >>= 16
    out += below
    out += 2
    out >>= 2
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8).reshape(height, width, channels)


def _weights(dst: int, src: int, *, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First/second source index and their fixed-point weights for each output position."""
    scale = 1.0 / (dst / src)  # as OpenCV: inv_scale = dst/src in double, scale = 1/inv_scale
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(f).astype(np.int64)
    f = f - first.astype(np.float32)
    if clamp:
        below, beyond = first < 0, first >= src - 1
        f[below | beyond] = 0
        first[below] = 0
        first[beyond] = src - 1
    w0 = np.rint((np.float32(1) - f) * _COEF_SCALE).astype(np.int32)
    w1 = np.rint(f * _COEF_SCALE).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


@lru_cache(maxsize=256)
def _columns(dst: int, src: int, channels: int) -> Taps:
    """Column indices into the flattened (W*C) row and the per-element weights; cached because
    a stream of camera frames asks for the same sizes over and over."""
    first, second, w0, w1 = _weights(dst, src, clamp=True)
    offsets = np.arange(channels)
    cols0 = (first[:, None] * channels + offsets).ravel()
    cols1 = (second[:, None] * channels + offsets).ravel()
    return _frozen((cols0, cols1, np.repeat(w0, channels), np.repeat(w1, channels)))


@lru_cache(maxsize=256)
def _rows(dst: int, src: int) -> Taps:
    first, second, w0, w1 = _weights(dst, src, clamp=False)
    return _frozen((first, second, w0[:, None], w1[:, None]))


def _frozen(arrays: Taps) -> Taps:
    """Cached arrays are shared between calls (and threads): make them read-only."""
    for array in arrays:
        array.setflags(write=False)
    return arrays
