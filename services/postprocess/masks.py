"""YOLOv8-seg instance masks without torch, as ultralytics' predict makes them.

ultralytics 8.4's ``SegmentationPredictor`` (default ``retina_masks=False``) runs
``ops.process_mask(protos, coefficients, boxes, input_shape, upsample=True)``: each instance's
logits ``coefficients @ protos`` are resized bilinearly to the model input, thresholded at 0 and
cropped to the instance's box; an instance whose mask comes out empty is dropped. Its results hold
masks at the (letterboxed) input size; its annotator takes them to the original image with
``ops.scale_masks(masks, original_shape) > 0.5`` (crop the letterbox padding, resize bilinearly).
That is what a user means by "the mask", so it is what this module returns.

Resizing is torch's ``F.interpolate(mode="bilinear", align_corners=False)``: each output pixel
blends two source rows and two source columns with float32 weights, columns first. A mask is
zero outside its box, so only the box's rows and columns are ever computed (a ``Block``): the
cost follows the instance's size, not the image's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Taps(NamedTuple):
    """Per output index along one axis: the two source indices and their weights."""

    first: np.ndarray
    second: np.ndarray
    first_weight: np.ndarray
    second_weight: np.ndarray

    def take(self, index: slice) -> Taps:
        return Taps(*(part[index] for part in self))

    def shifted(self, offset: int) -> Taps:
        return Taps(self.first - offset, self.second - offset, self.first_weight, self.second_weight)


def taps(out_size: int, in_size: int) -> Taps:
    """torch's CPU upsample_bilinear2d source indices and weights (align_corners=False, output
    size given): ``src = (in / out) * (dst + 0.5) - 0.5``, clamped at 0. The scale is a float32
    quotient; torch's kernel computes src with one fused multiply-add (a single rounding to
    float32), which the exact float64 product reproduces."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    src = (np.float64(scale) * centres - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    first = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    weight = np.clip(src - first.astype(np.float32), np.float32(0), np.float32(1))
    second = first + (first < in_size - 1)
    return Taps(first, second, np.float32(1) - weight, weight)


def interpolate(array: np.ndarray, rows: Taps, cols: Taps) -> np.ndarray:
    """Bilinear resampling of the last two axes at the given taps, in float32: columns first,
    then rows, each blend ``fma(first, first_weight, second * second_weight)``, the order of
    torch's CPU kernel at the sizes masks take (bit for bit there; at a few other sizes torch
    sums in another order, and values differ in the last bit)."""
    wide = _blend(array[..., cols.first], cols.first_weight, array[..., cols.second], cols.second_weight)
    return _blend(
        wide[..., rows.first, :], rows.first_weight[:, None], wide[..., rows.second, :], rows.second_weight[:, None]
    )


def _blend(first: np.ndarray, first_weight: np.ndarray, second: np.ndarray, second_weight: np.ndarray) -> np.ndarray:
    """A float32 fused multiply-add: the float64 product of two float32 values is exact."""
    rest = (second * second_weight).astype(np.float64)
    return (first.astype(np.float64) * first_weight.astype(np.float64) + rest).astype(np.float32)


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(array, size, mode="bilinear")`` over the last two axes, in float32."""
    array = np.asarray(array, dtype=np.float32)
    return interpolate(array, taps(size[0], array.shape[-2]), taps(size[1], array.shape[-1]))


@dataclass(frozen=True)
class Block:
    """A binary mask of an image of ``size`` that is zero outside ``pixels``, placed at (top, left)."""

    pixels: np.ndarray  # bool (rows, cols)
    top: int
    left: int
    size: tuple[int, int]  # the image's (height, width)


def instance_masks(
    protos: np.ndarray, coefficients: np.ndarray, boxes: np.ndarray, input_size: tuple[int, int]
) -> list[Block | None]:
    """ultralytics' ``process_mask(..., upsample=True)``, one Block per instance at the model
    input's size; None where the mask is empty (ultralytics drops those instances).

    ``protos``: (masks, mh, mw); ``coefficients``: (K, masks); ``boxes``: (K, 4) xyxy in input
    pixels, as the NMS left them (not clipped).
    """
    protos = np.asarray(protos, dtype=np.float32)
    count, mh, mw = protos.shape
    coefficients = np.asarray(coefficients, dtype=np.float32).reshape(-1, count)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    height, width = input_size
    logits = (coefficients @ protos.reshape(count, -1)).reshape(-1, mh, mw)
    row_taps, col_taps = taps(height, mh), taps(width, mw)
    # crop_mask keeps column c where x1 <= c < x2 (and rows alike), compared in float32.
    cols, rows = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    blocks: list[Block | None] = []
    for logit, (x1, y1, x2, y2) in zip(logits, boxes, strict=False):
        left, right = _span((cols >= x1) & (cols < x2))
        top, bottom = _span((rows >= y1) & (rows < y2))
        if left == right or top == bottom:
            blocks.append(None)
            continue
        pixels = interpolate(logit, row_taps.take(slice(top, bottom)), col_taps.take(slice(left, right))) > 0
        blocks.append(Block(pixels, top, left, (height, width)) if pixels.any() else None)
    return blocks


def to_original(block: Block, original_size: tuple[int, int]) -> Block:
    """``scale_masks(mask, original_size) > 0.5``: the letterbox's padding cropped off (its
    extent recomputed from the shapes, as ultralytics does), then a bilinear resize."""
    height, width = block.size
    orig_h, orig_w = original_size
    if (height, width) == (orig_h, orig_w):
        return block
    gain = min(height / orig_h, width / orig_w)
    content_h, content_w = max(round(orig_h * gain), 1), max(round(orig_w * gain), 1)
    pad_top, pad_left = round((height - content_h) / 2 - 0.1), round((width - content_w) / 2 - 0.1)
    content_h = min(content_h, height - pad_top)  # a Python slice past the end stops at the end
    content_w = min(content_w, width - pad_left)
    rows = _resampled(block.top - pad_top, block.pixels.shape[0], content_h, orig_h)
    cols = _resampled(block.left - pad_left, block.pixels.shape[1], content_w, orig_w)
    if rows is None or cols is None:
        return Block(np.zeros((0, 0), bool), 0, 0, (orig_h, orig_w))
    (out_rows, row_taps, row_lo, row_hi), (out_cols, col_taps, col_lo, col_hi) = rows, cols
    # The block's pixels within the taps' reach (zeros around it), as float32 values 0 and 1.
    window = np.zeros((row_hi - row_lo, col_hi - col_lo), np.float32)
    top, left = block.top - pad_top, block.left - pad_left
    src_rows = slice(max(row_lo, top), min(row_hi, top + block.pixels.shape[0]))
    src_cols = slice(max(col_lo, left), min(col_hi, left + block.pixels.shape[1]))
    window[src_rows.start - row_lo : src_rows.stop - row_lo, src_cols.start - col_lo : src_cols.stop - col_lo] = (
        block.pixels[src_rows.start - top : src_rows.stop - top, src_cols.start - left : src_cols.stop - left]
    )
    pixels = interpolate(window, row_taps.shifted(row_lo), col_taps.shifted(col_lo)) > 0.5
    return Block(pixels, out_rows.start, out_cols.start, (orig_h, orig_w))


def _resampled(start: int, length: int, in_size: int, out_size: int) -> tuple[slice, Taps, int, int] | None:
    """Along one axis: the output indices a block at [start, start + length) of an ``in_size``
    axis can reach when resized to ``out_size``, their taps, and the source range they read."""
    lo, hi = max(start, 0), min(start + length, in_size)
    if lo >= hi:
        return None
    all_taps = taps(out_size, in_size)
    # Taps only move forward, and the second is the first or the next: the outputs that read
    # any of [lo, hi) are one run.
    reach = np.flatnonzero((all_taps.second >= lo) & (all_taps.first < hi))
    if not reach.size:
        return None
    out = slice(int(reach[0]), int(reach[-1]) + 1)
    chosen = all_taps.take(out)
    return out, chosen, int(chosen.first.min()), int(chosen.second.max()) + 1


def _span(inside: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) of the True run of a mask that is one run or empty."""
    index = np.flatnonzero(inside)
    return (int(index[0]), int(index[-1]) + 1) if index.size else (0, 0)
