"""Instance masks as a domain value: COCO's uncompressed run-length encoding.

A mask covers the whole original image, but an instance is a small part of it, so it travels
as run lengths rather than as pixels: over the pixels in column-major order (down the first
column, then the next, as COCO and pycocotools count them), alternating runs of 0 and 1,
starting with a run of zeros that is 0 long when the first pixel is set. A box-sized block
encodes without ever building the image-sized array (``Mask.encode(..., offset=, size=)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from inferline.common.errors import InvalidInput
from inferline.common.generated import types_pb2


@dataclass(frozen=True)
class Mask:
    height: int
    width: int
    counts: tuple[int, ...]  # run lengths, column-major, zeros first; they sum to height * width

    def __post_init__(self) -> None:
        if self.height < 0 or self.width < 0:
            raise InvalidInput(f"mask size must not be negative, got {self.height}x{self.width}")
        counts = np.asarray(self.counts, dtype=np.int64)
        if (counts < 0).any():
            raise InvalidInput("mask run lengths must not be negative")
        if int(counts.sum()) != self.height * self.width:
            raise InvalidInput(
                f"mask run lengths sum to {int(counts.sum())}, but a {self.height}x{self.width} mask has "
                f"{self.height * self.width} pixels"
            )

    @classmethod
    def encode(
        cls, block: np.ndarray, offset: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None
    ) -> Mask:
        """The RLE of ``block`` (2-D, nonzero = set), placed at ``offset`` (top, left) in an
        otherwise empty image of ``size`` (height, width; default: the block's own)."""
        block = np.asarray(block) != 0
        if block.ndim != 2:
            raise ValueError(f"a mask is 2-D, got shape {block.shape}")
        height, width = size if size is not None else block.shape
        top, left = offset
        rows, cols = block.shape
        if top < 0 or left < 0 or top + rows > height or left + cols > width:
            raise ValueError(f"a {rows}x{cols} block at {offset} does not fit a {height}x{width} mask")
        # The block's columns at full height: each column's run may start above the block.
        columns = np.zeros((cols, height), dtype=bool)
        columns[:, top : top + rows] = block.T
        flat = columns.ravel()
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist() if flat.size else []
        if flat.size and flat[0]:
            runs.insert(0, 0)
        before, after = left * height, (width - left - cols) * height
        if not runs:
            runs = [0]
        runs[0] += before  # the columns left of the block are zeros, as is the first run
        if len(runs) % 2:  # the last run is zeros: the columns right of the block extend it
            runs[-1] += after
        elif after:
            runs.append(after)
        if runs == [0]:
            runs = []
        return cls(height, width, tuple(runs))

    def decode(self) -> np.ndarray:
        """The mask as a (height, width) boolean array."""
        values = np.zeros(len(self.counts), dtype=bool)
        values[1::2] = True
        flat = np.repeat(values, self.counts)
        return flat.reshape(self.width, self.height).T

    @property
    def area(self) -> int:
        return int(sum(self.counts[1::2]))

    def to_proto(self) -> types_pb2.Mask:
        return types_pb2.Mask(width=self.width, height=self.height, rle_counts=self.counts)

    @classmethod
    def from_proto(cls, message: types_pb2.Mask) -> Mask:
        return cls(message.height, message.width, tuple(message.rle_counts))

    def to_dict(self) -> dict[str, Any]:
        """pycocotools' uncompressed RLE: ``{"size": [h, w], "counts": [...]}``."""
        return {"size": [self.height, self.width], "counts": list(self.counts)}
