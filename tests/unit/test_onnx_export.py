"""ONNX export of YOLOv8 and the ONNX Runtime backend give the torch loader's results."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import inferline.services.inference.backends.onnxruntime_backend as ortb  # registers "onnxruntime"
from inferline.common.errors import WeightsError
from inferline.common.settings import Settings
from inferline.services.inference.backends import BACKENDS
from inferline.services.inference.backends.open_clip_loader import load_open_clip_image, load_open_clip_text
from inferline.services.inference.backends.ultralytics_loader import load_ultralytics
from inferline.services.inference.export import export_onnx
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights
from inferline.services.postprocess.yolo import decode_detections
from inferline.services.preprocess.letterbox import letterbox

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

MAX_ABS_DIFF = 2e-2  # on (84, N) raw head outputs: box pixels up to 640, scores in [0, 1]


@pytest.fixture(scope="module")
def yolo_config():
    return load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory, yolo_config, yolo_weights) -> Path:
    return export_onnx(yolo_config, yolo_weights, tmp_path_factory.mktemp("onnx") / "yolov8n.onnx")


@pytest.fixture(scope="module")
def torch_model(yolo_config, yolo_weights):
    return load_ultralytics(yolo_weights, torch.device("cpu"), yolo_config)


def _backend(config, path: Path, **parameters):
    config = dataclasses.replace(config, backend="onnxruntime", parameters={**config.parameters, **parameters})
    return BACKENDS.get("onnxruntime")(config, ResolvedWeights(path=path, sha256="", official=False),
                                       Settings(device="cpu"))


def _letterboxed(paths: list[Path]) -> list[np.ndarray]:
    return [letterbox(cv2.imread(str(p)), (640, 640), stride=32, auto=True)[0] for p in paths]


def _torch_out(model, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.forward({"images": torch.from_numpy(image[None].copy())})[0]["output0"].numpy()


def test_dynamic_shapes_match_torch_outputs_and_detections(yolo_config, yolo_onnx, torch_model, sample_images):
    images = _letterboxed(sample_images[-2:] + sample_images[:1])
    assert len({im.shape for im in images}) >= 2, "different letterboxed shapes exercise the dynamic axes"
    backend = _backend(yolo_config, yolo_onnx)
    worst, found = 0.0, 0
    for image in images:
        ours = backend.run({"images": image[None]})[0]["output0"]
        theirs = _torch_out(torch_model, image)
        assert ours.shape == theirs.shape == (84, (image.shape[1] // 8) * (image.shape[2] // 8) * 21 // 16)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        a, b = decode_detections(ours), decode_detections(theirs)
        assert len(a) == len(b)
        found += len(a)
        np.testing.assert_array_equal(a[:, 5], b[:, 5])
        np.testing.assert_allclose(a[:, :5], b[:, :5], atol=MAX_ABS_DIFF)
    print(f"max abs diff ORT vs torch: {worst:.2e}, {found} detections")
    assert found > 0, "detections exist, so equal detections mean something"
    assert worst < MAX_ABS_DIFF


def test_batch_of_two(yolo_config, yolo_onnx, torch_model, sample_images):
    image = _letterboxed(sample_images[-1:])[0]
    other = np.ascontiguousarray(image[:, :, ::-1])
    backend = _backend(yolo_config, yolo_onnx)
    outs = backend.run({"images": np.stack([image, other])})
    assert len(outs) == 2 and set(outs[0]) == {"output0"}
    for out, im in zip(outs, (image, other), strict=True):
        assert np.abs(out["output0"] - _torch_out(torch_model, im)).max() < MAX_ABS_DIFF


def test_labels_and_metadata_round_trip(yolo_config, yolo_onnx, torch_model):
    meta = {p.key: p.value for p in onnx.load(str(yolo_onnx)).metadata_props}
    assert tuple(json.loads(meta["labels"])) == torch_model.labels
    backend = _backend(yolo_config, yolo_onnx)
    assert backend.labels == torch_model.labels and len(backend.labels) == 80
    assert backend.recipe_params() == {}
    backend.close()


def test_missing_cuda_falls_back_to_cpu_with_one_warning(yolo_config, yolo_onnx, caplog):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with caplog.at_level(logging.WARNING, logger=ortb.__name__):
        backend = _backend(yolo_config, yolo_onnx, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                           graph_optimization_level="basic", intra_op_threads=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDAExecutionProvider" in warnings[0].getMessage()
    assert backend.providers == ("CPUExecutionProvider",)


def test_default_providers_choice():
    assert ortb.choose_providers(None, "cpu",
                                 ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert ortb.choose_providers(None, "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ortb.choose_providers(None, "cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_bad_file_is_a_weights_error(yolo_config, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(WeightsError):
        _backend(yolo_config, bad)
    with pytest.raises(WeightsError):
        _backend(yolo_config, bad.with_name("bad2.onnx"), graph_optimization_level="max")


def test_half_exports_and_loads(yolo_config, yolo_weights, tmp_path):
    path = export_onnx(yolo_config, yolo_weights, tmp_path / "half.onnx", half=True)
    backend = _backend(yolo_config, path)
    out = backend.run({"images": np.full((1, 3, 64, 96), 114, np.uint8)})[0]["output0"]
    assert out.dtype == np.float32 and out.shape == (84, 8 * 12 + 4 * 6 + 2 * 3)


@pytest.mark.parametrize("tower", ["clip-vit-b-32", "clip-vit-b-32-text"])
def test_clip_towers_match_torch_embeddings(tower, clip_weights, tmp_path):
    config = load_config(BUILTIN_REPOSITORY / tower / "config.yaml")
    path = export_onnx(config, clip_weights, tmp_path / f"{tower}.onnx")
    load = load_open_clip_image if config.loader == "open_clip_image" else load_open_clip_text
    reference = load(clip_weights, torch.device("cpu"), config)
    name = config.inputs[0].name
    rng = np.random.default_rng(1)
    if config.loader == "open_clip_image":
        batch = rng.integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    else:
        batch = np.zeros((2, 77), dtype=np.int64)
        batch[0, :4] = (49406, 320, 1929, 49407)
        batch[1, :3] = (49406, 2368, 49407)
    backend = _backend(config, path)
    assert backend.recipe_params()["logit_scale"] == pytest.approx(reference.recipe_params["logit_scale"])
    with torch.inference_mode():
        theirs = [o["embedding"].numpy() for o in reference.forward({name: torch.from_numpy(batch)})]
    for ours, ref in zip(backend.run({name: batch}), theirs, strict=True):
        ours = ours["embedding"]
        assert ours.shape == (512,)
        cosine = float(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref))
        print(f"{tower} cosine {cosine:.7f}")
        assert cosine >= 0.9999


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["clip-vit-b-32", "clip-vit-b-32-text"])
def test_half_clip_towers_stay_within_fp16_of_torch(tower, clip_weights, tmp_path):
    """--half: fp16 weights and activations inside, the same uint8/int64 inputs and float32
    embeddings outside; cosine to the float32 torch tower >= 0.999."""
    config = load_config(BUILTIN_REPOSITORY / tower / "config.yaml")
    path = export_onnx(config, clip_weights, tmp_path / f"{tower}-half.onnx", half=True)
    load = load_open_clip_image if config.loader == "open_clip_image" else load_open_clip_text
    reference = load(clip_weights, torch.device("cpu"), config)
    name = config.inputs[0].name
    if config.loader == "open_clip_image":
        batch = np.random.default_rng(2).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    else:
        batch = np.zeros((2, 77), dtype=np.int64)
        batch[0, :4] = (49406, 320, 1929, 49407)
        batch[1, :3] = (49406, 2368, 49407)
    with torch.inference_mode():
        theirs = [o["embedding"].numpy() for o in reference.forward({name: torch.from_numpy(batch)})]
    # Unoptimised on CPU: see export_onnx on ORT's fp16 constant folding.
    for ours, ref in zip(_backend(config, path, graph_optimization_level="disable").run({name: batch}), theirs,
                         strict=True):
        ours = ours["embedding"]
        assert ours.dtype == np.float32 and ours.shape == (512,)
        assert float(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref)) >= 0.999


def test_a_segment_model_exports_its_prototypes_and_segments_like_torch(seg_weights, sample_images, tmp_path):
    from inferline.common.detections import DetectOptions  # noqa: PLC0415
    from inferline.services.postprocess.yolo_recipes import yolo_segment  # noqa: PLC0415

    config = load_config(BUILTIN_REPOSITORY / "yolov8n-seg" / "config.yaml")
    backend = _backend(config, export_onnx(config, seg_weights, tmp_path / "yolov8n-seg.onnx"))
    served = load_ultralytics(seg_weights, torch.device("cpu"), config)
    found = 0
    for path in sample_images[:4]:
        image, transform = letterbox(cv2.imread(str(path)))
        ours = backend.run({"images": image[None]})[0]
        with torch.inference_mode():
            reference = {
                k: v.numpy() for k, v in served.forward({"images": torch.from_numpy(image[None].copy())})[0].items()
            }
        assert sorted(ours) == ["output0", "output1"] and ours["output1"].shape == reference["output1"].shape
        for name in ours:
            assert np.abs(ours[name] - reference[name]).max() < MAX_ABS_DIFF, name
        segmented = [
            yolo_segment(o, transform, DetectOptions(), config.postprocess.params, ()) for o in (ours, reference)
        ]
        assert [d.class_id for d in segmented[0]] == [d.class_id for d in segmented[1]]
        for a, b in zip(*segmented, strict=False):
            both, either = (a.mask.decode() & b.mask.decode()).sum(), (a.mask.decode() | b.mask.decode()).sum()
            assert both / either >= 0.99
        found += len(segmented[1])
    assert found > 3


def test_a_segment_model_exports_in_half_precision(seg_weights, tmp_path):
    config = load_config(BUILTIN_REPOSITORY / "yolov8n-seg" / "config.yaml")
    backend = _backend(config, export_onnx(config, seg_weights, tmp_path / "half.onnx", half=True))
    out = backend.run({"images": np.full((1, 3, 64, 96), 114, np.uint8)})[0]
    assert out["output0"].dtype == out["output1"].dtype == np.float32
    assert out["output0"].shape == (116, 8 * 12 + 4 * 6 + 2 * 3) and out["output1"].shape == (32, 16, 24)
