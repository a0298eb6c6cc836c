"""Renderers by format: detections of one image -> bytes a person or a program reads."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from inferline.common.detections import Detection
from inferline.common.errors import InvalidInput
from inferline.common.registry import Registry


@dataclass(frozen=True)
class RenderInput:
    name: str
    width: int
    height: int
    detections: Sequence[Detection]
    image: bytes = b""


@dataclass(frozen=True)
class Rendered:
    content: bytes
    content_type: str


Renderer = Callable[[RenderInput, int], Rendered]  # (item, max_pixels)
RENDERERS: Registry[Renderer] = Registry("renderer")
CSV_HEADER = ("image", "label", "class_id", "score", "x1", "y1", "x2", "y2")

# Ultralytics' palette, so annotated images look familiar to its users.
_PALETTE = [
    "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
    "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7",
]


def result_dict(item: RenderInput) -> dict[str, Any]:
    return {
        "image": item.name,
        "width": item.width,
        "height": item.height,
        "detections": [d.to_dict() for d in item.detections],
    }


def write_csv(items: Sequence[RenderInput], out: io.StringIO) -> None:
    """One row per detection, with a header; an image without detections adds no row."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for item in items:
        for d in item.detections:
            row = d.to_dict()
            writer.writerow([item.name, row["label"], row["class_id"], row["score"], *row["box"]])


@RENDERERS.register("json")
def render_json(item: RenderInput, max_pixels: int) -> Rendered:
    return Rendered(json.dumps(result_dict(item)).encode(), "application/json")


@RENDERERS.register("csv")
def render_csv(item: RenderInput, max_pixels: int) -> Rendered:
    out = io.StringIO()
    write_csv([item], out)
    return Rendered(out.getvalue().encode(), "text/csv")


@RENDERERS.register("png")
def render_png(item: RenderInput, max_pixels: int) -> Rendered:
    # Imported here, not at the top: the controller and the CLI import this module for JSON and
    # CSV only, and the controller's container image carries no OpenCV or Pillow.
    import cv2

    from inferline.common.images import decode_image

    if not item.image:
        raise InvalidInput(f"{item.name or 'image'}: the png renderer needs the original image bytes")
    canvas = decode_image(item.image, max_pixels=max_pixels).copy()
    line = max(round(sum(canvas.shape[:2]) / 2 * 0.003), 2)
    font_scale = line / 3
    for d in item.detections:
        hex_color = _PALETTE[d.class_id % len(_PALETTE)]
        color = tuple(int(hex_color[i : i + 2], 16) for i in (4, 2, 0))  # BGR
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, line, cv2.LINE_AA)
        text = f"{d.label} {d.score:.2f}" + (f" ({d.zero_shot[0]} {d.zero_shot[1]:.2f})" if d.zero_shot else "")
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(line - 1, 1))
        above = y1 - th - 3 >= 0
        top = y1 - th - 3 if above else y1
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + 3), color, -1, cv2.LINE_AA)
        cv2.putText(
            canvas, text, (x1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
            max(line - 1, 1), cv2.LINE_AA,
        )
    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:
        raise InvalidInput(f"{item.name or 'image'}: could not encode the annotated image")
    return Rendered(encoded.tobytes(), "image/png")
