import csv
import io
import json

import cv2
import numpy as np
import pytest

from inferline.common.detections import Detection
from inferline.common.errors import InvalidInput
from inferline.services.presentation.renderers import CSV_HEADER, RENDERERS, RenderInput

DETECTIONS = [
    Detection("bus", 5, 0.8734567, (10.123, 20.0, 110.0, 220.0)),
    Detection("person", 0, 0.5, (0.0, 0.0, 5.0, 5.0)),
]


def _image(h: int = 240, w: int = 320) -> bytes:
    ok, data = cv2.imencode(".png", np.full((h, w, 3), 90, np.uint8))
    return data.tobytes()


def test_json_renderer_has_the_cli_shape():
    rendered = RENDERERS.get("json")(RenderInput("a.jpg", 320, 240, DETECTIONS), 10**8)
    body = json.loads(rendered.content)
    assert rendered.content_type == "application/json"
    assert body == {
        "image": "a.jpg",
        "width": 320,
        "height": 240,
        "detections": [
            {"label": "bus", "class_id": 5, "score": 0.87346, "box": [10.12, 20.0, 110.0, 220.0]},
            {"label": "person", "class_id": 0, "score": 0.5, "box": [0.0, 0.0, 5.0, 5.0]},
        ],
    }


def test_csv_renderer_writes_a_header_and_one_row_per_detection():
    rendered = RENDERERS.get("csv")(RenderInput("a.jpg", 320, 240, DETECTIONS), 10**8)
    rows = list(csv.reader(io.StringIO(rendered.content.decode())))
    assert tuple(rows[0]) == CSV_HEADER
    assert rows[1] == ["a.jpg", "bus", "5", "0.87346", "10.12", "20.0", "110.0", "220.0"]
    assert len(rows) == 3


def test_png_renderer_draws_on_a_copy_of_the_original_size():
    rendered = RENDERERS.get("png")(RenderInput("a.png", 320, 240, DETECTIONS, _image()), 10**8)
    assert rendered.content_type == "image/png"
    drawn = cv2.imdecode(np.frombuffer(rendered.content, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == (240, 320, 3)
    assert (drawn != 90).any(), "boxes were drawn"
    assert (drawn[120, 300] == 90).all(), "pixels away from boxes are untouched"


def test_png_renderer_needs_the_image():
    with pytest.raises(InvalidInput, match="needs the original image"):
        RENDERERS.get("png")(RenderInput("a.png", 320, 240, DETECTIONS), 10**8)
