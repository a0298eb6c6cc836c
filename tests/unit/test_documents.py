"""The documents users read, from the API's domain results: the JSON objects and CSV tables the
CLI prints and the gateway answers with."""

import csv
import io

from inferline.common import errors
from inferline.common.api import (
    FORMAT_BY_ENUM,
    ClassifyResult,
    DetectResult,
    Embedded,
    EmbedResult,
    ImageDetections,
    ImageLabels,
    Rendering,
    TextRanking,
)
from inferline.common.detections import Detection
from inferline.common.masks import Mask
from inferline.common.tasks import TASKS
from inferline.services.presentation import documents
from inferline.services.presentation.renderers import CSV_HEADER, RENDERERS

BUS = Detection("bus", 5, 0.8734567, (10.123, 20.0, 110.0, 220.0))


def test_every_wire_format_has_a_renderer_and_detect_offers_them_all():
    assert set(RENDERERS) == set(FORMAT_BY_ENUM.values()) == set(documents.DETECT_FORMATS)
    assert set(documents.TABLE_FORMATS) <= set(documents.DETECT_FORMATS)
    for task in TASKS.values():
        assert set(task.formats) <= set(RENDERERS), task.name


def test_detect_results_carry_each_image_s_error_and_its_request_s_rounded_timings():
    first = DetectResult(
        "yolov8n", "1", [ImageDetections("a.jpg", 320, 240, [BUS])], {"total": 12.3456, "inference": 10.0}
    )
    failed = ImageDetections("b.jpg", error=errors.InvalidInput("not an image"))
    second = DetectResult("yolov8n", "1", [failed], {"total": 1.0})
    assert documents.detect_results([first, second]) == [
        {
            "image": "a.jpg", "width": 320, "height": 240,
            "detections": [{"label": "bus", "class_id": 5, "score": 0.87346, "box": [10.12, 20.0, 110.0, 220.0]}],
            "timings_ms": {"inference": 10.0, "total": 12.35},
        },
        {
            "image": "b.jpg", "width": 0, "height": 0, "detections": [],
            "error": {"code": "INVALID_ARGUMENT", "message": "not an image"},
            "timings_ms": {"total": 1.0},
        },
    ]
    rows = list(csv.reader(io.StringIO(documents.detect_csv([first, second]))))
    assert tuple(rows[0]) == CSV_HEADER
    assert rows[1:] == [["a.jpg", "bus", "5", "0.87346", "10.12", "20.0", "110.0", "220.0"]]


def test_png_of_an_image_is_its_png_rendering_or_nothing():
    renderings = [Rendering("json", "application/json", b"{}"), Rendering("png", "image/png", b"PNG")]
    drawn = ImageDetections("a.jpg", renderings=renderings)
    assert documents.png_of(drawn) == b"PNG"
    assert documents.png_of(ImageDetections("b.jpg")) == b""


def test_classify_results_rank_labels_and_name_failures_by_status():
    result = ClassifyResult("clip", [
        ImageLabels("a.jpg", [("a bus", 0.912345678), ("a dog", 0.087654)]),
        ImageLabels("b.jpg", error=errors.DeadlineExceeded("too late")),
    ])
    assert documents.classify_results([result]) == [
        {"image": "a.jpg", "labels": [{"label": "a bus", "score": 0.91235}, {"label": "a dog", "score": 0.08765}]},
        {"image": "b.jpg", "labels": [], "error": {"code": "DEADLINE_EXCEEDED", "message": "too late"}},
    ]
    assert documents.classify_csv([result]) == "image,rank,label,score\na.jpg,1,a bus,0.91235\na.jpg,2,a dog,0.08765\n"


def test_embed_document_names_ranked_images_and_its_csv_has_one_row_per_item():
    result = EmbedResult(
        "clip",
        images=[Embedded("a.jpg", [0.6, 0.8]), Embedded("b.jpg", error=errors.InvalidInput("bad"))],
        texts=[Embedded("a circle", [0.0, 1.0000001])],
        clusters=[0, -1, 0],
        rankings=[TextRanking("a circle", [0], [0.7999999])],
    )
    document = documents.embed_document(result)
    assert document == {
        "model": "clip",
        "images": [
            {"image": "a.jpg", "embedding": [0.6, 0.8]},
            {"image": "b.jpg", "embedding": [], "error": {"code": "INVALID_ARGUMENT", "message": "bad"}},
        ],
        "texts": [{"text": "a circle", "embedding": [0.0, 1.0]}],
        "clusters": [0, -1, 0],
        "rankings": [{"text": "a circle", "images": ["a.jpg"], "scores": [0.8]}],
    }
    assert documents.embed_csv(result).splitlines() == [
        "kind,name,cluster,e0,e1", "image,a.jpg,0,0.6,0.8", "image,b.jpg,-1", "text,a circle,0,0.0,1.0",
    ]
    assert "clusters" not in documents.embed_document(EmbedResult("clip", [], [Embedded("t", [1.0])]))


def test_a_segment_model_s_mask_shows_as_coco_rle_in_the_json_and_not_in_the_csv():
    masked = Detection("ball", 32, 0.9, (0.0, 0.0, 1.0, 2.0), mask=Mask(2, 2, (1, 2, 1)))
    result = DetectResult("yolov8n-seg", "1", [ImageDetections("a.jpg", 2, 2, [masked])])
    (document,) = documents.detect_results([result])
    assert document["detections"][0]["mask"] == {"size": [2, 2], "counts": [1, 2, 1]}
    assert documents.detect_csv([result]).splitlines()[1] == "a.jpg,ball,32,0.9,0.0,0.0,1.0,2.0"
