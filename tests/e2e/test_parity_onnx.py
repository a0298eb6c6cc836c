"""A YOLOv8 model exported to ONNX and served by ONNX Runtime gives ultralytics' detections."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import grpc
import pytest
import yaml

import inferline.services.inference.backends.onnxruntime_backend  # noqa: F401 - registers "onnxruntime"
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.services.inference.export import export_onnx
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from tests.support.parity import iou, mismatches
from tests.support.servers import InProcessStack

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_stack(tmp_path_factory, settings, yolo_weights):
    root = tmp_path_factory.mktemp("onnx-repo")
    exported = export_onnx(load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml"), yolo_weights, root / "yolov8n.onnx")
    repository = root / "repository"
    shutil.copytree(BUILTIN_REPOSITORY / "yolov8n", repository / "yolov8n-onnx")
    config_path = repository / "yolov8n-onnx" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["name"] = "yolov8n-onnx"
    config["backend"] = "onnxruntime"
    config["weights"] = {"file": "yolov8n.onnx", "path": str(exported)}
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
    return [[(d.label, d.score, (d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in r.detections] for r in response.results]


def test_onnx_detect_matches_ultralytics_predict(onnx_stack, yolo_weights, sample_images):
    from ultralytics import YOLO

    reference = YOLO(str(yolo_weights))
    with grpc.insecure_channel(onnx_stack.controller) as channel:
        ours = _ours(channel, sample_images)
    failures = {}
    total, worst_iou, worst_score = 0, 1.0, 0.0
    for path, detections in zip(sample_images, ours):
        result = reference.predict(source=str(path), verbose=False, device="cpu")[0]
        theirs = [
            (result.names[int(c)], float(s), tuple(float(v) for v in box))
            for box, s, c in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist())
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
