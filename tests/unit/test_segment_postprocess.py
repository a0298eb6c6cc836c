"""YOLOv8-seg postprocessing without torch must give what ultralytics' predict gives: the same
instances, boxes and scores, and the same mask pixels (checked against ultralytics' own
functions on random inputs and on the stand-in model's real outputs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling
import torchvision  # noqa: F401  # ultralytics' NMS uses torchvision's kernel only once imported, as in predict
from ultralytics import YOLO
from ultralytics.utils import ops
from ultralytics.utils.nms import non_max_suppression

from inferline.common.detections import Detection, DetectOptions
from inferline.common.errors import InvalidInput
from inferline.common.transform import ImageTransform
from inferline.services.inference.filters import yolo_candidates
from inferline.services.postprocess.masks import Block, instance_masks, resize_bilinear, to_original
from inferline.services.postprocess.yolo import decode_detections
from inferline.services.postprocess.yolo_recipes import yolo_segment
from inferline.services.preprocess.letterbox import letterbox

PARAMS = {"conf": 0.25, "iou": 0.7, "max_det": 300}
NAMES = tuple(f"class{i}" for i in range(80))
# Original image sizes and the letterboxed input each gets (640, stride 32, minimal padding).
SIZES = [(480, 640), (720, 1280), (1080, 810), (333, 517), (97, 143), (1000, 201)]


def _whole(block: Block | None, size: tuple[int, int]) -> np.ndarray:
    whole = np.zeros(size, bool)
    if block is not None:
        rows, cols = block.pixels.shape
        whole[block.top : block.top + rows, block.left : block.left + cols] = block.pixels
    return whole


def _transform(orig: tuple[int, int]) -> ImageTransform:
    return letterbox(np.zeros((*orig, 3), np.uint8))[1]


def _reference(head: np.ndarray, protos: np.ndarray, transform: ImageTransform, **options) -> list[tuple]:
    """ultralytics 8.4's SegmentationPredictor.construct_result (retina_masks=False), then its
    annotator's mapping of each mask to the original image (scale_masks > 0.5)."""
    conf, iou, max_det = options.get("conf", 0.25), options.get("iou", 0.7), options.get("max_det", 300)
    input_hw = (transform.input_height, transform.input_width)
    orig_hw = (transform.orig_height, transform.orig_width)
    pred = non_max_suppression(torch.from_numpy(head.copy())[None], conf, iou, max_det=max_det, nc=80)[0]
    if not len(pred):
        return []
    masks = ops.process_mask(torch.from_numpy(protos.copy()), pred[:, 6:], pred[:, :4], input_hw, upsample=True)
    pred[:, :4] = ops.scale_boxes(input_hw, pred[:, :4], orig_hw)
    keep = masks.amax((-2, -1)) > 0
    pred, masks = pred[keep], masks[keep]
    full = (ops.scale_masks(masks[None].float(), orig_hw)[0] > 0.5).numpy() if len(masks) else []
    return [(row[:4].tolist(), float(row[4]), int(row[5]), mask) for row, mask in zip(pred.numpy(), full, strict=False)]


def _assert_same(ours: list[Detection], theirs: list[tuple], where: str = "") -> None:
    assert len(ours) == len(theirs), where
    for detection, (box, score, class_id, mask) in zip(ours, theirs, strict=False):
        assert detection.class_id == class_id and detection.score == np.float32(score), where
        np.testing.assert_array_equal(np.float32(detection.box), np.float32(box), err_msg=where)
        assert detection.mask is not None and (detection.mask.height, detection.mask.width) == mask.shape
        np.testing.assert_array_equal(detection.mask.decode(), mask, err_msg=where)


def _synthetic(
    rng: np.random.Generator, input_hw: tuple[int, int], anchors: int = 3000
) -> tuple[np.ndarray, np.ndarray]:
    """A head of boxes jittered around a few objects (80 class rows, 32 mask coefficients) and
    random prototypes at a quarter of the input size."""
    height, width = input_hw
    clusters = 12
    centres = rng.uniform(-20, [width + 20, height + 20], (clusters, 2))
    sizes = rng.uniform(4, 300, (clusters, 2))
    owner = rng.integers(0, clusters, anchors)
    xy = centres[owner] + rng.normal(0, 5, (anchors, 2))
    wh = sizes[owner] * rng.uniform(0.8, 1.25, (anchors, 2))
    scores = rng.uniform(0, 0.05, (anchors, 80))  # background, and a third of the anchors sure of one class
    sure = np.flatnonzero(rng.random(anchors) < 0.3)
    scores[sure, rng.integers(0, 80, len(sure))] = rng.random(len(sure))
    coefficients = rng.normal(0, 0.5, (anchors, 32))
    head = np.concatenate((xy, wh, scores, coefficients), axis=1).T.astype(np.float32)
    protos = rng.normal(0, 1, (32, height // 4, width // 4)).astype(np.float32)
    return head, protos


# --- the mask maths against torch and ultralytics --------------------------------------------

@pytest.mark.parametrize(("source", "target"),
                         [((120, 160), (480, 640)), ((96, 160), (384, 640)), ((360, 640), (720, 1280)),
                          ((480, 360), (1080, 810)), ((11, 7), (3, 30))])
def test_bilinear_resize_equals_torch_interpolate(source, target):
    array = np.random.default_rng(sum(target)).normal(0, 3, (4, *source)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(array)[None], target, mode="bilinear")[0].numpy()
    # Bit for bit at the sizes masks take; torch sums in another order at a few odd sizes.
    np.testing.assert_allclose(resize_bilinear(array, target), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("seed", range(4))
def test_instance_masks_equal_ultralytics_process_mask(seed):
    rng = np.random.default_rng(seed)
    height, width = [(480, 640), (384, 640), (640, 160), (64, 96)][seed]
    protos = rng.normal(0, 1, (32, height // 4, width // 4)).astype(np.float32)
    coefficients = rng.normal(0, 0.4, (40, 32)).astype(np.float32)
    corner = rng.uniform(-30, [width, height], (40, 2))
    boxes = np.concatenate((corner, corner + rng.uniform(0, 250, (40, 2))), axis=1).astype(np.float32)
    boxes[0] = (5.5, 5.5, 5.9, 5.9)  # no whole pixel inside: an empty crop
    boxes[1] = (-50, -50, -10, -10)  # outside the image
    coefficients[2] = 0  # every logit 0, and a mask keeps only logits > 0: empty
    expected = ops.process_mask(
        torch.from_numpy(protos),
        torch.from_numpy(coefficients),
        torch.from_numpy(boxes),
        (height, width),
        upsample=True,
    )
    blocks = instance_masks(protos, coefficients, boxes, (height, width))
    assert blocks[0] is None and blocks[1] is None and blocks[2] is None
    for block, mask in zip(blocks, expected.numpy(), strict=False):
        assert (block is None) == (not mask.any())
        np.testing.assert_array_equal(_whole(block, (height, width)), mask.astype(bool))


@pytest.mark.parametrize("orig", SIZES)
def test_masks_reach_the_original_image_as_ultralytics_scale_masks(orig):
    transform = _transform(orig)
    input_hw = (transform.input_height, transform.input_width)
    rng = np.random.default_rng(orig[0])
    masks = np.zeros((12, *input_hw), np.uint8)
    for mask in masks:
        top, left = rng.integers(0, input_hw[0]), rng.integers(0, input_hw[1])
        rows, cols = rng.integers(1, 200, 2)
        mask[top : top + rows, left : left + cols] = (
            rng.random((min(rows, input_hw[0] - top), min(cols, input_hw[1] - left))) < 0.7
        )
    masks[0, :3, :3] = 1  # only in the letterbox padding (or the corner, where there is none)
    expected = (ops.scale_masks(torch.from_numpy(masks)[None].float(), orig)[0] > 0.5).numpy()
    for mask, want in zip(masks, expected, strict=False):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        block = Block(
            mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(bool), int(rows[0]), int(cols[0]), input_hw
        )
        np.testing.assert_array_equal(_whole(to_original(block, orig), orig), want)


# --- the recipe ---------------------------------------------------------------------------

@pytest.mark.parametrize("orig", [SIZES[0], SIZES[1], SIZES[3]])
@pytest.mark.parametrize("options", [{}, {"conf": 0.05, "iou": 0.5}, {"conf": 0.05, "max_det": 3}],
                         ids=["defaults", "low-conf", "max-det"])
def test_yolo_segment_equals_ultralytics_on_synthetic_heads(orig, options):
    transform = _transform(orig)
    head, protos = _synthetic(np.random.default_rng(orig[1]), (transform.input_height, transform.input_width))
    ours = yolo_segment({"output0": head, "output1": protos}, transform, DetectOptions(**options), PARAMS, NAMES)
    theirs = _reference(head, protos, transform, **options)
    assert len(theirs) > 0
    _assert_same(ours, theirs, str(options))
    assert all(d.label == NAMES[d.class_id] for d in ours)


@pytest.fixture(scope="module")
def seg_model(seg_weights: Path) -> YOLO:
    return YOLO(str(seg_weights))


def test_yolo_segment_equals_predict_on_the_stand_in_model(seg_model, sample_images):
    found = 0
    for path in sample_images:
        image = cv2.imread(str(path))
        tensor, transform = letterbox(image)
        with torch.no_grad():
            (head, protos), _ = seg_model.model.float().eval()(torch.from_numpy(tensor)[None].float() / 255)
        for conf in (0.25, 0.05):
            ours = yolo_segment(
                {"output0": head[0].numpy(), "output1": protos[0].numpy()},
                transform,
                DetectOptions(conf=conf),
                PARAMS,
                NAMES,
            )
            result = seg_model.predict(image, verbose=False, device="cpu", conf=conf)[0]
            theirs = (
                []
                if result.masks is None
                else (ops.scale_masks(result.masks.data[None].float(), result.orig_shape)[0] > 0.5).numpy()
            )
            assert len(ours) == len(result.boxes), path.name
            for detection, box, score, class_id, mask in zip(
                ours,
                result.boxes.xyxy.numpy(),
                result.boxes.conf.numpy(),
                result.boxes.cls.numpy(),
                theirs,
                strict=False,
            ):
                assert detection.class_id == int(class_id) and abs(detection.score - score) <= 1e-6, path.name
                np.testing.assert_allclose(detection.box, box, atol=1e-3, err_msg=path.name)
                np.testing.assert_array_equal(detection.mask.decode(), mask, err_msg=path.name)
            found += len(ours)
    assert found > 10, "the stand-in finds shapes, so parity means something"


def test_an_instance_whose_mask_is_empty_is_dropped_as_ultralytics_drops_it():
    transform = _transform((480, 640))
    head, protos = _synthetic(np.random.default_rng(3), (480, 640))
    protos[0] = -1
    best = int(np.argmax(head[4:84].max(axis=0)))
    head[84:, best] = 0
    head[84, best] = 1  # the best box's logits are -1 everywhere: its mask is empty
    ours = yolo_segment({"output0": head, "output1": protos}, transform, DetectOptions(), PARAMS, NAMES)
    assert len(ours) == len(decode_detections(head, nc=80)) - 1
    _assert_same(ours, _reference(head, protos, transform))


def test_the_segment_candidate_filter_reads_class_rows_only_and_keeps_the_prototypes():
    transform = _transform((480, 640))
    head, protos = _synthetic(np.random.default_rng(11), (480, 640))
    head[84:] = np.abs(head[84:]) + 1  # mask coefficients above any confidence: never a class score
    outputs = {"output0": head, "output1": protos}
    for conf in (0.25, 0.05):
        filtered = yolo_candidates(outputs, conf, output="output0", classes=80)
        assert filtered["output1"] is protos
        assert 0 < filtered["output0"].shape[1] < head.shape[1]
        before = yolo_segment(outputs, transform, DetectOptions(conf=conf), PARAMS, NAMES)
        after = yolo_segment(filtered, transform, DetectOptions(conf=conf), PARAMS, NAMES)
        assert after == before and len(after) > 0


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"output0": np.zeros((116, 10), np.float32)}, "takes two outputs"),
        ({"a": np.zeros((116, 10), np.float32), "b": np.zeros((116, 10), np.float32)}, "takes two outputs"),
        ({"output0": np.zeros((36, 10), np.float32), "output1": np.zeros((32, 8, 8), np.float32)},
         "cannot hold 4 box rows"),
        ({"output0": np.zeros((116, 10), np.float32), "output1": np.zeros((32, 0, 8), np.float32)},
         "cannot hold 4 box rows"),
    ],
)
def test_yolo_segment_refuses_outputs_of_another_shape(outputs, message):
    with pytest.raises(InvalidInput, match=message):
        yolo_segment(outputs, _transform((480, 640)), DetectOptions(), PARAMS, NAMES)


def test_mask_postprocessing_imports_neither_torch_nor_opencv():
    code = (
        "import sys; sys.modules['cv2'] = None; "
        "import inferline.services.postprocess.yolo_recipes, inferline.services.presentation.mask_overlay; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
