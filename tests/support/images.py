"""Small images made on the fly, so unhappy-path tests need no files."""

from __future__ import annotations

import cv2
import numpy as np


def encoded(height: int = 48, width: int = 64, fmt: str = ".png", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, data = cv2.imencode(fmt, pixels)
    assert ok
    return data.tobytes()


def shapes_scene(height: int, width: int, seed: int) -> np.ndarray:
    """A noisy background with filled shapes, like the scenes the stand-in detectors learned."""
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(8, min(height, width) // 12), max(9, min(height, width) // 4)))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.circle(canvas, (cx, cy), r, color, -1)
        elif kind == 1:
            cv2.rectangle(canvas, (cx - r, cy - r), (cx + r, cy + r), color, -1)
        else:
            points = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(canvas, [points], color)
    return canvas
