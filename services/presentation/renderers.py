"""Renderers by format: detections of one image -> bytes a person or a program reads."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from inferline.common.detections import Detection
from inferline.common.errors import InvalidInput
from inferline.common.registry import Registry
from inferline.services.presentation.mask_overlay import paint_masks


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


class Renderer(Protocol):
    def __call__(self, item: RenderInput, max_pixels: int) -> Rendered: ...


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
    """Boxes and labels drawn with Pillow, in ultralytics' colours and proportions. Pillow, not
    OpenCV: the postprocess image carries no OpenCV (size budget), and the controller's image
    neither, hence the imports here rather than at the top (the CLI imports this module for
    JSON and CSV)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 - see above

    from inferline.common.images import decode_image  # noqa: PLC0415 - see above

    if not item.image:
        raise InvalidInput(f"{item.name or 'image'}: the png renderer needs the original image bytes")
    image = decode_image(item.image, max_pixels=max_pixels)[:, :, ::-1]
    canvas = Image.fromarray(paint_masks(image, [(d.mask, _color(d)) for d in item.detections if d.mask is not None]))
    draw = ImageDraw.Draw(canvas)
    line = max(round(sum(canvas.size) / 2 * 0.003), 2)
    font = _font(max(round(line * 5.5), 10))
    for d in item.detections:
        color = _color(d)
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        draw.rectangle((x1, y1, max(x2, x1), max(y2, y1)), outline=color, width=line)
        text = f"{d.label} {d.score:.2f}" + (f" ({d.zero_shot[0]} {d.zero_shot[1]:.2f})" if d.zero_shot else "")
        left, top_, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top_
        top = y1 - th - 3 if y1 - th - 3 >= 0 else y1  # label above the box when it fits
        draw.rectangle((x1, top, x1 + tw + 2, top + th + 3), fill=color)
        draw.text((x1 + 1, top + 1 - top_), text, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=1)  # fast; OpenCV's default level too
    return Rendered(out.getvalue(), "image/png")


def _color(detection: Detection) -> str:
    return "#" + _PALETTE[detection.class_id % len(_PALETTE)]


@lru_cache(maxsize=16)
def _font(size: int) -> Any:
    """Pillow's bundled scalable font (no font files in the image to depend on)."""
    from PIL import ImageFont  # noqa: PLC0415 - Pillow only where a PNG is drawn

    return ImageFont.load_default(size=size)
