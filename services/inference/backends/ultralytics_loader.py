"""Torch loaders: how each model library's weights become a module that serves a batch.

One function per family, registered by the name a model config gives as ``loader``.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from inferline.common.errors import WeightsError
from inferline.services.inference.backends.torch_backend import LOADERS, TorchModel, safe_load_checkpoint
from inferline.services.inference.repository import ModelConfig


def build_ultralytics_module(path: Path) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The module ultralytics' AutoBackend would run (EMA weights, float, fused Conv+BN, eval)
    and its class names; shared by serving and ONNX export."""
    checkpoint = safe_load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(
        checkpoint.get("ema") or checkpoint.get("model"), torch.nn.Module
    ):
        raise WeightsError(f"{path}: not an ultralytics checkpoint (no 'model' module inside)")
    module = (checkpoint.get("ema") or checkpoint["model"]).float()
    module = module.fuse(verbose=False).eval() if hasattr(module, "fuse") else module.eval()
    names = getattr(module, "names", {}) or {}
    labels = tuple(str(names[i]) for i in sorted(names)) if isinstance(names, dict) else tuple(map(str, names))
    return module, labels


def _channels_last(device: torch.device) -> bool:
    return bool(
        device.type == "cpu"
        and sys.platform in ("linux", "win32")
        and platform.machine() in {"AMD64", "x86_64"}
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


@LOADERS.register("ultralytics")
def load_ultralytics(path: Path, device: torch.device, config: ModelConfig) -> TorchModel:
    module, labels = build_ultralytics_module(path)
    for m in module.modules():
        if hasattr(m, "inplace"):
            setattr(m, "inplace", True)  # noqa: B010 - a flag only some layers have
    module.to(device)
    # As ultralytics' AutoBackend does for .pt models: channels-last weights on x86 CPUs with
    # oneDNN (~10% faster convolutions there, and the same numerics as YOLO.predict).
    module.to(memory_format=torch.channels_last if _channels_last(device) else torch.contiguous_format)

    def forward(inputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        images = inputs["images"].float() / 255.0
        output = module(images)
        batch = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(batch, (tuple, list)):  # a Segment head: (boxes, classes and mask coefficients; prototypes)
            return [{"output0": item, "output1": protos} for item, protos in zip(*batch, strict=False)]
        return [{"output0": item} for item in batch]

    return TorchModel(forward=forward, labels=labels)
