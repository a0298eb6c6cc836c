"""open_clip CLIP models: the image tower and the text tower, as two served models.

A CLIP checkpoint holds both towers. They are served as two models (``clip-vit-b-32`` embeds
images, ``clip-vit-b-32-text`` embeds texts) because their inputs differ, but loading the
checkpoint twice would double the memory (ViT-B-32 is 600 MB in float32), so the loaded module
is shared: both loaders ask one cache keyed by (file, device, architecture). The cache holds the
module weakly, so unloading both models frees it.

Weights are a safetensors state dict (no pickle, so a tampered file cannot run code) loaded
into ``open_clip.create_model(architecture, pretrained=None)``: the same module
``open_clip.create_model_and_transforms(architecture, pretrained=path)`` builds.

The image tower takes uint8 RGB (the ``clip_image`` recipe's output) and does ToTensor's and
Normalize's arithmetic itself, with the mean and std of the model's preprocess config, so the
float input is bit-identical to open_clip's preprocess. Both towers return the raw projected
features (``encode_*`` with ``normalize=False``); normalising, zero-shot and ranking are the
postprocess stage's (``postprocess/embeddings.py``), which also gets the model's trained logit
scale through ``recipe_params``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import torch

from inferline.common.errors import ConfigError, InvalidInput, WeightsError
from inferline.services.inference.backends.torch_backend import LOADERS, TorchModel
from inferline.services.inference.repository import ModelConfig

DEFAULT_ARCHITECTURE = "ViT-B-32"

_LOCK = threading.Lock()
# open_clip's CLIP (an nn.Module with encode_image, encode_text, logit_scale, visual): open_clip ships
# no type information, so what we call on it is not checked.
ClipModule: TypeAlias = Any

# (file, size, mtime, device, architecture, quick_gelu) -> the loaded module, while anyone uses it.
_MODULES: weakref.WeakValueDictionary[tuple[Any, ...], ClipModule] = weakref.WeakValueDictionary()


def _settings(config: ModelConfig) -> tuple[str, bool]:
    params = config.parameters or {}
    architecture = params.get("architecture", DEFAULT_ARCHITECTURE)
    if not isinstance(architecture, str) or not architecture:
        raise ConfigError(f"model {config.name}: parameters.architecture must be an open_clip model name")
    quick_gelu = params.get("quick_gelu", False)
    if not isinstance(quick_gelu, bool):
        raise ConfigError(f"model {config.name}: parameters.quick_gelu must be true or false")
    return architecture, quick_gelu


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip logs "No pretrained weights loaded ... initialized randomly" when built with
    pretrained=None; the weights are loaded right after, so that warning would mislead."""
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _build(path: Path, device: torch.device, architecture: str, quick_gelu: bool) -> ClipModule:
    import open_clip  # noqa: PLC0415 - open_clip imports timm: paid when a CLIP model loads
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not safetensors
        raise WeightsError(f"{path}: cannot read safetensors weights: {exc}") from None
    try:
        with _quiet_random_init():
            model = open_clip.create_model(architecture, pretrained=None, force_quick_gelu=quick_gelu)
    except Exception as exc:  # noqa: BLE001 - unknown names fail in several ways
        raise ConfigError(f"open_clip has no model {architecture!r}: {exc}") from None
    # What open_clip's load_checkpoint also accepts: DataParallel prefixes, a 0-d logit scale.
    if state and next(iter(state)).startswith("module."):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:
        state["logit_scale"] = scale.reshape(model.logit_scale.shape)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: another architecture's weights
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        detail = lines[0] if lines else str(exc).strip().splitlines()[-1]
        raise WeightsError(f"{path}: not {architecture} open_clip weights: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path}: not {architecture} open_clip weights: {len(result.missing_keys)} tensors missing "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    del state
    return model.float().eval().requires_grad_(False).to(device)


def shared_open_clip_module(path: Path, device: torch.device, config: ModelConfig) -> ClipModule:
    """The open_clip module for these weights, loaded once per (file, device, architecture)
    and shared by every model that asks while any of them holds it."""
    architecture, quick_gelu = _settings(config)
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    device_id = str(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device
        device_id = f"cuda:{torch.cuda.current_device()}"
    key = (str(resolved), stat.st_size, stat.st_mtime_ns, device_id, architecture, quick_gelu)
    with _LOCK:  # two towers loading at once: the second waits and shares the first's module
        module = _MODULES.get(key)
        if module is None:
            module = _build(resolved, device, architecture, quick_gelu)
            _MODULES[key] = module
        return module


def _io_names(config: ModelConfig) -> tuple[str, str]:
    return config.inputs[0].name, config.outputs[0].name


def _logit_scale(module: ClipModule) -> dict[str, float]:
    return {"logit_scale": float(module.logit_scale.exp().item())}


@LOADERS.register("open_clip_image")
def load_open_clip_image(path: Path, device: torch.device, config: ModelConfig) -> TorchModel:
    """The image tower: uint8 (B, 3, H, W) RGB -> per item {output: (D,)} raw image features."""
    module = shared_open_clip_module(path, device, config)
    input_name, output_name = _io_names(config)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: PLC0415 - open_clip imports timm: paid when a CLIP model loads

    preprocess = getattr(module.visual, "preprocess_cfg", None) or {}
    image_size = tuple(getattr(module.visual, "image_size", ()))
    # torchvision's Normalize: tensor.sub_(mean).div_(std), mean and std as (C, 1, 1) tensors.
    mean_values = preprocess.get("mean") or OPENAI_DATASET_MEAN
    std_values = preprocess.get("std") or OPENAI_DATASET_STD
    mean = torch.as_tensor(mean_values, dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.as_tensor(std_values, dtype=torch.float32, device=device).view(-1, 1, 1)

    def forward(inputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        images = inputs[input_name]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise InvalidInput(f"{config.name} takes uint8 (B, 3, H, W) RGB images, got {got}")
        if image_size and tuple(images.shape[2:]) != image_size:
            got = "x".join(map(str, images.shape[2:]))
            raise InvalidInput(f"{config.name} takes {image_size[0]}x{image_size[1]} images, got {got}")
        pixels = images.float().div(255).sub(mean).div(std)  # ToTensor, then Normalize
        features = module.encode_image(pixels)
        return [{output_name: item} for item in features]

    return TorchModel(forward=forward, recipe_params=_logit_scale(module))


@LOADERS.register("open_clip_text")
def load_open_clip_text(path: Path, device: torch.device, config: ModelConfig) -> TorchModel:
    """The text tower: int64 (B, context) token ids -> per item {output: (D,)} raw text features."""
    module = shared_open_clip_module(path, device, config)
    input_name, output_name = _io_names(config)
    context_length = int(getattr(module, "context_length", 0) or 0)
    vocab_size = int(getattr(module, "vocab_size", 0) or 0)

    def forward(inputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        tokens = inputs[input_name]
        if tokens.dtype != torch.int64 or tokens.ndim != 2:
            got = f"{tokens.dtype} {tuple(tokens.shape)}"
            raise InvalidInput(f"{config.name} takes int64 (B, context) token ids, got {got}")
        if context_length and tokens.shape[1] != context_length:
            raise InvalidInput(f"{config.name} takes {context_length} tokens per text, got {tokens.shape[1]}")
        if vocab_size and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise InvalidInput(f"{config.name}: token ids must be in [0, {vocab_size}); tokenize with clip_tokenize")
        features = module.encode_text(tokens)
        return [{output_name: item} for item in features]

    return TorchModel(forward=forward, recipe_params=_logit_scale(module))
