"""Faster R-CNN through the four services equals torchvision's own model on the same weights.

The reference is what a torchvision user writes: the builder with ``weights=None``, the state
dict loaded with ``weights_only=True``, images read with ``torchvision.io.decode_image`` and
turned into floats in [0, 1], one image per call; thresholds are the builder's own keyword
arguments, and what torchvision has no argument for (a class filter, a lower NMS IoU) is done
on its output with torchvision's own ops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
import torch
import torchvision
from prometheus_client import REGISTRY
from torchvision.io import decode_image, read_file
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    fasterrcnn_mobilenet_v3_large_320_fpn,
)
from torchvision.transforms.functional import convert_image_dtype

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.services.inference.backends.torchvision_loader import load_torchvision_detection
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from tests.support.parity import inexact, iou, mismatches

MODEL = "fasterrcnn-mobilenet-v3-large-320-fpn"
WEIGHTS_FILE = "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
CATEGORIES = FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"]
SPORTS_BALL, KITE = 37, 38  # what the stand-in finds in circles and triangles (and 72, tv, in squares)

# torchvision.io's decoders are deprecated in favour of TorchCodec; they are still what a
# torchvision user calls, and the reference must be that user's code.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def weights_path(model_dir: Path) -> Path:
    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        pytest.fail(f"{WEIGHTS_FILE} not found in {model_dir}")
    return path


@pytest.fixture(scope="module")
def state_dict(weights_path: Path) -> dict:
    return torch.load(str(weights_path), map_location="cpu", weights_only=True)


def _reference(state_dict: dict, **kwargs) -> torch.nn.Module:
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91, **kwargs)
    model.load_state_dict(state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def reference(state_dict) -> torch.nn.Module:
    return _reference(state_dict)


@pytest.fixture(scope="module")
def reference_outputs(reference, images) -> dict[Path, dict[str, torch.Tensor]]:
    """torchvision's detections with its default thresholds, one image per call."""
    return {path: _raw(reference, image) for path, image in images.items()}


@pytest.fixture(scope="module")
def images(sample_images) -> dict[Path, torch.Tensor]:
    return {p: convert_image_dtype(decode_image(read_file(str(p))), torch.float) for p in sample_images}


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


def _ours(stub, paths: list[Path], **options) -> list[list]:
    request = controller_pb2.DetectRequest(
        model=MODEL,
        images=[types_pb2.Image(data=p.read_bytes(), name=p.name) for p in paths],
        options=types_pb2.DetectOptions(**options),
    )
    response = stub.Detect(request, timeout=120)
    assert all(r.status.code == 0 for r in response.results), [r.status for r in response.results]
    return [[(d.label, d.score,
              (d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in r.detections] for r in response.results]


def _raw(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model([image])[0]


def _rows(out: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> list:
    boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
    if keep is not None:
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return [
        (CATEGORIES[int(c)], float(s), tuple(float(v) for v in box))
        for box, s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)
    ]


def _theirs(model: torch.nn.Module, images: dict[Path, torch.Tensor]) -> dict[Path, list]:
    return {path: _rows(_raw(model, image)) for path, image in images.items()}


def _assert_parity(ours: list[list], theirs_by_path: dict[Path, list]) -> None:
    failures = {}
    for (path, reference), detections in zip(theirs_by_path.items(), ours, strict=True):
        problems = mismatches(detections, reference) or inexact(detections, reference)
        if problems:
            failures[path.name] = problems
    assert not failures, failures
    worst_iou, worst_score = _worst(ours, theirs_by_path)
    print(
        f"\nparity: {sum(map(len, ours))} detections, worst box IoU {worst_iou:.6f}, "
        f"worst score delta {worst_score:.2e}"
    )


def _worst(ours: list[list], theirs_by_path: dict[Path, list]) -> tuple[float, float]:
    """The worst IoU and score difference over rows paired by label and best overlap."""
    worst_iou, worst_score = 1.0, 0.0
    for detections, reference in zip(ours, theirs_by_path.values(), strict=True):
        for label, score, box in reference:
            mine = max((o for o in detections if o[0] == label), key=lambda o: iou(o[2], box))
            worst_iou = min(worst_iou, iou(mine[2], box))
            worst_score = max(worst_score, abs(mine[1] - score))
    return worst_iou, worst_score


def test_default_thresholds_match_torchvision(stub, reference_outputs):
    ours = _ours(stub, list(reference_outputs))
    theirs = {path: _rows(out) for path, out in reference_outputs.items()}
    assert sum(map(len, theirs.values())) > 10, "the reference finds objects, so parity means something"
    _assert_parity(ours, theirs)


def test_one_batch_of_same_size_images_is_bit_identical_to_torchvision_on_that_batch(stub, reference, images, settings):
    """The inference stage runs same-size images as one batch; torchvision given the same list
    computes the same floats, so every row is equal to the bit (float32 on the wire)."""
    if settings.device != "cpu" and torch.cuda.is_available():
        pytest.skip("the stack runs the model on the GPU; bit-equality is against the CPU reference")
    same_size = [p for p, image in images.items() if image.shape == next(iter(images.values())).shape]
    assert len(same_size) >= 4
    ours = _ours(stub, same_size)
    # A convolution's sums split by thread, so bits match at the same intra-op thread count: the
    # one the stage reports for the pass (the stack runs in this process).
    served_threads = REGISTRY.get_sample_value("inferline_intra_op_threads", {"model": MODEL})
    assert served_threads is not None and served_threads >= 1
    here = torch.get_num_threads()
    torch.set_num_threads(int(served_threads))
    try:
        with torch.inference_mode():
            outputs = reference([images[p] for p in same_size])
    finally:
        torch.set_num_threads(here)
    assert ours == [_rows(out) for out in outputs]
    assert sum(map(len, ours)) > 10


def test_conf_and_max_det_match_torchvision_built_with_them(stub, state_dict, images):
    ours = _ours(stub, list(images), conf=0.5, max_det=3)
    theirs = _theirs(_reference(state_dict, box_score_thresh=0.5, box_detections_per_img=3), images)
    assert max(map(len, theirs.values())) == 3 and sum(map(len, theirs.values())) > 5
    _assert_parity(ours, theirs)


def test_classes_filter_matches_torchvision_output_filtered_by_label(stub, reference_outputs):
    ours = _ours(stub, list(reference_outputs), classes=[SPORTS_BALL, KITE])
    theirs = {
        path: _rows(out, torch.isin(out["labels"], torch.tensor([SPORTS_BALL, KITE])))
        for path, out in reference_outputs.items()
    }
    found = {row[0] for rows in theirs.values() for row in rows}
    assert found == {"sports ball", "kite"}, found
    _assert_parity(ours, theirs)


def test_lower_iou_is_torchvision_batched_nms_over_the_model_output(stub, reference_outputs):
    ours = _ours(stub, list(reference_outputs), iou=0.2)
    theirs = {
        path: _rows(out, torchvision.ops.batched_nms(out["boxes"], out["scores"], out["labels"], 0.2))
        for path, out in reference_outputs.items()
    }
    suppressed = sum(len(out["boxes"]) for out in reference_outputs.values()) - sum(map(len, theirs.values()))
    assert suppressed > 0, "iou 0.2 must remove something on these images, or the test shows nothing"
    _assert_parity(ours, theirs)


def test_an_official_format_checkpoint_runs_exactly_as_torchvision_pretrained(
    tmp_path, monkeypatch, state_dict, images
):
    """torchvision's release checkpoints were trained with frozen BatchNorm (no num_batches_tracked);
    torchvision's ``weights=COCO_V1`` model, built offline from the same file in its hub cache, is
    the reference, to the bit."""
    official = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    hub = tmp_path / "torch"
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(official, hub / "hub" / "checkpoints" / WEIGHTS_FILE)
    monkeypatch.setenv("TORCH_HOME", str(hub))
    if Path(torch.hub.get_dir()) != hub / "hub":
        pytest.skip("torch.hub's folder was fixed with set_dir elsewhere in this process")
    theirs = fasterrcnn_mobilenet_v3_large_320_fpn(weights=FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1).eval()

    weights = tmp_path / WEIGHTS_FILE
    shutil.copyfile(hub / "hub" / "checkpoints" / WEIGHTS_FILE, weights)
    config = load_config(BUILTIN_REPOSITORY / MODEL / "config.yaml")
    ours = load_torchvision_detection(weights, torch.device("cpu"), config)
    assert ours.labels == tuple(CATEGORIES)

    compared = 0
    for image in list(images.values())[:4]:
        expected = _raw(theirs, image)
        uint8 = (image * 255).round().to(torch.uint8)  # decode_image's pixels again, exactly
        with torch.inference_mode():
            (got,) = ours.forward({"images": uint8[None]})
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(got[key], expected[key]), key
        compared += len(expected["boxes"])
    assert compared > 5
