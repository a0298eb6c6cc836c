"""Export a served torch model to ONNX with the served inputs and outputs.

The graph takes exactly what the inference service receives (YOLO: uint8 (B, 3, H, W), H and
W dynamic, /255 inside the graph) and gives the served outputs (YOLO: ``output0`` (B, 84, N);
YOLO-seg: ``output0`` (B, 116, N) and the prototypes ``output1`` (B, 32, H/4, W/4); torchvision
detectors: one image per run, ``boxes``/``scores``/``labels`` with a batch axis of 1).
Labels and recipe params travel in the file's ``metadata_props`` ("labels", "recipe_params",
JSON), so the ONNX Runtime backend needs nothing but the file.

``verify_export`` checks an export against its source module (``export_cache`` records it).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from inferline.common.errors import WeightsError
from inferline.services.inference.repository import ModelConfig

if TYPE_CHECKING:
    from inferline.services.inference.backends.open_clip_loader import ClipModule

DEFAULT_OPSET = 17
# The check of an export against its source module: raw outputs (YOLO: box pixels up to 640,
# scores in [0, 1]) equal to float32 rounding across two runtimes' different summation orders.
CHECK_RTOL = 1e-3
CHECK_ATOL = 1e-2


class _Yolo(torch.nn.Module):
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        output = self.module(images.float() / 255.0)
        return output[0] if isinstance(output, (tuple, list)) else output  # a Segment head's: (head, prototypes)


def _build(
    config: ModelConfig, weights_path: Path
) -> tuple[torch.nn.Module, dict[str, np.ndarray], tuple[str, ...], dict]:
    """(module taking the served inputs, sample inputs, labels, recipe params) by loader family."""
    if config.loader == "ultralytics":
        from inferline.services.inference.backends.ultralytics_loader import build_ultralytics_module  # noqa: PLC0415 - each family's loader on demand

        module, labels = build_ultralytics_module(weights_path)
        layer: Any  # ultralytics' layers: plain flags that nn.Module's typing does not know
        for layer in module.modules():
            if hasattr(layer, "inplace"):
                layer.inplace = False
            if hasattr(layer, "dynamic") and hasattr(layer, "anchors"):
                layer.dynamic = True  # Detect head: anchors rebuilt in the graph for every input shape
        sample = {config.inputs[0].name: np.full((1, 3, 640, 640), 114, dtype=np.uint8)}
        return _Yolo(module).eval(), sample, labels, {}
    if config.loader in ("open_clip_image", "open_clip_text"):
        from inferline.services.inference.backends.open_clip_loader import _logit_scale, shared_open_clip_module  # noqa: PLC0415 - each family's loader on demand

        clip = shared_open_clip_module(weights_path, torch.device("cpu"), config)
        params = _logit_scale(clip)
        if config.loader == "open_clip_image":
            from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: PLC0415 - open_clip imports timm

            pre = getattr(clip.visual, "preprocess_cfg", None) or {}
            size = tuple(config.inputs[0].shape[1:])
            sample = {config.inputs[0].name: np.random.default_rng(0).integers(0, 256, (1, 3, *size), dtype=np.uint8)}
            module = _ClipImage(clip, pre.get("mean") or OPENAI_DATASET_MEAN, pre.get("std") or OPENAI_DATASET_STD)
        else:
            context = int(getattr(clip, "context_length", 77) or 77)
            sample = {config.inputs[0].name: np.zeros((1, context), dtype=np.int64)}
            sample[config.inputs[0].name][0, :3] = (49406, 320, 49407)
            module = _ClipText(clip)
        return module.eval(), sample, tuple(config.labels), params
    if config.loader == "torchvision_detection":
        from inferline.services.inference.backends.torchvision_loader import load_torchvision_detection  # noqa: PLC0415 - each family's loader on demand

        served = load_torchvision_detection(weights_path, torch.device("cpu"), config)
        detector = served.module
        assert detector is not None  # the torchvision loader serves its module, not only a forward
        # Noise gives proposals and detections while tracing: a blank image traces the
        # no-detection path, whose constants then break the graph on real images.
        sample = {config.inputs[0].name: np.random.default_rng(0).integers(0, 256, (1, 3, 480, 640), dtype=np.uint8)}
        return (
            _TorchvisionDetection(detector).eval(),
            sample,
            tuple(config.labels or served.labels),
            dict(served.recipe_params),
        )
    raise NotImplementedError(f"ONNX export of loader {config.loader!r} is not supported yet")


def export_onnx(
    config: ModelConfig,
    weights_path: Path,
    out: Path,
    *,
    dynamic_batch: bool = True,
    half: bool = False,
    opset: int | None = None,
) -> Path:
    """Write ``out`` (an .onnx file) and check it with onnxruntime on a sample input."""
    import onnx  # noqa: PLC0415 - the onnx extra, only to export
    import onnxruntime  # noqa: PLC0415

    if config.loader == "torchvision_detection" and dynamic_batch:
        raise ValueError(
            "torchvision detectors export with a batch of one image (their graph resizes each image "
            "on its own); export without --dynamic-batch: the ONNX Runtime backend runs items one by one"
        )
    module, sample, labels, recipe_params = _build(config, Path(weights_path))
    input_names = [spec.name for spec in config.inputs]
    output_names = [spec.name for spec in config.outputs]
    dynamic_axes: dict[str, dict[int, str]] = {}
    for spec in (*config.inputs, *config.outputs):
        axes = {i + 1: f"{spec.name}_d{i + 1}" for i, d in enumerate(spec.shape) if d == -1}
        if dynamic_batch:
            axes[0] = "batch"
        if axes:
            dynamic_axes[spec.name] = axes
    if half:
        # A copy: loaders share modules between towers (CLIP), and .half() converts in place.
        module = copy.deepcopy(module).half()  # inputs stay uint8/int64: the cast happens inside the graph
    args = tuple(torch.from_numpy(sample[name]) for name in input_names)
    if half:
        # Only float inputs change dtype; uint8 images are divided after .float(), so make
        # the graph cast to half: wrap the module.
        module = _Half(module)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # aten::_native_multi_head_attention has no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(out),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset or DEFAULT_OPSET,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(out))
    for key, value in (("labels", json.dumps(list(labels))), ("recipe_params", json.dumps(recipe_params)),
                       ("loader", config.loader), ("source_model", config.name)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(out))

    check = onnxruntime.SessionOptions()
    if half:
        # fp16 graphs are for GPUs. On CPU, ORT's optimiser folds fp16 constants it has no CPU
        # kernel for, and onnxruntime 1.32 has been seen to crash doing so: check unoptimised.
        check.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(out), sess_options=check, providers=["CPUExecutionProvider"])
    results = session.run(output_names, sample)
    for name, value in zip(output_names, results, strict=True):
        if not np.isfinite(np.asarray(value, dtype=np.float32)).all():
            raise WeightsError(f"{out}: exported model gives non-finite {name}")
    return out


class _ClipImage(torch.nn.Module):
    """uint8 (B, 3, H, W) -> raw image features; ToTensor and Normalize inside, as the loader."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, clip: ClipModule, mean, std):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The buffers' dtype is the module's (float16 after .half()), so --half needs no cast outside.
        return self.clip.encode_image(images.to(self.mean.dtype).div(255).sub(self.mean).div(self.std))


class _TorchvisionDetection(torch.nn.Module):
    """uint8 (1, 3, H, W) -> boxes (1, N, 4), scores (1, N), labels (1, N): the whole torchvision
    detector (resize, normalise, RPN, RoI heads, NMS) as served, with a batch axis of one."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector([images[0].float() / 255])[0]
        return out["boxes"].unsqueeze(0), out["scores"].unsqueeze(0), out["labels"].unsqueeze(0)


class _ClipText(torch.nn.Module):
    def __init__(self, clip: ClipModule):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


class _Half(torch.nn.Module):
    """Runs an fp16 module on the same served inputs; outputs cast back to float32."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inner = self.inner
        if isinstance(inner, _Yolo):
            out = inner.module(inputs[0].half() / 255.0)
            out = out[0] if isinstance(out, (tuple, list)) else out
            return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()
        return inner(*inputs).float()


def _check_input(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fixed input an export is checked on: seeded noise for images (a flat image would leave
    most of a detector's paths unchecked), the export's own sample for anything else."""
    rng = np.random.default_rng(17)
    return {
        name: rng.integers(0, 256, array.shape, dtype=np.uint8) if array.dtype == np.uint8 else array
        for name, array in sample.items()
    }


def verify_export(config: ModelConfig, weights_path: Path, onnx_path: Path) -> float:
    """The largest absolute difference between the export and its source module on a fixed
    input; raises ``WeightsError`` when it is beyond float32 rounding."""
    import onnxruntime  # noqa: PLC0415 - the serving extra, only when an export is checked

    module, sample, _, _ = _build(config, Path(weights_path))
    inputs = _check_input(sample)
    names = [spec.name for spec in config.inputs]
    with torch.no_grad():
        expected = module(*(torch.from_numpy(inputs[name]) for name in names))
    expected_list = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    got = session.run([spec.name for spec in config.outputs], inputs)
    worst = 0.0
    for spec, want, have in zip(config.outputs, expected_list, got, strict=True):
        want_np = want.detach().numpy()
        if want_np.shape != have.shape or not np.allclose(have, want_np, rtol=CHECK_RTOL, atol=CHECK_ATOL):
            raise WeightsError(
                f"{onnx_path}: the export's {spec.name} differs from the source module's beyond float32 "
                "rounding; not serving it (export with `inferline export` and compare, or serve backend: torch)"
            )
        if have.size:
            worst = max(worst, float(np.max(np.abs(have.astype(np.float64) - want_np))))
    return worst
