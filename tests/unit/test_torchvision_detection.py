"""torchvision detectors: the rgb image recipe, the torch-free torchvision_detect postprocessing
and the torchvision_detection loader, on synthetic inputs."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_320_FPN_Weights as Weights
from torchvision.ops.misc import FrozenBatchNorm2d

from inferline.common.detections import DetectOptions
from inferline.common.errors import ConfigError, InvalidInput, WeightsError
from inferline.common.transform import ImageTransform
from inferline.services.inference.backends.torchvision_loader import (
    _categories,
    freeze_batchnorm_like_the_checkpoint,
    load_torchvision_detection,
)
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.postprocess.recipes import POSTPROCESSORS
from inferline.services.postprocess.recipes import load_families as load_postprocess_families
from inferline.services.postprocess.torchvision_recipes import to_original, torchvision_detect
from inferline.services.preprocess.recipes import PREPROCESSORS
from inferline.services.preprocess.recipes import load_families as load_preprocess_families
from inferline.services.preprocess.torchvision_recipes import rgb_recipe

MODEL = "fasterrcnn-mobilenet-v3-large-320-fpn"
PARAMS = {"conf": 0.05, "max_det": 100, "nms_iou": 0.5}
LABELS = tuple(f"class{i}" for i in range(91))
IDENTITY = ImageTransform(640, 480, 640, 480, 1.0, 1.0, 0.0, 0.0)


def _outputs(rows: list[tuple[float, float, float, float, float, int]]) -> dict[str, np.ndarray]:
    array = np.array([r[:5] for r in rows], dtype=np.float32).reshape(-1, 5)
    return {
        "boxes": array[:, :4].copy(),
        "scores": array[:, 4].copy(),
        "labels": np.array([r[5] for r in rows], dtype=np.int64),
    }


def _run(outputs, transform=IDENTITY, params=PARAMS, labels=LABELS, **options):
    return torchvision_detect(outputs, transform, DetectOptions(**options).validate(), params, labels)


def _scores(detections) -> list[float]:
    return [round(d.score, 4) for d in detections]


# Sorted by score as the model returns them: two kites overlapping at IoU 1/3, a tv on the first.
MODEL_ROWS = [
    (10, 10, 110, 110, 0.95, 38),
    (60, 10, 160, 110, 0.90, 38),  # IoU with the first: 50*100 / (2*10000 - 5000) = 1/3
    (10, 10, 110, 110, 0.80, 72),
    (300, 300, 400, 400, 0.40, 37),
    (500, 100, 600, 200, 0.06, 37),
]


# ---- preprocess --------------------------------------------------------------------------


def test_rgb_recipe_gives_rgb_channels_first_at_the_original_size_with_an_identity_transform():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tensor, transform = rgb_recipe(bgr, {})
    assert tensor.dtype == np.uint8 and tensor.shape == (3, 37, 53) and tensor.flags.c_contiguous
    np.testing.assert_array_equal(tensor, bgr[:, :, ::-1].transpose(2, 0, 1))
    assert transform == ImageTransform(53, 37, 53, 37, 1.0, 1.0, 0.0, 0.0)


def test_the_recipes_are_found_by_family_discovery():
    load_preprocess_families()
    load_postprocess_families()
    assert "rgb" in PREPROCESSORS and "torchvision_detect" in POSTPROCESSORS


# ---- postprocess -------------------------------------------------------------------------


def test_default_params_return_the_models_rows_unchanged():
    outputs = _outputs(MODEL_ROWS)
    detections = _run(outputs)
    assert [d.class_id for d in detections] == [38, 38, 72, 37, 37]
    assert [d.label for d in detections] == ["class38", "class38", "class72", "class37", "class37"]
    np.testing.assert_array_equal([d.score for d in detections], outputs["scores"])
    np.testing.assert_array_equal([d.box for d in detections], outputs["boxes"])


def test_recipe_defaults_are_torchvisions_when_the_config_gives_none():
    outputs = _outputs([(0, 0, 10, 10, 0.05, 1),
                        (0, 0, 10, 10, 0.0501, 2)] + [(20 * i, 0, 20 * i + 10, 10, 0.5, 3) for i in range(120)])
    detections = _run(outputs, params={})
    assert len(detections) == 100 and detections[0].class_id == 3  # max_det 100, and 0.05 itself is not > 0.05


def test_conf_keeps_scores_strictly_above_it_as_torchvisions_box_score_thresh():
    assert _scores(_run(_outputs(MODEL_ROWS), conf=0.4)) == [0.95, 0.9, 0.8]
    assert _scores(_run(_outputs(MODEL_ROWS), conf=0.3999)) == [0.95, 0.9, 0.8, 0.4]
    # Below the model's own threshold nothing comes back that the model did not return.
    assert len(_run(_outputs(MODEL_ROWS), conf=0.0)) == len(MODEL_ROWS)


def test_classes_keep_only_those_class_ids():
    detections = _run(_outputs(MODEL_ROWS), classes=(37, 72))
    assert [d.class_id for d in detections] == [72, 37, 37]
    assert _run(_outputs(MODEL_ROWS), classes=(5,)) == []


def test_extra_nms_runs_only_when_the_request_asks_for_a_lower_iou_than_the_model_used():
    rows = _outputs(MODEL_ROWS)
    assert len(_run(rows, iou=0.5)) == 5  # the model's own threshold: nothing to do
    assert len(_run(rows, iou=0.9)) == 5  # higher cannot bring boxes back
    assert len(_run(rows, iou=0.34)) == 5  # 1/3 is not above 0.34
    lower = _run(rows, iou=0.3)
    assert [(d.class_id, round(d.score, 2)) for d in lower] == [(38, 0.95), (72, 0.8), (37, 0.4), (37, 0.06)]
    # Class-aware: the tv on the first kite stays; agnostic, it goes too.
    agnostic = _run(rows, iou=0.3, agnostic=True)
    assert [(d.class_id, round(d.score, 2)) for d in agnostic] == [(38, 0.95), (37, 0.4), (37, 0.06)]
    # Agnostic without an iou takes the model's.
    assert [d.class_id for d in _run(rows, agnostic=True)] == [38, 38, 37, 37]


@pytest.mark.parametrize("iou", [0.1, 0.3, 0.45])
def test_extra_nms_keeps_what_torchvision_batched_nms_keeps(iou):
    rng = np.random.default_rng(int(iou * 100))
    xy = rng.uniform(0, 600, (300, 2)).astype(np.float32)
    wh = rng.uniform(5, 120, (300, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = np.sort(rng.uniform(0.05, 1, 300).astype(np.float32))[::-1].copy()
    scores[10:20] = scores[10]  # ties: the stable order decides
    labels = rng.integers(1, 6, 300).astype(np.int64)
    keep = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), iou)
    keep = keep[torch.sort(torch.from_numpy(-scores[keep.numpy()]), stable=True).indices].numpy()
    big = ImageTransform(800, 800, 800, 800, 1.0, 1.0, 0.0, 0.0)  # no box reaches an edge
    ours = _run({"boxes": boxes, "scores": scores, "labels": labels}, transform=big, iou=iou, max_det=300)
    assert [d.box for d in ours] == [tuple(float(v) for v in b) for b in boxes[keep]]
    assert [d.class_id for d in ours] == labels[keep].tolist()


def test_rows_are_sorted_by_score_stably_and_cut_at_max_det():
    rows = [(0, 0, 5, 5, 0.3, 1), (10, 0, 15, 5, 0.9, 2), (20, 0, 25, 5, 0.3, 3), (30, 0, 35, 5, 0.7, 4)]
    assert [d.class_id for d in _run(_outputs(rows))] == [2, 4, 1, 3]
    assert [d.class_id for d in _run(_outputs(rows), max_det=3)] == [2, 4, 1]
    assert [d.class_id for d in _run(_outputs(rows), params={**PARAMS, "max_det": 2.0})] == [
        2,
        4,
    ]  # params arrive as floats


def test_boxes_are_mapped_back_through_the_transform_and_clipped_to_the_image():
    transform = ImageTransform(200, 100, 420, 240, 2.0, 2.0, 10.0, 20.0)
    boxes = np.array([[30, 40, 230, 140], [0, 0, 420, 240]], dtype=np.float32)
    np.testing.assert_allclose(to_original(boxes, transform), [[10, 10, 110, 60], [0, 0, 200, 100]])
    detections = _run(_outputs([(30, 40, 230, 140, 0.9, 1), (-5, -5, 430, 250, 0.8, 2)]), transform=transform)
    assert [d.box for d in detections] == [(10.0, 10.0, 110.0, 60.0), (0.0, 0.0, 200.0, 100.0)]


def test_labels_come_from_the_models_list_and_unknown_ids_show_as_numbers():
    detections = _run(_outputs([(0, 0, 5, 5, 0.9, 2), (0, 0, 5, 5, 0.8, 95)]),
                      labels=("__background__", "person", "bicycle"))
    assert [(d.label, d.class_id) for d in detections] == [("bicycle", 2), ("95", 95)]


def test_no_detections_and_malformed_outputs():
    assert _run(_outputs([])) == []
    assert _run(_outputs([]), iou=0.1, classes=(1,)) == []
    with pytest.raises(InvalidInput, match="missing"):
        _run({"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)})
    with pytest.raises(InvalidInput, match="expects boxes"):
        _run({"boxes": np.zeros((2, 4), np.float32), "scores": np.zeros(3, np.float32),
              "labels": np.zeros(3, np.int64)})
    with pytest.raises(InvalidInput, match="scale"):
        _run(_outputs(MODEL_ROWS), transform=dataclasses.replace(IDENTITY, scale_x=0.0))


def test_the_postprocess_recipe_does_not_import_torch():
    code = (
        "import sys, inferline.services.postprocess.torchvision_recipes, "
        "inferline.services.preprocess.torchvision_recipes; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- loader ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config():
    return load_config(BUILTIN_REPOSITORY / MODEL / "config.yaml")


@pytest.fixture(scope="module")
def small_model_state() -> dict[str, torch.Tensor]:
    """A randomly initialised detector of the configured architecture with 3 classes."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    )
    return model.state_dict()


def _with(config, **parameters):
    return dataclasses.replace(config, parameters={**config.parameters, **parameters})


def test_loader_refuses_a_file_that_is_not_a_checkpoint(tmp_path, config):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=str(path)):
        load_torchvision_detection(path, torch.device("cpu"), config)


def test_loader_refuses_pickles_of_anything_but_tensors(tmp_path, config):
    code = tmp_path / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, code)
    with pytest.raises(WeightsError, match="cannot load checkpoint"):  # weights_only refuses the class
        load_torchvision_detection(code, torch.device("cpu"), config)
    numbers = tmp_path / "numbers.pth"
    torch.save([1, 2, 3], numbers)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_torchvision_detection(numbers, torch.device("cpu"), config)


def test_loader_refuses_a_state_dict_of_another_model(tmp_path, config, small_model_state):
    path = tmp_path / "three-classes.pth"
    torch.save(small_model_state, path)  # 3 classes; the config says 91
    with pytest.raises(
        WeightsError,
        match=rf"{path}: not a fasterrcnn_mobilenet_v3_large_320_fpn state dict with 91 classes: .*size mismatch",
    ):
        load_torchvision_detection(path, torch.device("cpu"), config)
    other = tmp_path / "partial.pth"
    torch.save({k: v for k, v in small_model_state.items() if not k.startswith("roi_heads")}, other)
    with pytest.raises(WeightsError, match="Missing key"):
        load_torchvision_detection(other, torch.device("cpu"), _with(config, num_classes=3))


def test_loader_refuses_bad_parameters(tmp_path, config):
    path = tmp_path / "unused.pth"
    with pytest.raises(ConfigError, match="architecture 'resnet50'"):
        load_torchvision_detection(path, torch.device("cpu"), _with(config, architecture="resnet50"))
    with pytest.raises(ConfigError, match="unknown \\['box_score_treshold'\\]"):
        load_torchvision_detection(path, torch.device("cpu"), _with(config, box_score_treshold=0.3))
    with pytest.raises(ConfigError, match="num_classes"):
        load_torchvision_detection(path, torch.device("cpu"), _with(config, num_classes="91"))


def test_loader_builds_with_the_config_parameters_and_serves_a_batch(tmp_path, config, small_model_state):
    path = tmp_path / "three-classes.pth"
    torch.save(small_model_state, path)
    config = _with(config, num_classes=3, box_score_thresh=0.0, box_nms_thresh=0.4, box_detections_per_img=7)
    model = load_torchvision_detection(path, torch.device("cpu"), config)
    assert model.labels == ()  # torchvision ships no 3-class names: ids are shown
    assert model.recipe_params == {"nms_iou": 0.4}
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        outputs = model.forward({"images": images})
    assert len(outputs) == 2
    for out in outputs:
        assert set(out) == {"boxes", "scores", "labels"}
        assert out["boxes"].dtype == torch.float32 and out["boxes"].shape[1:] == (4,)
        assert out["scores"].dtype == torch.float32 and out["labels"].dtype == torch.int64
        assert len(out["scores"]) <= 7


def test_batchnorm_layers_saved_without_num_batches_tracked_become_frozen_like_torchvisions_pretrained(
    small_model_state,
):
    def norms(state, eps=None) -> set:
        module = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3
        )
        freeze_batchnorm_like_the_checkpoint(module, state, eps)
        module.load_state_dict(state)
        return {(type(m), m.eps) for m in module.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))}

    frozen = {k: v for k, v in small_model_state.items() if not k.endswith("num_batches_tracked")}
    assert norms(small_model_state) == {(torch.nn.BatchNorm2d, 1e-5)}
    assert norms(frozen) == {(FrozenBatchNorm2d, 1e-5)}
    assert norms(frozen, eps=0.0) == {(FrozenBatchNorm2d, 0.0)}
    # Per layer: only the layers the checkpoint saved as frozen become frozen.
    first = next(k for k in small_model_state if k.endswith("num_batches_tracked"))
    mixed = {k: v for k, v in small_model_state.items() if k != first}
    assert norms(mixed) == {(torch.nn.BatchNorm2d, 1e-5), (FrozenBatchNorm2d, 1e-5)}


def test_the_configured_model_has_torchvisions_coco_names(config):
    assert _categories(config.parameters["architecture"], 91) == tuple(Weights.COCO_V1.meta["categories"])
    assert _categories(config.parameters["architecture"], 91)[:2] == ("__background__", "person")
