"""torchvision detection models (Faster R-CNN, RetinaNet, FCOS, SSD, ...) from a state dict.

The module is the one torchvision's own builder makes, with the model's complete detection
head (resize and normalise, RPN, RoI heads, score threshold, per-class NMS, top-k) left in
place, so the outputs are torchvision's to the bit. The config's ``parameters``:

- ``architecture`` (required): a builder in ``torchvision.models.detection``, e.g.
  ``fasterrcnn_mobilenet_v3_large_320_fpn``.
- ``num_classes`` (default 91, COCO with torchvision's background and N/A slots).
- builder keyword arguments, passed on as given: ``box_score_thresh``, ``box_nms_thresh``,
  ``box_detections_per_img`` (R-CNN), ``score_thresh``, ``nms_thresh``, ``detections_per_img``
  (RetinaNet, FCOS, SSD), ``min_size``, ``max_size``. Anything else is refused: torchvision
  ignores unknown keyword arguments silently, and a misspelt threshold should not pass unseen.
- ``frozen_bn_eps`` (optional): the eps of frozen BatchNorm layers. torchvision sets it to 0.0
  for a few legacy checkpoints (``fasterrcnn_resnet50_fpn`` COCO_V1 and its siblings); give it
  there, leave it out elsewhere.

BatchNorm: torchvision builds a model with ``weights=None`` with ``nn.BatchNorm2d`` and a
pretrained one with ``FrozenBatchNorm2d`` in the backbone. Both compute the same function, but
not with the same float rounding, and the checkpoint says which one it was trained with: frozen
layers save no ``num_batches_tracked``. Each BatchNorm layer whose ``num_batches_tracked`` is
missing from the state dict is therefore made a ``FrozenBatchNorm2d``, so an official checkpoint
runs exactly as ``<architecture>(weights=...)`` and a fine-tuned one exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from inferline.common.errors import ConfigError, WeightsError
from inferline.services.inference.backends.torch_backend import LOADERS, TorchModel
from inferline.services.inference.repository import ModelConfig

BUILDER_KWARGS = frozenset({
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img",
    "score_thresh", "nms_thresh", "detections_per_img",
    "min_size", "max_size",
})
OWN_PARAMETERS = frozenset({"architecture", "num_classes", "frozen_bn_eps"})


def build_torchvision_detection(path: Path, device: torch.device, config: ModelConfig) -> torch.nn.Module:
    """The detector torchvision's builder makes, with the checkpoint loaded, in eval mode;
    shared by serving and ONNX export."""
    architecture, num_classes, kwargs = _parameters(config)
    try:
        module = torchvision.models.get_model(
            architecture, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.name}: cannot build {architecture} with {kwargs}: {exc}") from None
    state = _state_dict(path)
    freeze_batchnorm_like_the_checkpoint(module, state, config.parameters.get("frozen_bn_eps"))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise WeightsError(
            f"{path}: not a {architecture} state dict with {num_classes} classes: {detail[:600]}"
        ) from None
    return module.eval().requires_grad_(False).to(device)


@LOADERS.register("torchvision_detection")
def load_torchvision_detection(path: Path, device: torch.device, config: ModelConfig) -> TorchModel:
    architecture, num_classes, _ = _parameters(config)
    module = build_torchvision_detection(path, device, config)

    def forward(inputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        # As torchvision's own preset (convert_image_dtype): uint8 -> float in [0, 1]. The model
        # takes a list; items here share one shape, so its batching pads none of them.
        images = inputs["images"].float() / 255
        return [
            {"boxes": out["boxes"].float(), "scores": out["scores"].float(), "labels": out["labels"].long()}
            for out in module(list(images.unbind(0)))
        ]

    nms_iou = _nms_threshold(module)
    return TorchModel(
        forward=forward,
        labels=_categories(architecture, num_classes),
        # The postprocess recipe must know at which IoU the model already ran NMS.
        recipe_params={} if nms_iou is None else {"nms_iou": nms_iou},
        module=module,
    )


def _parameters(config: ModelConfig) -> tuple[str, int, dict[str, Any]]:
    params = config.parameters
    where = f"{config.folder / 'config.yaml'}: parameters"
    architecture = params.get("architecture")
    known = torchvision.models.list_models(module=torchvision.models.detection)
    if not isinstance(architecture, str) or architecture not in known:
        raise ConfigError(
            f"{where}: architecture {architecture!r} is not one of torchvision's detectors ({', '.join(known)})"
        )
    num_classes = params.get("num_classes", 91)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"{where}: num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    unknown = sorted(set(params) - BUILDER_KWARGS - OWN_PARAMETERS)
    if unknown:
        raise ConfigError(f"{where}: unknown {unknown}; known: {sorted(BUILDER_KWARGS | OWN_PARAMETERS)}")
    eps = params.get("frozen_bn_eps")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0):
        raise ConfigError(f"{where}: frozen_bn_eps must be a number >= 0, got {eps!r}")
    return architecture, num_classes, {k: params[k] for k in sorted(BUILDER_KWARGS) if k in params}


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files fail in many ways
        raise WeightsError(f"{path}: cannot load checkpoint: {' '.join(str(exc).split())[:600]}") from None
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(
            f"{path}: not a state dict (expected the tensors of model.state_dict(), got {type(state).__name__})"
        )
    return dict(state)


def freeze_batchnorm_like_the_checkpoint(module: torch.nn.Module, state: Mapping[str, Any],
                                         eps: float | None = None) -> None:
    """Makes each ``nn.BatchNorm2d`` whose ``num_batches_tracked`` the state dict lacks a
    ``FrozenBatchNorm2d`` (eps kept, or ``eps`` when given), as torchvision's pretrained builds."""
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.BatchNorm2d:
                continue
            prefix = f"{parent_name}.{child_name}" if parent_name else child_name
            if f"{prefix}.running_mean" in state and f"{prefix}.num_batches_tracked" not in state:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps if eps is None else float(eps))
                setattr(parent, child_name, frozen)  # frozen_bn_eps, as torchvision's overwrite_eps, touches only these


def _nms_threshold(module: torch.nn.Module) -> float | None:
    holder = getattr(module, "roi_heads", module)
    value = getattr(holder, "nms_thresh", None)
    return float(value) if value is not None else None


def _categories(architecture: str, num_classes: int) -> tuple[str, ...]:
    """The class names torchvision ships with the architecture's weights (offline: they are
    part of the weights enum), when their count is the model's; else none (ids are shown)."""
    try:
        weights_enum = torchvision.models.get_model_weights(architecture)
    except ValueError:
        return ()
    for weights in weights_enum:
        categories = weights.meta.get("categories")
        if categories and len(categories) == num_classes:
            return tuple(str(c) for c in categories)
    return ()
