"""Detections through the four services equal ultralytics' own predict on the same weights: the
same boxes to 0.001 px and the same scores to 1e-5 (``tests/support/parity.py``)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import cv2
import grpc
import pytest
import torch
import yaml
from ultralytics import YOLO

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.services.inference.repository import BUILTIN_REPOSITORY
from inferline.services.inference.weights import sha256_of
from tests.support.images import shapes_scene
from tests.support.parity import inexact, mismatches
from tests.support.servers import InProcessStack


@pytest.fixture(scope="module")
def reference(yolo_weights):
    return YOLO(str(yolo_weights))


def _ours(channel: grpc.Channel, paths: list[Path], model: str = "yolov8n", **options) -> list[list]:
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    request = controller_pb2.DetectRequest(
        model=model,
        images=[types_pb2.Image(data=p.read_bytes(), name=p.name) for p in paths],
        options=types_pb2.DetectOptions(**options),
    )
    response = stub.Detect(request, timeout=120)
    assert all(r.status.code == 0 for r in response.results), [r.status for r in response.results]
    return [[(d.label, d.score,
              (d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in r.detections] for r in response.results]


def _theirs(model, path: Path, **kwargs) -> list:
    result = model.predict(source=str(path), verbose=False, device="cpu", **kwargs)[0]
    names = result.names
    boxes = result.boxes
    return [
        (names[int(c)], float(s), tuple(float(v) for v in box))
        for box, s, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
    ]


def _assert_parity(ours: list[list], theirs_by_path: dict[Path, list]) -> None:
    failures = {}
    for (path, reference), detections in zip(theirs_by_path.items(), ours, strict=True):
        problems = mismatches(detections, reference) or inexact(detections, reference)
        if problems:
            failures[path.name] = problems
    assert not failures, failures


def test_shared_images_and_ultralytics_samples_match_predict_with_default_thresholds(stack, reference, sample_images):
    with grpc.insecure_channel(stack.controller) as channel:
        ours = _ours(channel, sample_images)
    theirs = {p: _theirs(reference, p) for p in sample_images}
    assert sum(map(len, theirs.values())) > 10, "the reference finds objects, so parity means something"
    _assert_parity(ours, theirs)


def test_custom_thresholds_match_predict_with_the_same_thresholds(stack, reference, sample_images):
    options = {"conf": 0.1, "iou": 0.5, "max_det": 5}
    with grpc.insecure_channel(stack.controller) as channel:
        ours = _ours(channel, sample_images, **options)
    _assert_parity(ours, {p: _theirs(reference, p, **options) for p in sample_images})


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, yolo_weights) -> Path:
    """A different YOLOv8 checkpoint: the stand-in's weights perturbed, saved in ultralytics' format."""
    model = YOLO(str(yolo_weights)).model
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    path = tmp_path_factory.mktemp("weights") / "yolov8n-perturbed.pt"
    torch.save({"model": model, "train_args": {"imgsz": 640}}, path)
    return path


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    """Synthetic scenes at awkward sizes: tall, wide, tiny, not multiples of 32, upscaled."""
    folder = tmp_path_factory.mktemp("odd")
    paths = []
    for i, (h, w) in enumerate([(333, 517), (1000, 201), (97, 143), (720, 1280), (481, 639)]):
        path = folder / f"scene_{h}x{w}.png"
        cv2.imwrite(str(path), shapes_scene(h, w, seed=i))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_any_yolov8_checkpoint_and_any_image_size_match_predict(
    tmp_path, settings, other_checkpoint, odd_images, sample_images
):
    repository = tmp_path / "repository"
    shutil.copytree(BUILTIN_REPOSITORY / "yolov8n", repository / "perturbed")
    config = yaml.safe_load((repository / "perturbed" / "config.yaml").read_text())
    config["name"] = "perturbed"
    config["weights"]["path"] = str(other_checkpoint)
    config["weights"]["verify"] = f"sha256:{sha256_of(other_checkpoint)}"  # a custom checkpoint pins what it trusts
    (repository / "perturbed" / "config.yaml").write_text(yaml.safe_dump(config))
    custom = InProcessStack(dataclasses.replace(settings, model_repository=repository))
    try:
        images = odd_images + sample_images[:3]
        with grpc.insecure_channel(custom.controller) as channel:
            ours = _ours(channel, images, model="perturbed", conf=0.1)
        reference = YOLO(str(other_checkpoint))
        theirs = {p: _theirs(reference, p, conf=0.1) for p in images}
        assert sum(map(len, theirs.values())) > 5
        _assert_parity(ours, theirs)
    finally:
        custom.close()
