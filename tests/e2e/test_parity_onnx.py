"""A YOLOv8 model exported to ONNX and served by ONNX Runtime gives ultralytics' detections."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from torchvision.io import decode_image, read_file
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    fasterrcnn_mobilenet_v3_large_320_fpn,
)
from torchvision.transforms.v2.functional import to_dtype
from ultralytics import YOLO

import inferline.services.inference.backends.onnxruntime_backend  # noqa: F401 - registers "onnxruntime"
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.services.inference.export import export_onnx
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import sha256_of
from tests.support.parity import iou, mismatches
from tests.support.servers import InProcessStack

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_stack(tmp_path_factory, settings, yolo_weights):
    root = tmp_path_factory.mktemp("onnx-repo")
    exported = export_onnx(load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml"), yolo_weights,
                           root / "yolov8n.onnx")
    repository = root / "repository"
    shutil.copytree(BUILTIN_REPOSITORY / "yolov8n", repository / "yolov8n-onnx")
    config_path = repository / "yolov8n-onnx" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["name"] = "yolov8n-onnx"
    config["backend"] = "onnxruntime"
    config["weights"] = {"file": "yolov8n.onnx", "path": str(exported), "verify": f"sha256:{sha256_of(exported)}"}
    config["parameters"] = {"providers": ["CPUExecutionProvider"], "graph_optimization_level": "all"}
    config_path.write_text(yaml.safe_dump(config))
    stack = InProcessStack(dataclasses.replace(settings, model_repository=repository))
    yield stack
    stack.close()


def _ours(channel: grpc.Channel, paths: list[Path]) -> list[list]:
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    request = controller_pb2.DetectRequest(
        model="yolov8n-onnx", images=[types_pb2.Image(data=p.read_bytes(), name=p.name) for p in paths]
    )
    response = stub.Detect(request, timeout=120)
    assert all(r.status.code == 0 for r in response.results), [r.status for r in response.results]
    return [[(d.label, d.score,
              (d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in r.detections] for r in response.results]


def test_onnx_detect_matches_ultralytics_predict(onnx_stack, yolo_weights, sample_images):
    reference = YOLO(str(yolo_weights))
    with grpc.insecure_channel(onnx_stack.controller) as channel:
        ours = _ours(channel, sample_images)
    failures = {}
    total, worst_iou, worst_score = 0, 1.0, 0.0
    for path, detections in zip(sample_images, ours, strict=True):
        result = reference.predict(source=str(path), verbose=False, device="cpu")[0]
        theirs = [
            (result.names[int(c)], float(s), tuple(float(v) for v in box))
            for box, s, c in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist(),
                                 strict=True)
        ]
        total += len(theirs)
        for label, score, box in theirs:
            best = max((o for o in detections if o[0] == label), key=lambda o: iou(o[2], box), default=None)
            if best is not None:
                worst_iou, worst_score = min(worst_iou, iou(best[2], box)), max(worst_score, abs(best[1] - score))
        problems = mismatches(detections, theirs)
        if problems:
            failures[path.name] = problems
    print(f"{total} reference detections; min IoU {worst_iou:.4f}, max score diff {worst_score:.2e}")
    assert total > 10, "the reference finds objects, so parity means something"
    assert not failures, failures


FRCNN = "fasterrcnn-mobilenet-v3-large-320-fpn"


@pytest.fixture(scope="module")
def frcnn_onnx_stack(tmp_path_factory, settings, model_dir):
    """Faster R-CNN exported whole (resize, RPN, RoI heads, NMS) and served by ONNX Runtime."""
    root = tmp_path_factory.mktemp("frcnn-onnx")
    config = load_config(BUILTIN_REPOSITORY / FRCNN / "config.yaml")
    exported = export_onnx(config, model_dir / config.weights.file, root / "frcnn.onnx", dynamic_batch=False)
    repository = root / "repository"
    shutil.copytree(BUILTIN_REPOSITORY / FRCNN, repository / f"{FRCNN}-onnx")
    config_path = repository / f"{FRCNN}-onnx" / "config.yaml"
    raw = yaml.safe_load(config_path.read_text())
    raw.update(name=f"{FRCNN}-onnx", backend="onnxruntime", weights={"file": "frcnn.onnx", "path": str(exported),
                                                                            "verify": f"sha256:{sha256_of(exported)}"})
    raw["parameters"] = {"providers": ["CPUExecutionProvider"]}
    config_path.write_text(yaml.safe_dump(raw))
    stack = InProcessStack(dataclasses.replace(settings, model_repository=repository))
    yield stack
    stack.close()


def test_faster_rcnn_onnx_detect_matches_torchvision(frcnn_onnx_stack, model_dir, sample_images):
    config = load_config(BUILTIN_REPOSITORY / FRCNN / "config.yaml")
    reference = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
    reference.load_state_dict(torch.load(str(model_dir / config.weights.file), map_location="cpu", weights_only=True))
    reference.eval()
    names = FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.meta["categories"]
    with grpc.insecure_channel(frcnn_onnx_stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        response = stub.Detect(
            controller_pb2.DetectRequest(
                model=f"{FRCNN}-onnx", images=[types_pb2.Image(data=p.read_bytes(), name=p.name) for p in sample_images]
            ),
            timeout=120,
        )
    failures, total = {}, 0
    for path, result in zip(sample_images, response.results, strict=True):
        assert result.status.code == 0, result.status
        ours = [(d.label, d.score, (d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in result.detections]
        with torch.inference_mode():
            out = reference([to_dtype(decode_image(read_file(str(path))), torch.float, scale=True)])[0]
        theirs = [
            (names[int(c)], float(s), tuple(float(v) for v in box))
            for box, s, c in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True)
        ]
        total += len(theirs)
        problems = mismatches(ours, theirs)
        if problems:
            failures[path.name] = problems
    assert total > 10, "the reference finds objects, so parity means something"
    assert not failures, failures


def test_faster_rcnn_exports_only_with_a_batch_of_one(model_dir, tmp_path):
    config = load_config(BUILTIN_REPOSITORY / FRCNN / "config.yaml")
    with pytest.raises(ValueError, match="batch of one image"):
        export_onnx(config, model_dir / config.weights.file, tmp_path / "x.onnx", dynamic_batch=True)
