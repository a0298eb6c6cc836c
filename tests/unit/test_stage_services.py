"""The three stages' domain services called directly, as the controller's local ports call them:
numpy arrays and domain values in and out, no gRPC, no protos. Request-level problems raise
before any item is read; a bad item fails alone, its exception in its place."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from inferline.common.api import ClusterOptions, Embeddings
from inferline.common.detections import Detection, DetectOptions
from inferline.common.errors import InvalidInput, ModelNotFound
from inferline.common.items import LazySequence, map_items
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.common.transform import ImageTransform, Region
from inferline.services.inference.service import Inference
from inferline.services.inference.servicer import build_service as build_inference
from inferline.services.postprocess.service import Postprocessor
from inferline.services.postprocess.servicer import build_service as build_postprocess
from inferline.services.preprocess.service import Preprocessor
from inferline.services.preprocess.servicer import build_service as build_preprocess
from inferline.services.presentation.renderers import Rendered, RenderInput
from tests.support.images import encoded
from tests.support.servers import LoopThread

LETTERBOX = Recipe("letterbox", {"size": 64, "stride": 32, "auto": True})
CLIP_TEXT = Recipe("clip_tokenize", {"context_length": 77})
YOLO = Recipe("yolo_detect", {"conf": 0.25, "iou": 0.7, "max_det": 300})
LABELS = ("zero", "one", "two")
# A 1280x960 original letterboxed to 640x480.
HALF = ImageTransform(1280, 960, 640, 480, 0.5, 0.5, 0.0, 0.0)


class Unreadable(Sequence[Any]):
    """Items of a request that no check may read: reading one fails the test."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("an item was read before the request-level checks passed")


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


@pytest.fixture(scope="module")
def preprocessor(loop: LoopThread, settings: Settings) -> Iterator[Preprocessor]:
    service = build_preprocess(dataclasses.replace(settings, max_batch_images=4, max_image_pixels=1_000_000)).domain
    assert isinstance(service, Preprocessor)
    yield service
    loop.run(service.close())


@pytest.fixture(scope="module")
def inference(loop: LoopThread, settings: Settings) -> Iterator[Inference]:
    service = build_inference(dataclasses.replace(settings, models=("yolov8n",), max_regions=3)).domain
    assert isinstance(service, Inference)
    loop.run(service.load())
    yield service
    loop.run(service.close())


@pytest.fixture(scope="module")
def postprocessor(loop: LoopThread, settings: Settings) -> Iterator[Postprocessor]:
    service = build_postprocess(dataclasses.replace(settings, max_batch_images=4, max_embeddings=3)).domain
    assert isinstance(service, Postprocessor)
    yield service
    loop.run(service.close())


# ---- preprocess ---------------------------------------------------------------------------


def test_preprocess_letterboxes_each_image_and_a_bad_one_fails_alone(loop, preprocessor):
    outcomes = loop.run(preprocessor.images(LETTERBOX, [encoded(100, 300), b"not an image", encoded(48, 64)]))
    (first, first_transform), failed, (third, third_transform) = outcomes
    # 300x100 scales by 64/300 to 64x21, padded to the next multiple of 32.
    assert first.shape == (3, 32, 64) and first.dtype == np.uint8
    assert (first_transform.orig_width, first_transform.orig_height) == (300, 100)
    assert isinstance(failed, InvalidInput) and "not a decodable image" in str(failed)
    assert third.shape == (3, 64, 64) and third_transform.input_width == 64


def test_preprocess_cuts_one_item_per_region_and_a_bad_region_fails_alone(loop, preprocessor):
    regions = [
        Region(0, (10, 10, 74, 42)),
        Region(3, (0, 0, 8, 8)),
        Region(0, (300, 300, 400, 400)),
        Region(0, (150.5, 0, 400, 100)),
    ]
    cut, missing, outside, clipped = loop.run(preprocessor.images(LETTERBOX, [encoded(100, 200)], regions))
    assert (cut[1].orig_width, cut[1].orig_height) == (64, 32)
    assert isinstance(missing, InvalidInput) and "refers to image 3" in str(missing)
    assert isinstance(outside, InvalidInput) and "no pixels inside the image" in str(outside)
    assert (clipped[1].orig_width, clipped[1].orig_height) == (50, 100)


@pytest.mark.parametrize(
    ("recipe", "images", "regions", "message"),
    [
        (LETTERBOX, [], (), "no images"),
        (LETTERBOX, [], [Region(0, (0, 0, 1, 1))], "regions need the images"),
        (Recipe("nope"), Unreadable(1), (), "unknown preprocess recipe 'nope'"),
        (LETTERBOX, Unreadable(5), (), "INFERLINE_MAX_BATCH_IMAGES"),
        (Recipe("letterbox", {"size": -3}), Unreadable(1), (), "letterbox size must be a positive integer"),
    ],
)
def test_preprocess_refuses_a_bad_request_before_reading_any_image(
    loop, preprocessor, recipe, images, regions, message
):
    with pytest.raises(InvalidInput, match=message):
        loop.run(preprocessor.images(recipe, images, regions))


def test_preprocess_tokenizes_texts_and_a_text_over_the_byte_limit_fails_alone(loop, preprocessor):
    tokens, too_long = loop.run(
        preprocessor.texts(CLIP_TEXT, ["a dog", "x" * (preprocessor.settings.max_text_bytes + 1)])
    )
    assert tokens.shape == (77,) and tokens[0] != 0
    assert isinstance(too_long, InvalidInput) and "INFERLINE_MAX_TEXT_BYTES" in str(too_long)


@pytest.mark.parametrize(
    ("recipe", "count", "message"),
    [(LETTERBOX, 1, "unknown text preprocess recipe"), (CLIP_TEXT, 0, "no texts"),
     (CLIP_TEXT, 10_000, "INFERLINE_MAX_LABELS")],
)
def test_preprocess_refuses_a_bad_text_request_before_reading_any_text(loop, preprocessor, recipe, count, message):
    with pytest.raises(InvalidInput, match=message):
        loop.run(preprocessor.texts(recipe, Unreadable(count)))


# ---- inference ----------------------------------------------------------------------------


def _image(h: int = 64, w: int = 64) -> dict[str, np.ndarray]:
    return {"images": np.random.default_rng(0).integers(0, 256, (3, h, w), dtype=np.uint8)}


def test_inference_names_its_models_and_refuses_unknown_ones(inference):
    assert [m.config.name for m in inference.models()] == ["yolov8n"]
    assert inference.model("yolov8n").config.task == "detect" and inference.ready
    with pytest.raises(ModelNotFound, match="is not served here"):
        inference.model("yolov8n", "7")


def test_inference_runs_items_and_failed_or_malformed_items_stay_failed(loop, inference):
    undecodable = InvalidInput("tensor 'images' needs 12288 bytes, got 3")
    wrong_dtype = {"images": np.zeros((3, 64, 64), np.float32)}
    ran, failed, refused = loop.run(inference.infer("yolov8n", "", [_image(), undecodable, wrong_dtype]))
    assert ran["output0"].shape == (84, 84) and ran["output0"].dtype == np.float32  # 8x8 + 4x4 + 2x2 anchors
    assert failed is undecodable
    assert isinstance(refused, InvalidInput) and "must be uint8" in str(refused)


def test_inference_with_min_score_keeps_only_the_candidates_above_it(loop, inference):
    (everything,) = loop.run(inference.infer("yolov8n", "", [_image()]))
    (kept,) = loop.run(inference.infer("yolov8n", "", [_image()], min_score=0.01))
    scores = everything["output0"][4:].max(axis=0)
    np.testing.assert_array_equal(kept["output0"], everything["output0"][:, scores > 0.01])
    assert 0 < kept["output0"].shape[1] < everything["output0"].shape[1]


@pytest.mark.parametrize(
    ("name", "items", "min_score", "error", "message"),
    [
        ("nope", Unreadable(1), 0.0, ModelNotFound, "is not served here"),
        ("yolov8n", Unreadable(1), 1.5, InvalidInput, "min_score must be within"),
        ("yolov8n", [], 0.0, InvalidInput, "no items"),
        ("yolov8n", Unreadable(4), 0.0, InvalidInput, "INFERLINE_MAX_REGIONS"),
    ],
)
def test_inference_refuses_a_bad_request_before_reading_any_item(
    loop, inference, name, items, min_score, error, message
):
    with pytest.raises(error, match=message):
        loop.run(inference.infer(name, "", items, min_score=min_score))


# ---- postprocess --------------------------------------------------------------------------


def _raw_output() -> np.ndarray:
    """(4 + 3 classes, 4 anchors): two overlapping class-1 boxes, one class-2 box, one weak box."""
    columns = [
        [100, 100, 40, 40, 0.0, 0.9, 0.0],
        [102, 101, 40, 40, 0.0, 0.8, 0.0],
        [300, 200, 60, 20, 0.0, 0.0, 0.6],
        [500, 400, 10, 10, 0.1, 0.0, 0.0],
    ]
    return np.array(columns, np.float32).T


def test_postprocess_detects_on_the_original_pixels_and_bad_items_fail_alone(loop, postprocessor):
    lost = InvalidInput("tensor 'output0' needs 112 bytes, got 3")
    items = [
        ({"output0": _raw_output()}, HALF),
        ({"output0": np.full((7, 4), np.nan, np.float32)}, HALF),
        ({"output0": _raw_output()}, dataclasses.replace(HALF, scale_x=float("inf"))),
        lost,
    ]
    found, nan, bad_transform, failed = loop.run(postprocessor.detections(YOLO, DetectOptions(), LABELS, items))
    assert [(d.label, d.class_id) for d in found] == [("one", 1), ("two", 2)]
    assert found[0].box == pytest.approx((160, 160, 240, 240))
    assert isinstance(nan, InvalidInput) and "NaN" in str(nan)
    assert isinstance(bad_transform, InvalidInput) and "finite scales" in str(bad_transform)
    assert failed is lost


@pytest.mark.parametrize(
    ("recipe", "options", "count", "message"),
    [
        (Recipe("nope"), DetectOptions(), 1, "unknown postprocess recipe 'nope'"),
        (YOLO, DetectOptions(conf=2.0), 1, "conf must be between 0 and 1"),
        (YOLO, DetectOptions(), 5, "INFERLINE_MAX_BATCH_IMAGES"),
    ],
)
def test_postprocess_refuses_a_bad_request_before_reading_any_item(
    loop, postprocessor, recipe, options, count, message
):
    with pytest.raises(InvalidInput, match=message):
        loop.run(postprocessor.detections(recipe, options, LABELS, Unreadable(count)))


def test_render_gives_one_rendering_per_item_and_refuses_a_bad_one(loop, postprocessor):
    item = RenderInput("a.jpg", 640, 480, [Detection("bus", 5, 0.9, (1.0, 2.0, 30.0, 40.0))])
    (rendered,) = loop.run(postprocessor.render("json", [item]))
    assert isinstance(rendered, Rendered) and rendered.content_type == "application/json"
    assert json.loads(rendered.content)["detections"][0]["label"] == "bus"
    with pytest.raises(InvalidInput, match="unknown renderer 'bmp'"):
        loop.run(postprocessor.render("bmp", Unreadable(1)))
    with pytest.raises(InvalidInput, match="NaN or infinite box"):
        loop.run(
            postprocessor.render(
                "csv", [item, dataclasses.replace(item, detections=[Detection("bus", 5, float("nan"), (0, 0, 1, 1))])]
            )
        )


def test_embeddings_are_normalised_ranked_and_clustered(loop, postprocessor):
    images = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)  # a (n, dim) array is a sequence of vectors
    texts = [np.array([0.0, 1.0], np.float32), np.array([1.0, 0.0], np.float32)]
    result = loop.run(postprocessor.embeddings(images, texts, logit_scale=100.0, top_k=1, cluster=ClusterOptions(k=2)))
    assert isinstance(result, Embeddings)
    np.testing.assert_allclose(result.images, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    assert [r.indices for r in result.zero_shot] == [(0,), (0,)]
    assert [r.indices for r in result.text_to_images] == [(1, 0), (0, 1)]
    assert len(result.clusters) == 4 and set(result.clusters) == {0, 1}


@pytest.mark.parametrize(
    ("images", "texts", "kwargs", "message"),
    [
        (Unreadable(4), Unreadable(0), {}, "INFERLINE_MAX_EMBEDDINGS"),
        (Unreadable(1), Unreadable(1), {"top_k": 1, "logit_scale": float("inf")}, "logit_scale"),
        (Unreadable(1), Unreadable(0), {"top_k": -1}, "top_k must be >= 0"),
        (Unreadable(2), Unreadable(0), {"cluster": ClusterOptions(k=3)}, "cannot make 3 clusters of 2"),
        ([np.ones(3, np.float32)], [np.ones(4, np.float32)], {}, "3 dimensions, text embeddings 4"),
        ([np.array([np.nan, 1.0], np.float32)], [], {}, "NaN"),
    ],
)
def test_embeddings_check_counts_and_scalars_before_reading_any_vector(
    loop, postprocessor, images, texts, kwargs, message
):
    with pytest.raises(InvalidInput, match=message):
        loop.run(postprocessor.embeddings(images, texts, **kwargs))


# ---- the lazy items the servicers hand over ------------------------------------------------


def test_a_lazy_sequence_converts_only_what_is_read_at_each_read(loop):
    reads: list[int] = []

    def convert(value: int) -> int:
        reads.append(value)
        return value * 10

    items = LazySequence([1, 2, 3], convert)
    assert len(items) == 3 and reads == []
    assert items[-1] == 30 and items[0:2] == [10, 20] and list(items) == [10, 20, 30]
    assert reads == [3, 1, 2, 1, 2, 3]


def test_map_items_reads_each_item_on_the_pool_and_keeps_failures_in_place(loop, postprocessor):
    def convert(value: int) -> int:
        if value == 2:
            raise InvalidInput("two is unreadable")
        return value

    outcomes = loop.run(map_items(postprocessor.pool, lambda v: v + 1, LazySequence([1, 2, 3], convert)))
    assert outcomes[0] == 2 and outcomes[2] == 4
    assert isinstance(outcomes[1], InvalidInput)
